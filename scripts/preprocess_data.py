"""Tokenise text into a Megatron indexed dataset (``<output_prefix>.bin/.idx``).

    moefold-preprocess --input 'data/*.jsonl' --output-prefix data/web \\
        --train-tokenizer --vocab-size 32000 --workers 8
    moefold-preprocess --input notes/*.txt --txt-doc-sep blankline \\
        --output-prefix data/notes --tokenizer-model data/web.model

Inputs are local .jsonl/.json (``--text-key``), .parquet (``--text-key``) or .txt files
(one document per file, or per blank-line-separated paragraph), loaded with HF
``datasets`` (offline). An end-of-document token (the tokenizer's eos) follows every
document. Outputs are written under temporary names and renamed into place; an existing
output is never overwritten without ``--overwrite``. Train with::

    python -m trainer.train data=indexed data.blend=[data/web] data.tokenizer_model=data/web.model
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

from trainer.data import (
    Tokenizer,
    document_lines,
    train_tokenizer,
    write_indexed_dataset,
)
from trainer.errors import ConfigError, DataError, UserError

_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".txt": "text",
    ".text": "text",
    ".parquet": "parquet",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def _format_of(path: str) -> str:
    name = path.lower()
    for ext in _COMPRESSION:
        if name.endswith(ext):
            name = name[: -len(ext)]
    fmt = _FORMATS.get(os.path.splitext(name)[1])
    if fmt is None:
        raise DataError(
            f"{path}: unknown input type (expected .jsonl, .json, .parquet or .txt, "
            f"optionally compressed: {', '.join(_COMPRESSION)})"
        )
    return fmt


def _expand_inputs(patterns: list[str]) -> list[str]:
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"--input {pattern}: no such file")
        for m in matches:
            if m not in seen:
                seen.add(m)
                files.append(m)
    return files


def _load_documents(args: argparse.Namespace, files: list[str], hf_cache: str):
    """One HF dataset with a single ``text`` column, documents in input order."""
    import datasets

    groups: list[tuple[str, list[str]]] = []  # consecutive files of one format
    for path in files:
        fmt = _format_of(path)
        if groups and groups[-1][0] == fmt:
            groups[-1][1].append(path)
        else:
            groups.append((fmt, [path]))

    parts = []
    for fmt, paths in groups:
        kwargs = {}
        if fmt == "text":
            kwargs["sample_by"] = "paragraph" if args.txt_doc_sep == "blankline" else "document"
        try:
            ds = datasets.load_dataset(
                fmt, data_files=paths, split="train", cache_dir=hf_cache, **kwargs
            )
        except Exception as err:  # parse errors from pyarrow/json carry the details
            raise DataError(f"could not read {', '.join(paths)} as {fmt}: {err}") from None
        key = "text" if fmt == "text" else args.text_key
        if key not in ds.column_names:
            raise DataError(
                f"{', '.join(paths)}: no column {key!r} (columns: {', '.join(ds.column_names)}); "
                "set --text-key"
            )
        ds = ds.select_columns([key])
        if key != "text":
            ds = ds.rename_column(key, "text")
        if fmt == "text" and args.txt_doc_sep == "blankline":
            # Runs of >2 newlines leave newline-led paragraphs: trim them.
            ds = ds.map(lambda b: {"text": [t.strip("\n") for t in b["text"]]}, batched=True)
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    n_before = len(ds)
    ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
    return ds, n_before - len(ds)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="moefold-preprocess",
        description="Tokenise local text/jsonl/parquet files into a Megatron indexed dataset.",
    )
    p.add_argument("--input", nargs="+", required=True, help="files or globs")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    p.add_argument("--text-key", default="text", help="column holding the text (jsonl/parquet)")
    p.add_argument(
        "--txt-doc-sep",
        choices=("file", "blankline"),
        default="file",
        help=".txt files: one document per file, or per blank-line-separated paragraph",
    )
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer-model", help="an existing sentencepiece .model")
    tok.add_argument(
        "--train-tokenizer",
        action="store_true",
        help="train a sentencepiece model on the input, written to <prefix>.model",
    )
    p.add_argument("--vocab-size", type=int, default=32000, help="with --train-tokenizer")
    p.add_argument("--tokenizer-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument(
        "--tokenizer-max-sentences",
        type=int,
        default=10_000_000,
        help="train the tokenizer on a (seeded) random sample of at most this many lines (0: all)",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenisation processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, int]:
    if args.workers < 1:
        raise ConfigError(f"--workers={args.workers} must be >= 1")
    prefix = os.path.abspath(args.output_prefix)
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    model_path = prefix + ".model" if args.train_tokenizer else None
    outputs = [bin_path, idx_path] + ([model_path] if model_path else [])
    existing = [p for p in outputs if os.path.exists(p)]
    if existing and not args.overwrite:
        raise DataError(
            f"{existing[0]} already exists; refusing to overwrite it (pass --overwrite)"
        )
    files = _expand_inputs(args.input)
    tokenizer = None if args.train_tokenizer else Tokenizer(args.tokenizer_model)
    out_dir = os.path.dirname(prefix)
    os.makedirs(out_dir, exist_ok=True)

    import datasets

    if args.quiet:
        datasets.disable_progress_bars()
    t0 = time.perf_counter()
    # Everything transient (HF's Arrow cache, partial outputs) lives in one temp dir on the
    # output's filesystem, so the final renames are atomic and nothing is left behind.
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(prefix)}.tmp-", dir=out_dir)
    try:
        ds, n_empty = _load_documents(args, files, os.path.join(work, "hf_cache"))
        if len(ds) == 0:
            raise DataError(f"no non-empty documents in {', '.join(files)}")
        if tokenizer is None:
            proto = train_tokenizer(
                document_lines(ds["text"]),
                args.vocab_size,
                args.tokenizer_type,
                num_threads=args.workers,
                max_sentences=args.tokenizer_max_sentences,
                source=", ".join(files),
            )
            with open(os.path.join(work, "tokenizer.model"), "wb") as f:
                f.write(proto)
            tokenizer = Tokenizer.from_proto(proto, model_path)

        tok = tokenizer
        ids = ds.map(
            lambda b: {"ids": tok.encode_batch(b["text"])},
            batched=True,
            num_proc=args.workers if args.workers > 1 else None,
            remove_columns=["text"],
            desc="tokenising",
        )
        tmp_prefix = os.path.join(work, "data")
        docs = (row for batch in ids.iter(batch_size=1024) for row in batch["ids"])
        n_docs, n_tokens = write_indexed_dataset(
            tmp_prefix, docs, vocab_size=tok.vocab_size, eod=tok.eod
        )
        if model_path:
            os.replace(os.path.join(work, "tokenizer.model"), model_path)
        # What the data was tokenised with: the trainer checks its tokenizer against it.
        with open(tmp_prefix + ".tokenizer.json", "w") as f:
            json.dump({"vocab_size": tok.vocab_size, "tokenizer_sha256": tok.sha256,
                       "eod": tok.eod}, f)
        os.replace(tmp_prefix + ".tokenizer.json", prefix + ".tokenizer.json")
        os.replace(tmp_prefix + ".bin", bin_path)
        os.replace(tmp_prefix + ".idx", idx_path)  # last: the pair is complete once it exists
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    print(
        f"wrote {bin_path} and {idx_path}: {n_docs} documents, {n_tokens} tokens "
        f"(incl. one eod={tok.eod} per document), vocab {tok.vocab_size}"
        + (f", {n_empty} empty documents skipped" if n_empty else "")
        + f", {seconds:.1f}s"
    )
    if model_path:
        print(f"wrote tokenizer {model_path}")
    return {"documents": n_docs, "tokens": n_tokens, "empty_skipped": n_empty}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
