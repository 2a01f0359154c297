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
    indexed = mcore_datasets().indexed_dataset
    try:
        ds = indexed.IndexedDataset(prefix, mmap=True)
        lengths = ds.index.sequence_lengths
        pointers = ds.index.sequence_pointers
        itemsize = np.dtype(ds.index.dtype).itemsize
        n = int(lengths.shape[0])
        expected_bin = int(pointers[-1]) + int(lengths[-1]) * itemsize if n else 0
        del ds
    except Exception as err:  # Megatron asserts / numpy buffer errors on a bad index
        raise DataError(
            f"{idx_path} is corrupt or truncated (expected a Megatron MMIDIDX index): "
            f"{type(err).__name__}: {err}"
        ) from None
    if n == 0:
        raise DataError(f"{idx_path} holds no documents")
    actual_bin = os.path.getsize(bin_path)
    if actual_bin != expected_bin:
        raise DataError(
            f"{bin_path} has {actual_bin} bytes but {idx_path} describes {expected_bin} "
            "(truncated, or the two files come from different datasets)"
        )
    return n


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
    "document_lines",
    "prepare_builtin_corpus",
    "resolve_cache_dir",
    "write_indexed_dataset",
]
