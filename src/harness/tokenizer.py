"""Tokenizers of the data harness: `byte` (256 bytes + <|bos|>) and `bpe` (byte-level BPE).

Both speak one interface: encode(text) -> list[int], encode_batch(texts) -> list[np.ndarray],
decode(ids) -> str, vocab_size, bos_id, token_bytes (int32 UTF-8 byte length of every token,
0 for special tokens; what val_bpb divides by), save(dir) and load_tokenizer(dir).
A saved tokenizer is `tokenizer_info.json` (kind, vocab_size, bos_id) plus, for bpe, the
Hugging Face `tokenizer.json`.

Usage: from src.harness.tokenizer import ByteTokenizer, train_bpe, load_tokenizer
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Sequence, Union

import numpy as np

BOS = "<|bos|>"
INFO_FILE = "tokenizer_info.json"
HF_FILE = "tokenizer.json"
KINDS = ("byte", "bpe")


class TokenizerError(ValueError):
    """A tokenizer was misconfigured or its files are missing/invalid."""


class ByteTokenizer:
    """Every UTF-8 byte is a token (ids 0..255); <|bos|> is id 256. vocab_size = 257."""

    kind = "byte"
    vocab_size = 257
    bos_id = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            out += BOS.encode() if i == self.bos_id else bytes((i,))
        return out.decode("utf-8", errors="replace")

    @property
    def token_bytes(self) -> np.ndarray:
        tb = np.ones(self.vocab_size, dtype=np.int32)
        tb[self.bos_id] = 0
        return tb

    def save(self, directory: Union[str, Path]) -> None:
        _write_info(Path(directory), self)


class BPETokenizer:
    """Byte-level BPE (Hugging Face `tokenizers`), GPT-2 pre-tokenization, <|bos|> special token."""

    kind = "bpe"

    def __init__(self, hf_tokenizer) -> None:
        self._tok = hf_tokenizer
        self._tok.encode_special_tokens = True  # a literal "<|bos|>" in text is text, not BOS
        bos = hf_tokenizer.token_to_id(BOS)
        if bos is None:
            raise TokenizerError(f"this BPE tokenizer has no {BOS} token; retrain it with train_bpe()")
        self.bos_id = int(bos)
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def token_bytes(self) -> np.ndarray:
        from tokenizers import pre_tokenizers

        alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # one printable char per byte
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        tb = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            tok = self._tok.id_to_token(i)
            if tok is None or tok in special:
                continue
            if not set(tok) <= alphabet:
                raise TokenizerError(f"token {i} ({tok!r}) is not byte-level; token_bytes needs a byte-level BPE")
            tb[i] = len(tok)
        return tb

    def save(self, directory: Union[str, Path]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / HF_FILE))
        _write_info(directory, self)


def train_bpe(texts: Iterable[Union[str, List[str]]], vocab_size: int, show_progress: bool = True) -> BPETokenizer:
    """Train a byte-level BPE of exactly `vocab_size` tokens (256 bytes + <|bos|> + merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 257:
        raise TokenizerError(
            f"bpe vocab_size={vocab_size} is too small: it needs 256 byte tokens + {BOS} + at least one "
            f"merge; set data.vocab_size to e.g. 8192, or use data.tokenizer=byte (vocab_size=257)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise TokenizerError(
            f"BPE training learned only {got} of the requested {vocab_size} tokens: the training text is too "
            f"small or repetitive; set data.vocab_size={got} (or lower), or give it more text")
    bpe = BPETokenizer(tok)
    probe = "Hello, world! \u00e9\u4e2d\n  x"
    if bpe.decode(bpe.encode(probe)) != probe:
        raise TokenizerError("the trained BPE tokenizer does not round-trip text; this is a bug")
    return bpe


def load_tokenizer(directory: Union[str, Path]) -> Union[ByteTokenizer, BPETokenizer]:
    """Load a tokenizer saved with `.save(directory)`."""
    directory = Path(directory)
    info_path = directory / INFO_FILE
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as e:
        raise TokenizerError(f"no valid tokenizer in {directory} ({info_path.name}: {e}); run prepare.py") from e
    kind = info.get("kind")
    if kind == "byte":
        tok: Union[ByteTokenizer, BPETokenizer] = ByteTokenizer()
    elif kind == "bpe":
        from tokenizers import Tokenizer

        try:
            tok = BPETokenizer(Tokenizer.from_file(str(directory / HF_FILE)))
        except Exception as e:  # tokenizers raises a plain Exception on a bad file
            raise TokenizerError(f"cannot read {directory / HF_FILE}: {e}; run prepare.py again") from e
    else:
        raise TokenizerError(f"{info_path} names an unknown tokenizer kind {kind!r}; expected one of {KINDS}")
    if tok.vocab_size != info.get("vocab_size") or tok.bos_id != info.get("bos_id"):
        raise TokenizerError(f"{info_path} does not match the tokenizer files next to it; run prepare.py again")
    return tok


def _write_info(directory: Path, tok) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    info = {"kind": tok.kind, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "bos_token": BOS}
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


ByteTokenizer.load = staticmethod(load_tokenizer)  # type: ignore[attr-defined]
BPETokenizer.load = staticmethod(load_tokenizer)  # type: ignore[attr-defined]
