"""Tokenise text into a Megatron indexed dataset (``<prefix>_text_document.bin/.idx``).

    moefold-preprocess --input 'data/*.jsonl' --output-prefix data/web \\
        --train-tokenizer --vocab-size 32000 --workers 8
    moefold-preprocess --input notes/*.txt --txt-doc-sep blankline \\
        --output-prefix data/notes --tokenizer-model data/web.model
    moefold-preprocess --hf-dataset wikitext --hf-config wikitext-2-raw-v1 --split train \\
        --output-prefix data/wiki --tokenizer-model path/to/hf_tokenizer_dir

Inputs are local .jsonl/.json (``--text-key``), .parquet (``--text-key``) or .txt files
(one document per file, or per blank-line-separated paragraph), loaded with HF
``datasets`` (offline), or a Hugging Face dataset by name or local path
(``--hf-dataset``: a directory written by ``Dataset.save_to_disk`` is read with
``load_from_disk``, anything else with ``load_dataset``; ``--streaming`` reads it without
downloading it whole). The tokenizer is a sentencepiece ``.model`` or a Hugging Face
``tokenizer.json`` / tokenizer directory (``--tokenizer-model``), or a sentencepiece model
trained on the input (``--train-tokenizer``, written to ``<prefix>.model``). An
end-of-document token (the tokenizer's eos) follows every document. Outputs follow
Megatron's naming, ``<prefix>_text_document.{bin,idx}`` (a prefix that already ends in
``_text_document`` is used as is); they are written under temporary names and renamed into
place; an existing output is never overwritten without ``--overwrite``. Train with::

    python -m trainer.train data=indexed 'data.blend=[data/web_text_document]' \\
        data.tokenizer_model=data/web.model model.vocab_size=32000
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


DOCUMENT_SUFFIX = "_text_document"


def dataset_prefix(output_prefix: str) -> str:
    """Megatron's ``<prefix>_text_document`` (unchanged if it already ends so)."""
    p = os.path.abspath(output_prefix)
    return p if p.endswith(DOCUMENT_SUFFIX) else p + DOCUMENT_SUFFIX


def _load_hf_dataset(args: argparse.Namespace, hf_cache: str):
    """``--hf-dataset``: a Dataset (or IterableDataset with ``--streaming``) with a single
    ``text`` column, and the number of documents dropped later as empty (None: unknown)."""
    import datasets

    name = args.hf_dataset
    local = os.path.expanduser(name)
    try:
        if os.path.isdir(local) and (
            os.path.isfile(os.path.join(local, "dataset_info.json"))
            or os.path.isfile(os.path.join(local, "dataset_dict.json"))
        ):
            ds = datasets.load_from_disk(local)
            if isinstance(ds, datasets.DatasetDict):
                if args.split not in ds:
                    raise DataError(
                        f"--hf-dataset {name}: no split {args.split!r} (splits: "
                        f"{', '.join(ds)}); set --split"
                    )
                ds = ds[args.split]
            if args.streaming:
                ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(
                local if os.path.exists(local) else name, args.hf_config, split=args.split,
                streaming=args.streaming, cache_dir=hf_cache,
            )
    except DataError:
        raise
    except Exception as err:  # hub/network/format errors carry the details
        raise DataError(f"--hf-dataset {name}: could not load it: {err}") from None
    columns = ds.column_names
    if columns is not None and args.text_key not in columns:
        raise DataError(
            f"--hf-dataset {name}: no column {args.text_key!r} (columns: "
            f"{', '.join(columns)}); set --text-key"
        )
    ds = ds.select_columns([args.text_key])
    if args.text_key != "text":
        ds = ds.rename_column(args.text_key, "text")
    return ds


def _load_documents(args: argparse.Namespace, files: list[str], hf_cache: str):
    """One HF dataset with a single ``text`` column, documents in input order."""
    import datasets

    if args.hf_dataset:
        ds = _load_hf_dataset(args, hf_cache)
        if args.streaming:
            return ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]],
                             batched=True), None
        n_before = len(ds)
        ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
        return ds, n_before - len(ds)

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
        description="Tokenise local text/jsonl/parquet files or a Hugging Face dataset into a "
        "Megatron indexed dataset.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="files or globs")
    src.add_argument(
        "--hf-dataset",
        help="a Hugging Face dataset: a Hub name or a local path (save_to_disk directory, "
        "or anything datasets.load_dataset reads)",
    )
    p.add_argument("--hf-config", default=None, help="with --hf-dataset: the config name")
    p.add_argument("--split", default="train", help="with --hf-dataset: the split")
    p.add_argument("--streaming", action="store_true",
                   help="with --hf-dataset: stream it instead of downloading it whole")
    p.add_argument(
        "--output-prefix",
        required=True,
        help="writes <prefix>_text_document.bin/.idx (and <prefix>.model with "
        "--train-tokenizer)",
    )
    p.add_argument("--text-key", default="text",
                   help="column holding the text (jsonl/parquet/--hf-dataset)")
    p.add_argument(
        "--txt-doc-sep",
        choices=("file", "blankline"),
        default="file",
        help=".txt files: one document per file, or per blank-line-separated paragraph",
    )
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument(
        "--tokenizer-model",
        help="an existing sentencepiece .model, or a Hugging Face tokenizer.json or "
        "tokenizer directory",
    )
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
    if args.workers > 1 and args.streaming:
        raise ConfigError("--streaming tokenises in one process (drop --workers)")
    prefix = dataset_prefix(args.output_prefix)
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    base = prefix[: -len(DOCUMENT_SUFFIX)]
    model_path = base + ".model" if args.train_tokenizer else None
    outputs = [bin_path, idx_path] + ([model_path] if model_path else [])
    existing = [p for p in outputs if os.path.exists(p)]
    if existing and not args.overwrite:
        raise DataError(
            f"{existing[0]} already exists; refusing to overwrite it (pass --overwrite)"
        )
    files = _expand_inputs(args.input) if args.input else []
    source = ", ".join(files) if files else f"--hf-dataset {args.hf_dataset}"
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
        streaming = n_empty is None
        if not streaming and len(ds) == 0:
            raise DataError(f"no non-empty documents in {source}")
        if tokenizer is None:
            texts = (r["text"] for r in ds) if streaming else ds["text"]
            proto = train_tokenizer(
                document_lines(texts),
                args.vocab_size,
                args.tokenizer_type,
                num_threads=args.workers,
                max_sentences=args.tokenizer_max_sentences,
                source=source,
            )
            with open(os.path.join(work, "tokenizer.model"), "wb") as f:
                f.write(proto)
            tokenizer = Tokenizer.from_proto(proto, model_path)

        tok = tokenizer
        if streaming:  # one pass over the stream, in batches
            docs = (row for batch in ds.iter(batch_size=1024)
                    for row in tok.encode_batch(batch["text"]))
        else:
            ids = ds.map(
                lambda b: {"ids": tok.encode_batch(b["text"])},
                batched=True,
                num_proc=args.workers if args.workers > 1 else None,
                remove_columns=["text"],
                desc="tokenising",
            )
            docs = (row for batch in ids.iter(batch_size=1024) for row in batch["ids"])
        tmp_prefix = os.path.join(work, "data")
        n_docs, n_tokens = write_indexed_dataset(
            tmp_prefix, docs, vocab_size=tok.vocab_size, eod=tok.eod
        )
        if n_docs == 0:
            raise DataError(f"no non-empty documents in {source}")
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
    return {"documents": n_docs, "tokens": n_tokens, "empty_skipped": n_empty or 0,
            "prefix": prefix}


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
