"""Data harness: where prepared data lives, loading it, and batches for training and evaluation.

`prepare.py` writes, under `prepared_dir(cfg)`: train.bin / val.bin (flat token arrays; every
document is <|bos|> followed by its tokens), the tokenizer, token_bytes.npy (UTF-8 bytes per
token, 0 for specials) and manifest.json, written last. A directory is trusted only when its
manifest is valid, matches the config and the files have the recorded sizes.
This module imports only numpy at import time (torch lazily), so it is cheap to import.

Usage:
    data = load_prepared(cfg.data)
    for x, y in train_batches(data, batch_size=16, seq_len=256, seed=42, device="cpu"): ...
    val = val_tokens(data, cfg.data.eval_tokens)
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

if TYPE_CHECKING:
    import torch

    from src.harness.config import DataConfig

FORMAT_VERSION = 2  # 2: a held-out test split (test.bin)
MANIFEST = "manifest.json"
DATASETS = ("shakespeare", "text", "climbmix", "tinystories")
HUB_DATASETS = ("climbmix", "tinystories")
TOKENIZERS = ("byte", "bpe")
CONF_DATA_DIR = Path(__file__).resolve().parents[2] / "conf" / "data"


class PrepareError(Exception):
    """Bad data configuration or input; the message says what was wrong and how to fix it."""


class DataNotPreparedError(PrepareError):
    """The prepared data for a config is missing, incomplete or stale."""


@dataclass
class PreparedData:
    dir: Path
    train: Optional[np.memmap]  # None unless opened (training opens only train, the scorer val or test)
    val: Optional[np.memmap]
    token_bytes: np.ndarray  # int32 [vocab_size]: UTF-8 bytes of each token, 0 for specials
    vocab_size: int
    bos_id: int
    manifest: Dict[str, Any]

    def tokenizer(self):
        """The tokenizer the data was encoded with (for decoding samples)."""
        from src.harness.tokenizer import load_tokenizer

        return load_tokenizer(self.dir)


def resolved_paths(cfg: "DataConfig") -> List[str]:
    """data=text: the configured paths, user-expanded and absolute (relative to the current dir)."""
    return [str(Path(os.path.expanduser(p)).resolve()) for p in cfg.paths]


def fingerprint(cfg: "DataConfig") -> Dict[str, Any]:
    """The config fields that determine the prepared content (not cache_dir, eval_tokens, retries...)."""
    fp: Dict[str, Any] = {"format": FORMAT_VERSION, "name": cfg.name, "tokenizer": cfg.tokenizer,
                          "vocab_size": cfg.vocab_size}
    if cfg.tokenizer == "bpe":
        fp["bpe_train_bytes"] = cfg.bpe_train_bytes
    if cfg.name == "text":
        fp.update(paths=resolved_paths(cfg), val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    if cfg.name in HUB_DATASETS:
        fp.update(base_url=cfg.base_url.rstrip("/"), train_shards=cfg.train_shards, val_shard=cfg.val_shard,
                  test_shard=cfg.test_shard, text_column=cfg.text_column)
    return fp


def prepared_dir(cfg: "DataConfig") -> Path:
    """`<cache_dir>/<name>-<tokenizer>[<vocab> if bpe][-<hash of paths + val_fraction> for text]`."""
    tag = f"{cfg.name}-{cfg.tokenizer}" + (str(cfg.vocab_size) if cfg.tokenizer == "bpe" else "")
    if cfg.name == "text":
        src = json.dumps({"paths": resolved_paths(cfg), "val_fraction": cfg.val_fraction,
                          "test_fraction": cfg.test_fraction}, sort_keys=True)
        tag += "-" + hashlib.sha256(src.encode()).hexdigest()[:8]
    return Path(os.path.expanduser(cfg.cache_dir)) / tag


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def check_prepared(directory: Path, cfg: Optional["DataConfig"] = None) -> Dict[str, Any]:
    """Return the manifest of a trustworthy prepared dir, else raise DataNotPreparedError saying why.

    Quick check: manifest parses, matches `cfg` (if given) and every listed file has its size.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataNotPreparedError(f"{directory} has no {MANIFEST} (never prepared, or interrupted)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataNotPreparedError(f"{path} is unreadable or outdated ({e})") from e
    for name, info in files.items():
        f = Path(directory) / name
        if not f.is_file() or f.stat().st_size != info.get("bytes"):
            raise DataNotPreparedError(f"{f} is missing or has the wrong size (expected {info.get('bytes')} bytes)")
    if cfg is not None:
        want = json.loads(json.dumps(fingerprint(cfg)))
        if manifest.get("fingerprint") != want:
            diff = sorted(k for k in set(want) | set(manifest.get("fingerprint", {}))
                          if want.get(k) != manifest.get("fingerprint", {}).get(k))
            raise DataNotPreparedError(f"{directory} was prepared with a different config (differs in: {diff})")
    return manifest


def verify_checksums(directory: Path) -> None:
    """Full check: recompute the sha256 of every file in the manifest (slow on big data)."""
    manifest = check_prepared(directory)
    for name, info in manifest["files"].items():
        if sha256_file(Path(directory) / name) != info["sha256"]:
            raise DataNotPreparedError(f"{Path(directory) / name} does not match its sha256 in the manifest")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def prepare_command(cfg: "DataConfig") -> str:
    """The `python prepare.py ...` command that prepares `cfg` (overrides vs. its conf/data preset)."""
    from omegaconf import OmegaConf

    from src.harness.config import DataConfig

    preset_file = CONF_DATA_DIR / f"{cfg.name}.yaml"
    preset = OmegaConf.structured(DataConfig)
    if preset_file.is_file():
        y = OmegaConf.load(preset_file)
        y.pop("defaults", None)
        preset = OmegaConf.merge(preset, y)
        args = [f"data={cfg.name}"]
    else:
        args = [f"data.name={cfg.name}"]
    ref = OmegaConf.to_container(preset)
    for key in ("tokenizer", "vocab_size", "cache_dir", "paths", "val_fraction", "test_fraction", "base_url",
                "train_shards", "val_shard", "test_shard", "text_column", "bpe_train_bytes"):
        value = getattr(cfg, key)
        if value != ref.get(key):
            if isinstance(value, list):
                text = "[" + ",".join(str(v) for v in value) + "]"
            else:
                text = "null" if value is None else str(value)
            args.append(shlex.quote(f"data.{key}={text}"))
    return "python prepare.py " + " ".join(args)


HELD_OUT = ("val*", "test*")  # the token files only the scorer reads


def held_out_files(cfg: "DataConfig") -> list[Path]:
    """The validation and test token files of every data set prepared in the cache (the configured one and
    $OVERNIGHT_CACHE's), and every raw download they were prepared from (which holds their text too): what the
    training process hides from itself before research code runs (it reads only the prepared train split)."""
    from src.harness.paths import cache_dir

    found = set()
    for root in {Path(os.path.expanduser(cfg.cache_dir)), cache_dir()}:
        try:
            dirs = [d for d in root.iterdir() if d.is_dir()]
        except OSError:  # not there, or already hidden (a later job of a sweep in one process)
            continue
        found |= {f for d in dirs for pattern in HELD_OUT for f in d.glob(pattern) if f.is_file()}
        found |= {f for f in (root / "downloads").rglob("*") if f.is_file()}  # the raw text they were cut from
    return sorted(found)


def load_prepared(cfg: "DataConfig", splits: Tuple[str, ...] = ("train", "val")) -> PreparedData:
    """Memory-map the prepared data for `cfg`; raise DataNotPreparedError with the command to run.

    splits: which token files to open. Training opens only "train"; the scorer "val" (or "test", once per session
    at its end, src/lab/heldout.py). The held-out test split is opened under the `val` name.
    """
    directory = prepared_dir(cfg)
    try:
        manifest = check_prepared(directory, cfg)
    except DataNotPreparedError as e:
        raise DataNotPreparedError(f"data not prepared: {e}.\nRun: {prepare_command(cfg)}") from None
    dtype = np.dtype(manifest["dtype"])
    token_bytes = np.load(directory / "token_bytes.npy")
    if len(token_bytes) != manifest["vocab_size"] or manifest["vocab_size"] != cfg.vocab_size:
        raise DataNotPreparedError(f"{directory}: vocab_size mismatch (config {cfg.vocab_size}, manifest "
                                   f"{manifest['vocab_size']}, token_bytes {len(token_bytes)}).\n"
                                   f"Run: {prepare_command(cfg)}")
    return PreparedData(
        dir=directory,
        train=np.memmap(directory / "train.bin", dtype=dtype, mode="r") if "train" in splits else None,
        val=(np.memmap(directory / "test.bin", dtype=dtype, mode="r") if "test" in splits else
             np.memmap(directory / "val.bin", dtype=dtype, mode="r") if "val" in splits else None),
        token_bytes=token_bytes.astype(np.int32),
        vocab_size=int(manifest["vocab_size"]),
        bos_id=int(manifest["bos_id"]),
        manifest=manifest,
    )


def train_batches(data: PreparedData, batch_size: int, seq_len: int, seed: int,
                  device: "torch.device | str" = "cpu") -> Iterator[Tuple["torch.Tensor", "torch.Tensor"]]:
    """Infinite (x, y) int64 batches [batch_size, seq_len]: random train windows, y = x shifted by one.

    Window starts come from a torch.Generator seeded with `seed`, so the stream is deterministic.
    """
    import torch

    tokens = data.train
    n_starts = len(tokens) - seq_len  # starts 0 .. len - seq_len - 1 leave room for seq_len + 1 tokens
    if n_starts < 1:
        raise PrepareError(f"the train split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                           f"lower model.sequence_len or prepare more data")
    device = torch.device(device)
    pin = device.type == "cuda"
    gen = torch.Generator().manual_seed(seed)
    offsets = np.arange(seq_len + 1, dtype=np.int64)
    while True:
        starts = torch.randint(0, n_starts, (batch_size,), generator=gen).numpy()
        windows = np.asarray(tokens[starts[:, None] + offsets[None, :]], dtype=np.int64)
        x, y = torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())
        if pin:
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            x, y = x.to(device), y.to(device)
        yield x, y


def val_tokens(data: PreparedData, max_tokens: Optional[int] = None) -> "torch.Tensor":
    """The first `max_tokens` (None = all) tokens of the validation split as an int64 tensor."""
    import torch

    n = len(data.val) if max_tokens is None else min(int(max_tokens), len(data.val))
    return torch.from_numpy(np.asarray(data.val[:n], dtype=np.int64))
