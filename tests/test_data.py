"""Data pipeline: preprocessing CLI, tokenizer, builtin corpus cache, Megatron datasets,
micro-batch layout, and the errors users see."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from scripts.preprocess_data import main as preprocess_main
from trainer import data as D
from trainer.config import DataConfig
from trainer.data import corpus as C
from trainer.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in a container; raise TypeError otherwise.",
    "  Indented code:\n    for i in range(10):\n\tprint(i ** 2)  # tab & spaces\n",
    "Unicode survives: café, naïve, Grüße, 日本語, emoji 🐍, and  double  spaces.",
    "Numbers 3.14159 and 2024-01-31, trailing space ",
]


def _topics() -> list[str]:
    """Real English text, cheap to get: Python's pydoc topics (part of the builtin corpus)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _read_docs(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture(scope="session")
def builtin(moefold_cache) -> dict:
    """The embedded corpus, built once per session (shared with other tests' cache)."""
    prefix, model = D.prepare_builtin_corpus(moefold_cache, 2048)
    with open(os.path.join(os.path.dirname(prefix), "meta.json")) as f:
        meta = json.load(f)
    return {"cache": Path(moefold_cache), "prefix": prefix, "model": model, "meta": meta}


def _indexed_cfg(cache: Path, blend: list, model: str, split: str = "90,10,0") -> DataConfig:
    return DataConfig(
        source="indexed", blend=blend, tokenizer_model=model, split=split, cache_dir=str(cache)
    )


def _build(cfg: DataConfig, model_vocab_size: int = 2048, **kw) -> D.PretrainData:
    args = dict(
        seq_len=16,
        seed=1234,
        global_batch_size=8,
        train_samples=400,
        valid_samples=16,
        model_cfg=NS(vocab_size=model_vocab_size),
    )
    args.update(kw)
    return D.build_data(cfg, **args)


# -- tokenizer and builtin corpus -----------------------------------------------------------
def test_builtin_tokenizer_roundtrip_and_documents(builtin):
    tok = D.Tokenizer(builtin["model"])
    assert tok.vocab_size == 2048
    assert (tok.eod, tok.pad) == (2, 3) and tok.eod != tok.pad
    for s in SENTENCES:
        ids = tok.encode(s)
        assert ids and max(ids) < tok.vocab_size and tok.eod not in ids
        assert tok.decode(ids) == s
    # The indexed dataset holds exactly encode(doc) + [eod] per document, in order.
    docs = D.builtin_documents()
    stored = _read_docs(builtin["prefix"])
    assert len(stored) == len(docs) == builtin["meta"]["documents"]
    assert stored == [ids + [tok.eod] for ids in tok.encode_batch(docs)]
    assert sum(map(len, stored)) == builtin["meta"]["tokens"]


def test_builtin_corpus_is_cached(builtin, monkeypatch):
    files = sorted(Path(builtin["prefix"]).parent.iterdir())
    before = {p: p.stat().st_mtime_ns for p in files}

    def boom(*a, **k):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(C, "train_tokenizer", boom)
    monkeypatch.setattr(C, "write_indexed_dataset", boom)
    assert D.prepare_builtin_corpus(builtin["cache"], 2048) == (builtin["prefix"], builtin["model"])
    assert {p: p.stat().st_mtime_ns for p in files} == before
    # No temp dirs left behind by the first build.
    assert not [p for p in builtin["cache"].iterdir() if p.name.startswith(".tmp")]


def test_tokenizer_training_is_deterministic():
    lines = list(D.document_lines(_topics()[:40]))
    a = D.train_tokenizer(lines, 512)
    b = D.train_tokenizer(lines, 512)
    assert a == b
    tok = D.Tokenizer.from_proto(a)
    assert tok.vocab_size == 512 and tok.eod == 2
    for s in SENTENCES:
        assert tok.decode(tok.encode(s)) == s


def test_stdlib_docstring_extraction():
    # The optional part of the builtin corpus (off by default; see builtin_documents).
    src = (
        b'"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n'
        b'        """Method doc."""\n        return "not a doc"\nasync def g():\n    pass\n'
    )
    assert C._module_docstrings(src) == "Module doc.\n\nClass doc.\n\nMethod doc."
    assert C._module_docstrings(b"def broken(:") == ""
    files = dict(C._stdlib_sources())
    assert "os.py" in files and os.path.join("json", "decoder.py") in files
    assert not [r for r in files if "site-packages" in r or r.startswith("test")]


def test_publish_race_loser_discards_its_copy(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "meta.json").write_text("{}")
    (final / "data").write_text("winner")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "meta.json").write_text("{}")
    (tmp / "data").write_text("loser")
    C._publish_dir(str(tmp), str(final), "meta.json")
    assert (final / "data").read_text() == "winner" and not tmp.exists()
    # An incomplete destination is reported, not silently replaced.
    (final / "meta.json").unlink()
    tmp.mkdir()
    (tmp / "meta.json").write_text("{}")
    with pytest.raises(DataError, match="incomplete"):
        C._publish_dir(str(tmp), str(final), "meta.json")


# -- preprocessing CLI ----------------------------------------------------------------------
def _write_inputs(root: Path) -> dict[str, list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    topics = _topics()[:60]
    jsonl, parquet, files = topics[:30], topics[30:40], topics[40:42]
    with open(root / "a.jsonl", "w") as f:
        for doc in jsonl:
            f.write(json.dumps({"body": doc, "id": 1}) + "\n")
        f.write(json.dumps({"body": "", "id": 2}) + "\n")  # empty: skipped
    pq.write_table(pa.table({"body": parquet}), root / "b.parquet")
    for i, doc in enumerate(files):
        (root / f"c{i}.txt").write_text(doc)
    # Paragraphs: no blank line inside, separated by one or more blank lines.
    paragraphs = [re.sub(r"\n{2,}", "\n", p).strip("\n") for p in topics[42:46]]
    (root / "d.txt").write_text(
        "\n\n".join(paragraphs[:2]) + "\n\n\n\n" + "\n\n".join(paragraphs[2:])
    )
    return {"jsonl": jsonl, "parquet": parquet, "txt": files, "paragraphs": paragraphs}


def test_preprocess_roundtrip(tmp_path, capsys):
    src = _write_inputs(tmp_path)
    out = tmp_path / "out" / "corpus"
    rc = preprocess_main(
        [
            "--input", str(tmp_path / "*.jsonl"), str(tmp_path / "b.parquet"),
            str(tmp_path / "c*.txt"),
            "--text-key", "body", "--output-prefix", str(out),
            "--train-tokenizer", "--vocab-size", "700", "--workers", "2", "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    assert "42 documents" in capsys.readouterr().out
    tok = D.Tokenizer(str(out) + ".model")
    assert tok.vocab_size == 700
    for s in SENTENCES:
        assert tok.decode(tok.encode(s)) == s
    docs = src["jsonl"] + src["parquet"] + src["txt"]
    # Megatron's naming: <prefix>_text_document.{bin,idx}, the tokenizer at <prefix>.model
    assert _read_docs(f"{out}_text_document") == [tok.encode(d) + [tok.eod] for d in docs]
    assert D.check_indexed_dataset(f"{out}_text_document") == len(docs)

    # Blank-line separated .txt with an existing tokenizer: one document per paragraph.
    out2 = tmp_path / "out" / "paras"
    rc = preprocess_main(
        [
            "--input", str(tmp_path / "d.txt"), "--txt-doc-sep", "blankline",
            "--output-prefix", str(out2), "--tokenizer-model", str(out) + ".model", "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    assert _read_docs(f"{out2}_text_document") == [
        tok.encode(p) + [tok.eod] for p in src["paragraphs"]]
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]


def test_preprocess_refuses_to_overwrite(tmp_path, builtin, capsys):
    (tmp_path / "x.txt").write_text("first version of the document")
    out = str(tmp_path / "x_text_document")  # already Megatron's name: used as is
    args = ["--input", str(tmp_path / "x.txt"), "--output-prefix", out]
    args += ["--tokenizer-model", builtin["model"], "--quiet"]
    assert preprocess_main(args) == 0
    before = Path(out + ".bin").read_bytes()
    (tmp_path / "x.txt").write_text("second, different version of the document")
    capsys.readouterr()
    assert preprocess_main(args) == 2
    err = capsys.readouterr().err
    assert f"{out}.bin already exists" in err and "--overwrite" in err
    assert Path(out + ".bin").read_bytes() == before
    assert preprocess_main(args + ["--overwrite"]) == 0
    tok = D.Tokenizer(builtin["model"])
    assert _read_docs(out) == [tok.encode("second, different version of the document") + [2]]
    # A bad input is a one-line error, not a traceback.
    assert preprocess_main(["--input", str(tmp_path / "nope*.jsonl"), "--output-prefix",
                            str(tmp_path / "y"), "--tokenizer-model", builtin["model"]]) == 2  # fmt: skip
    assert "no such file" in capsys.readouterr().err


# -- datasets and batches -------------------------------------------------------------------
def _disjoint_datasets(root: Path, tok: D.Tokenizer) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    prefixes = []
    for name, (lo, hi) in (("a", (10, 500)), ("b", (1000, 1500))):
        docs = [rng.integers(lo, hi, size=int(rng.integers(5, 60))).tolist() for _ in range(300)]
        prefix = str(root / name)
        D.write_indexed_dataset(prefix, docs, vocab_size=tok.vocab_size, eod=tok.eod)
        prefixes.append(prefix)
    return prefixes[0], prefixes[1]


def test_blend_weights_respected(tmp_path, builtin):
    tok = D.Tokenizer(builtin["model"])
    a, b = _disjoint_datasets(tmp_path, tok)
    cfg = _indexed_cfg(tmp_path / "cache", [0.75, a, 0.25, b], builtin["model"])
    data = _build(cfg, train_samples=2000)
    assert data.num_train_samples >= 2000

    def source(tokens: torch.Tensor) -> str:
        t = tokens[tokens != tok.eod]
        if bool(((t >= 10) & (t < 500)).all()):
            return "a"
        assert bool(((t >= 1000) & (t < 1500)).all()), "a sample mixes datasets"
        return "b"

    batches = [data.train_microbatches(c, 8, 0, 1)[0] for c in range(0, 2000, 8)]
    labels = [source(row) for mb in batches for row in mb["tokens"]]
    frac_a = labels.count("a") / len(labels)
    assert abs(frac_a - 0.75) <= 0.05
    # Interleaved, not one dataset after the other: holds in the first 200 samples too.
    assert abs(labels[:200].count("a") / 200 - 0.75) <= 0.05


def test_order_depends_only_on_seed(tmp_path, builtin):
    def first_batches(cache: str, seed: int) -> torch.Tensor:
        cfg = _indexed_cfg(tmp_path / cache, [builtin["prefix"]], builtin["model"], "98,2,0")
        data = _build(cfg, seed=seed)
        return torch.cat([data.train_microbatches(c, 4, 0, 1)[0]["tokens"] for c in (0, 8)])

    a = first_batches("c1", 1)
    assert torch.equal(a, first_batches("c2", 1))  # rebuilt from scratch: same order
    assert not torch.equal(a, first_batches("c3", 2))


def test_microbatches_resumable_and_partitioned(tmp_path, builtin):
    cfg = _indexed_cfg(tmp_path, [builtin["prefix"]], builtin["model"], "98,2,0")
    data = _build(cfg, seq_len=32)
    g = data.global_batch_size
    fresh = data.train_microbatches(24, 2, 0, 1)
    again = _build(cfg, seq_len=32)
    for c in (0, 8, 16):
        again.train_microbatches(c, 2, 0, 1)
    resumed = again.train_microbatches(24, 2, 0, 1)
    for x, y in zip(fresh, resumed, strict=True):
        for k in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(x[k], y[k])

    # dp=1: the global batch is samples [c, c+G) of Megatron's dataset, in order.
    mbs1 = data.train_microbatches(24, 2, 0, 1)
    whole = torch.cat([mb["tokens"] for mb in mbs1])
    oracle = torch.stack([data.train_dataset[24 + j]["tokens"] for j in range(g)])
    assert torch.equal(whole, oracle)
    mb = mbs1[0]
    assert mb["tokens"].shape == (2, 32) and mb["tokens"].dtype == torch.int64
    assert mb["labels"].dtype == torch.int64 and mb["position_ids"].dtype == torch.int64
    assert mb["loss_mask"].dtype == torch.float32
    assert torch.equal(mb["labels"][:, :-1], mb["tokens"][:, 1:])
    assert torch.equal(mb["position_ids"][0], torch.arange(32))

    # dp=2: micro-batch i of rank r holds samples c + (i*dp + r)*mbs ...: a partition.
    r0 = data.train_microbatches(24, 2, 0, 2)
    r1 = data.train_microbatches(24, 2, 1, 2)
    assert len(r0) == len(r1) == 2
    interleaved = torch.cat([t for i in range(2) for t in (r0[i]["tokens"], r1[i]["tokens"])])
    assert torch.equal(interleaved, whole)

    with pytest.raises(ValueError, match="not a multiple"):
        data.train_microbatches(0, 3, 0, 1)
    with pytest.raises(ValueError, match="outside"):
        data.train_microbatches(data.num_train_samples, 2, 0, 1)


def test_valid_microbatches_wrap(tmp_path, builtin):
    cfg = _indexed_cfg(tmp_path, [builtin["prefix"]], builtin["model"], "98,2,0")
    data = _build(cfg)
    n, g = data.num_valid_samples, data.global_batch_size
    assert n >= g
    it = n // g + 1  # past the end: wraps around
    got = torch.cat([mb["tokens"] for mb in data.valid_microbatches(it, 4, 0, 1)])
    want = torch.stack([data.valid_dataset[(it * g + j) % n]["tokens"] for j in range(g)])
    assert torch.equal(got, want)
    assert torch.equal(
        got, torch.cat([mb["tokens"] for mb in data.valid_microbatches(it, 4, 0, 1)])
    )


def test_builtin_source_via_config(builtin):
    cfg = DataConfig(cache_dir=str(builtin["cache"]))  # source=builtin, vocab 2048
    data = _build(cfg)
    assert data.prefixes == [builtin["prefix"]]
    assert data.tokenizer.sha256 == D.Tokenizer(builtin["model"]).sha256
    assert data.num_valid_samples > 0


# -- errors ---------------------------------------------------------------------------------
def test_missing_prefix_names_path(tmp_path, builtin):
    missing = str(tmp_path / "nowhere" / "corpus")
    with pytest.raises(DataError, match=f"{missing}.bin not found"):
        _build(_indexed_cfg(tmp_path, [missing], builtin["model"]))
    with pytest.raises(DataError, match="tokenizer model .*nope.model not found"):
        _build(_indexed_cfg(tmp_path, [builtin["prefix"]], str(tmp_path / "nope.model")))


def test_corrupt_index_names_path(tmp_path, builtin):
    prefix = str(tmp_path / "copy")
    shutil.copyfile(builtin["prefix"] + ".bin", prefix + ".bin")
    idx = Path(builtin["prefix"] + ".idx").read_bytes()
    Path(prefix + ".idx").write_bytes(idx[: len(idx) // 2])
    with pytest.raises(DataError, match=f"{prefix}.idx is corrupt or truncated"):
        _build(_indexed_cfg(tmp_path, [prefix], builtin["model"]))
    Path(prefix + ".idx").write_bytes(b"garbage!" * 10)
    with pytest.raises(DataError, match=f"{prefix}.idx is corrupt"):
        D.check_indexed_dataset(prefix)
    # Intact index, truncated data file.
    Path(prefix + ".idx").write_bytes(idx)
    data = Path(builtin["prefix"] + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(data[:-100])
    with pytest.raises(DataError, match=f"{prefix}.bin has"):
        D.check_indexed_dataset(prefix)


def test_config_errors(tmp_path, builtin):
    cfg = _indexed_cfg(tmp_path, [builtin["prefix"]], builtin["model"])
    with pytest.raises(ConfigError) as err:
        _build(cfg, model_vocab_size=1000)
    assert str(err.value) == "data tokenizer has 2048 tokens but model.vocab_size=1000"
    with pytest.raises(ConfigError, match="has 4096 tokens but model.vocab_size=2048"):
        _build(DataConfig(builtin_vocab_size=4096, cache_dir=str(tmp_path)))  # before building
    assert not (tmp_path / "indices").exists()
    with pytest.raises(ConfigError, match="data.blend"):
        _build(_indexed_cfg(tmp_path, [0.5, builtin["prefix"], 0.5], builtin["model"]))
    with pytest.raises(ConfigError, match="data.split"):
        _build(_indexed_cfg(tmp_path, [builtin["prefix"]], builtin["model"], split="x"))
    with pytest.raises(ConfigError, match="tokenizer_model"):
        _build(_indexed_cfg(tmp_path, [builtin["prefix"]], ""))
    # A split that leaves no validation document is caught before Megatron loops on it.
    tok = D.Tokenizer(builtin["model"])
    small = str(tmp_path / "small")
    D.write_indexed_dataset(small, [[5, 6, 7]] * 10, vocab_size=2048, eod=tok.eod)
    with pytest.raises(ConfigError, match="no valid documents"):
        _build(_indexed_cfg(tmp_path, [small], builtin["model"], split="98,2,0"))


def test_build_data_picks_by_source(builtin):
    data = _build(DataConfig(cache_dir=str(builtin["cache"])))
    assert isinstance(data, D.PretrainData) and isinstance(data, D.TrainData)
    assert D.BUILDERS["builtin"] is D.BUILDERS["indexed"] is D.build_indexed


def test_unknown_source_is_the_config_error(tmp_path):
    from tests.helpers import compose_config
    from trainer.config import validate

    with pytest.raises(ConfigError) as err:
        _build(NS(source="web", cache_dir=str(tmp_path)))
    assert str(err.value) == "data.source='web' is not one of 'builtin', 'indexed', 'multimodal'"
    # trainer.config.validate accepts exactly the sources build_data can build
    with pytest.raises(ConfigError) as validated:
        validate(compose_config(["data.source=web"]), world_size=1)
    assert str(validated.value) == str(err.value)


def test_parse_blend():
    assert D.parse_blend(["/a"]) == (["/a"], None)
    assert D.parse_blend(["/a", "/b"]) == (["/a", "/b"], None)
    assert D.parse_blend([3, "/a", "1", "/b"]) == (["/a", "/b"], [3.0, 1.0])
    for bad in ([], [1.0], [1.0, "/a", "/b"], [-1, "/a"]):
        with pytest.raises(ConfigError):
            D.parse_blend(bad)


# -- with torch.distributed initialised -----------------------------------------------------
def _dist_worker(rank: int, world: int, cache: str) -> list[torch.Tensor]:
    """On a rank of an initialised gloo group (tests/distributed_utils.py)."""
    import torch.distributed as dist

    data = D.build_data(DataConfig(cache_dir=cache), seq_len=24, seed=7, global_batch_size=8,
                        train_samples=64, valid_samples=8, model_cfg=NS(vocab_size=2048),
                        rank=rank, world_size=world)
    mbs = data.train_microbatches(8, 2, rank, world)
    dist.barrier()
    return [mb["tokens"] for mb in mbs]


@pytest.mark.distributed
def test_build_with_distributed_initialised(builtin):
    from tests.distributed_utils import spawn

    ranks = spawn(_dist_worker, 2, str(builtin["cache"]), timeout_s=300)

    # Same samples as the single-process reference, partitioned over the two DP ranks.
    data = D.build_data(
        DataConfig(cache_dir=str(builtin["cache"])), seq_len=24, seed=7, global_batch_size=8,
        train_samples=64, valid_samples=8, model_cfg=NS(vocab_size=2048),
    )  # fmt: skip
    ref = torch.cat([mb["tokens"] for mb in data.train_microbatches(8, 2, 0, 1)])
    got = torch.cat([t for i in range(2) for t in (ranks[0][i], ranks[1][i])])
    assert torch.equal(got, ref)
