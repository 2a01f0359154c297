"""Megatron indexed datasets on disk, and the embedded default corpus.

The .bin/.idx format is Megatron-Core's (``megatron.core.datasets``, used as a library), so
a corpus preprocessed for Megatron-LM trains here unchanged and vice versa.

- ``write_indexed_dataset`` / ``check_indexed_dataset``: write ``<prefix>.bin/.idx`` (EOD
  appended to each document); check that the pair exists and agrees, with user-facing
  errors.
- ``builtin_documents`` -> ``prepare_builtin_corpus``: the default corpus (Python's own
  documentation, which ships with every CPython) tokenised once into a content-addressed
  cache directory (``resolve_cache_dir``).
- ``document_lines``: the non-blank lines of documents, which sentencepiece trains on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from trainer.data.mcore import mcore_datasets
from trainer.data.tokenizer import Tokenizer, train_tokenizer
from trainer.errors import ConfigError, DataError

# Bump when the builtin corpus, the tokenizer training options or the on-disk layout
# change: it is part of every cache key.
FORMAT_VERSION = 1


def document_lines(docs: Iterable[str]) -> Iterator[str]:
    """Non-blank lines of the documents: sentencepiece trains on lines ("sentences")."""
    for doc in docs:
        for line in doc.split("\n"):
            if line.strip():
                yield line


# -- indexed datasets ---------------------------------------------------------------------
def write_indexed_dataset(
    prefix: str, docs: Iterable[Sequence[int]], *, vocab_size: int, eod: int
) -> tuple[int, int]:
    """Write ``<prefix>.bin/.idx`` with Megatron's builder, EOD appended to each document.

    Writes exactly these paths (callers handle temp names). Returns (documents, tokens).
    """
    indexed = mcore_datasets().indexed_dataset
    dtype = indexed.DType.optimal_dtype(vocab_size)
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    n_docs = n_tokens = 0
    for ids in docs:
        arr = np.empty(len(ids) + 1, dtype=dtype)
        arr[:-1] = ids
        arr[-1] = eod
        builder.add_document(arr, [arr.size])
        n_docs += 1
        n_tokens += arr.size
    builder.finalize(prefix + ".idx")
    return n_docs, n_tokens


_IDX_MAGIC = b"MMIDIDX\x00\x00"
# Megatron's DType codes (megatron.core.datasets.indexed_dataset.DType)
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}


def read_index(idx_path: str) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths, sequence byte pointers, document indices) of a
    Megatron ``.idx`` file, every field checked (a bit flip or truncation is a DataError
    naming the file, not an IndexError deep inside the dataset builder)."""
    import struct

    def bad(why: str) -> DataError:
        return DataError(f"{idx_path} is corrupt or truncated (expected a Megatron MMIDIDX "
                         f"index): {why}")

    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _IDX_MAGIC:
        raise bad("bad header")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:34])
    if version != 1:
        raise bad(f"version {version}")
    if code not in _IDX_DTYPES:
        raise bad(f"unknown dtype code {code}")
    need = 34 + n_seq * (4 + 8) + n_doc * 8
    if n_seq > size or n_doc > size or need > size:
        raise bad(f"header counts {n_seq} sequences / {n_doc} documents need {need} bytes, "
                  f"the file has {size}")
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, np.int32, n_seq, 34)
    pointers = np.frombuffer(mm, np.int64, n_seq, 34 + 4 * n_seq)
    docs = np.frombuffer(mm, np.int64, n_doc, 34 + 12 * n_seq)
    dtype = np.dtype(_IDX_DTYPES[code])
    if n_seq:
        if lengths.min() < 0:
            raise bad("negative sequence length")
        if pointers[0] != 0 or np.any(pointers[1:] != pointers[:-1] + lengths[:-1].astype(
                np.int64) * dtype.itemsize):
            raise bad("sequence pointers do not follow the sequence lengths")
    if n_doc and (docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0)):
        raise bad("document indices are not 0..sequence count in order")
    return dtype, lengths, pointers, docs


def check_indexed_dataset(prefix: str) -> int:
    """Check ``<prefix>.bin/.idx`` exist and agree; returns the number of sequences."""
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise DataError(
                f"{path} not found (expected the Megatron indexed dataset {prefix}.bin/.idx, "
                "e.g. written by scripts/preprocess_data.py)"
            )
    if os.path.getsize(bin_path) == 0:
        raise DataError(f"{bin_path} is empty (expected the token data of {idx_path})")
    # Read by us, not by Megatron's IndexedDataset: its __del__ prints a stray traceback
    # when its constructor failed on a corrupt index.
    dtype, lengths, pointers, _ = read_index(idx_path)
    n = int(lengths.shape[0])
    if n == 0:
        raise DataError(f"{idx_path} holds no documents")
    expected_bin = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize
    actual_bin = os.path.getsize(bin_path)
    if actual_bin != expected_bin:
        raise DataError(
            f"{bin_path} has {actual_bin} bytes but {idx_path} describes {expected_bin} "
            "(truncated, or the two files come from different datasets)"
        )
    return n


# Token ids are scanned in full up to this many bytes of .bin (about 0.25 s per GiB on one
# core from the page cache); larger files are checked on evenly spread samples.
FULL_SCAN_BYTES = 1 << 30
_SAMPLES, _SAMPLE_TOKENS = 256, 1 << 16


def recorded_tokenizer(prefix: str) -> dict | None:
    """What the data records about its tokenizer: ``<prefix>.tokenizer.json`` (written by
    scripts/preprocess_data.py) or the builtin corpus' ``meta.json``; None if nothing."""
    for path in (prefix + ".tokenizer.json", os.path.join(os.path.dirname(prefix), "meta.json")):
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    rec = json.load(f)
            except (OSError, ValueError):
                raise DataError(f"{path} is corrupt (expected JSON)") from None
            if isinstance(rec, dict) and "vocab_size" in rec and (
                    path.endswith(".tokenizer.json") or "corpus_sha256" in rec):  # ours
                return dict(rec, path=path)
    return None


def check_tokens(prefix: str, tokenizer, model_vocab_size: int) -> None:
    """Token ids of ``<prefix>.bin`` are in [0, tokenizer vocab) (whole file up to
    ``FULL_SCAN_BYTES``, else samples), and the data's recorded tokenizer (if any) is
    ``tokenizer``; DataError naming both otherwise."""
    bin_path = prefix + ".bin"
    rec = recorded_tokenizer(prefix)
    if rec is not None:
        sha = rec.get("tokenizer_sha256")
        if int(rec["vocab_size"]) != tokenizer.vocab_size or (sha and sha != tokenizer.sha256):
            raise DataError(
                f"{bin_path} was tokenised with another tokenizer ({rec['path']}: vocab "
                f"{rec['vocab_size']}) than {tokenizer.model_path} (vocab "
                f"{tokenizer.vocab_size}); set data.tokenizer_model to the one it was made with"
            )
    dtype, _, _, _ = read_index(prefix + ".idx")
    tokens = np.memmap(bin_path, mode="r", dtype=dtype)
    if tokens.nbytes <= FULL_SCAN_BYTES:
        chunks = [tokens]
    else:
        starts = np.linspace(0, len(tokens) - _SAMPLE_TOKENS, _SAMPLES).astype(np.int64)
        chunks = [tokens[s:s + _SAMPLE_TOKENS] for s in starts]
    lo = min(int(c.min()) for c in chunks)
    hi = max(int(c.max()) for c in chunks)
    del tokens, chunks
    limit = min(tokenizer.vocab_size, model_vocab_size)
    if lo < 0 or hi >= limit:
        raise DataError(
            f"{bin_path} holds token id {hi if hi >= limit else lo}, outside [0, {limit}) "
            f"(tokenizer {tokenizer.model_path}: vocab {tokenizer.vocab_size}, model.vocab_size="
            f"{model_vocab_size}): the .bin is corrupt or was tokenised with another tokenizer"
        )


def _publish_dir(tmp: str, final: str, complete_marker: str) -> None:
    """Atomically move a fully built ``tmp`` directory to ``final``.

    If another process won the race (``final`` already complete), discard ours.
    """
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isfile(os.path.join(final, complete_marker)):
            raise DataError(
                f"{final} exists but is incomplete (no {complete_marker}); "
                "remove it to let it be rebuilt"
            ) from None
        shutil.rmtree(tmp, ignore_errors=True)


# -- the embedded corpus ------------------------------------------------------------------
_STDLIB_SKIP_DIRS = {
    "site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo", "lib2to3",
    "ensurepip", "pydoc_data",
}  # fmt: skip


def _stdlib_sources() -> list[tuple[str, str]]:
    """(relative path, absolute path) of the standard library's .py files, sorted.

    Installed packages (site-packages) and test suites are left out: they are not the
    standard library's documentation and vary between installations.
    """
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _STDLIB_SKIP_DIRS and not d.startswith(("test", "config-"))
        )
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test"):
                path = os.path.join(dirpath, name)
                out.append((os.path.relpath(path, root), path))
    return sorted(out)


def _module_docstrings(source: bytes) -> str:
    """Module, class and function docstrings of one source file, blank-line separated."""
    import ast

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarnings of old escape sequences
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    parts = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds)]
    return "\n\n".join(p for p in parts if p and p.strip())


def _builtin_sources(
    stdlib_docstrings: bool,
) -> tuple[dict[str, str], list[tuple[str, str]], str]:
    """pydoc topics, stdlib source files (if used), and a hash of all of their content."""
    from pydoc_data.topics import topics

    h = hashlib.sha256()
    for name in sorted(topics):
        h.update(f"topic:{name}\0{topics[name]}\0".encode())
    files = _stdlib_sources() if stdlib_docstrings else []
    for rel, path in files:
        with open(path, "rb") as f:
            h.update(f"module:{rel}\0".encode() + f.read() + b"\0")
    return topics, files, h.hexdigest()


def builtin_documents(stdlib_docstrings: bool = False) -> list[str]:
    """The embedded corpus: one document per pydoc topic (the English text of Python's
    language reference topics), optionally plus one per stdlib module's docstrings.

    Ordered by a hash of each document's name, so the train/valid split (the last few
    percent of the documents) is a deterministic pseudo-random choice of documents.

    Measured on CPython 3.11: topics are 79 documents, 0.47M characters, 137k tokens at
    vocab 2048 (~0.3 s to build); the docstrings add 504 documents and 1.6M characters
    (704k tokens in all) for ~4 s of parsing per build. The default is topics only: the
    demo (300 steps x 16 x 128 tokens, ~4.5 epochs of them) showed no overfitting with
    them alone (val 4.10 vs train 4.09 after 3 epochs).
    """
    topics, files, _ = _builtin_sources(stdlib_docstrings)
    named = [(f"topic:{k}", v) for k, v in topics.items()]
    for rel, path in files:
        with open(path, "rb") as f:
            text = _module_docstrings(f.read())
        if text:
            named.append((f"module:{rel}", text))
    named.sort(key=lambda kv: hashlib.sha256(kv[0].encode()).hexdigest())
    return [text for _, text in named]


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> str:
    """The cache directory; an unresolved ``${oc.env:...}`` default is resolved here."""
    value = os.fspath(cache_dir) if cache_dir else ""
    if "${" in value:
        from omegaconf import OmegaConf

        value = OmegaConf.create({"v": value}).v
    if not value:
        value = os.environ.get("MOEFOLD_CACHE") or os.path.expanduser("~/.cache/moefold")
    return os.path.abspath(os.path.expanduser(value))


def _build_corpus(out_dir: str, vocab_size: int, tokenizer_model: str | None,
                  stdlib_docstrings: bool, corpus_hash: str) -> None:
    """Tokenizer (copied or trained), indexed dataset ``pydoc`` and ``meta.json`` (written
    last: it marks the build complete) in ``out_dir``."""
    t0 = time.perf_counter()
    docs = builtin_documents(stdlib_docstrings)
    if tokenizer_model:
        shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    else:
        try:
            proto = train_tokenizer(
                document_lines(docs), vocab_size, "bpe", source="the builtin corpus"
            )
        except DataError as err:
            raise ConfigError(f"data.builtin_vocab_size={vocab_size}: {err}") from None
        with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
            f.write(proto)
    tok = Tokenizer(os.path.join(out_dir, "tokenizer.model"))
    n_docs, n_tokens = write_indexed_dataset(
        os.path.join(out_dir, "pydoc"),
        tok.encode_batch(docs),
        vocab_size=tok.vocab_size,
        eod=tok.eod,
    )
    meta = {
        "format": FORMAT_VERSION,
        "corpus_sha256": corpus_hash,
        "documents": n_docs,
        "chars": sum(map(len, docs)),
        "tokens": n_tokens,
        "vocab_size": tok.vocab_size,
        "tokenizer_sha256": tok.sha256,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def prepare_builtin_corpus(
    cache_dir: str | os.PathLike,
    vocab_size: int = 2048,
    tokenizer_model: str | None = None,
    *,
    stdlib_docstrings: bool = False,
) -> tuple[str, str]:
    """Tokenise the embedded corpus once; returns (indexed dataset prefix, tokenizer path).

    Without ``tokenizer_model`` a BPE tokenizer of ``vocab_size`` is trained on the corpus
    (deterministically). Cached under ``cache_dir/pydoc-<key>/``, key = hash(corpus
    content, vocab size, tokenizer, FORMAT_VERSION). Built in a temp dir and renamed into
    place, so a reader never sees a partial build and concurrent builders agree (the
    loser discards its copy). ``meta.json`` there records documents/chars/tokens.
    """
    cache_dir = resolve_cache_dir(cache_dir)
    tok_hash = None
    if tokenizer_model:
        tok_hash = Tokenizer(tokenizer_model).sha256
    _, _, corpus_hash = _builtin_sources(stdlib_docstrings)
    key_src = json.dumps(
        {
            "format": FORMAT_VERSION,
            "corpus": corpus_hash,
            "stdlib": stdlib_docstrings,
            "vocab": vocab_size,
            "tok": tok_hash,
        }
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    final = os.path.join(cache_dir, f"pydoc-{key}")
    prefix, model_path = os.path.join(final, "pydoc"), os.path.join(final, "tokenizer.model")
    if os.path.isfile(os.path.join(final, "meta.json")):
        return prefix, model_path

    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-pydoc-{key}-", dir=cache_dir)
    try:
        _build_corpus(tmp, vocab_size, tokenizer_model, stdlib_docstrings, corpus_hash)
        _publish_dir(tmp, final, "meta.json")
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return prefix, model_path


__all__ = [
    "FORMAT_VERSION",
    "builtin_documents",
    "check_indexed_dataset",
    "check_tokens",
    "read_index",
    "document_lines",
    "prepare_builtin_corpus",
    "resolve_cache_dir",
    "write_indexed_dataset",
]
