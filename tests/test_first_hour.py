"""The first hour of a new user, as the README tells it: data by name (a Hugging Face
dataset, a Hugging Face tokenizer), the README's own commands, and what N processes print.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.preprocess_data import main as preprocess_main
from tests.helpers import FAST, REPO, read_metrics
from trainer import data as D

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in a container; raise TypeError otherwise.",
    "Unicode survives: café, naïve, Grüße, and  double  spaces.",
    "",  # empty: skipped
    "Numbers 3.14159 and 2024-01-31, trailing space ",
] * 8


def _read_docs(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _hf_tokenizer(out_dir: Path) -> Path:
    """A tiny byte-level BPE trained with `tokenizers`, saved as out_dir/tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([t for t in TEXTS if t], trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tk.save(str(out_dir / "tokenizer.json"))
    return out_dir


def _saved_dataset(path: Path) -> Path:
    import datasets

    datasets.Dataset.from_dict(
        {"content": TEXTS, "id": list(range(len(TEXTS)))}).save_to_disk(str(path))
    return path


def test_hf_dataset_from_disk_with_sentencepiece(tmp_path, capsys):
    """--hf-dataset on a directory written by Dataset.save_to_disk; Megatron naming."""
    ds = _saved_dataset(tmp_path / "ds")
    out = tmp_path / "out" / "corpus"
    rc = preprocess_main(["--hf-dataset", str(ds), "--text-key", "content",
                          "--output-prefix", str(out), "--train-tokenizer",
                          "--vocab-size", "400", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    tok = D.Tokenizer(f"{out}.model")
    docs = [t for t in TEXTS if t]
    assert _read_docs(f"{out}_text_document") == [tok.encode(d) + [tok.eod] for d in docs]
    # a missing column is one line naming the columns there are
    rc = preprocess_main(["--hf-dataset", str(ds), "--output-prefix", str(tmp_path / "x"),
                          "--tokenizer-model", f"{out}.model"])
    assert rc == 2 and "no column 'text' (columns: content, id)" in capsys.readouterr().err
    # --streaming gives the same tokens
    rc = preprocess_main(["--hf-dataset", str(ds), "--text-key", "content", "--streaming",
                          "--output-prefix", str(tmp_path / "s"), "--tokenizer-model",
                          f"{out}.model", "--quiet"])
    assert rc == 0
    assert _read_docs(str(tmp_path / "s_text_document")) == _read_docs(f"{out}_text_document")


def test_hf_tokenizer_preprocess_and_train_one_step(tmp_path, moefold_cache, capsys):
    """A Hugging Face tokenizer (dir or tokenizer.json) preprocesses and trains."""
    tok_dir = _hf_tokenizer(tmp_path / "hf_tok")
    tok = D.Tokenizer(str(tok_dir))
    assert tok.kind == "hf" and tok.eod == 1 and tok.pad == 2
    assert D.Tokenizer(str(tok_dir / "tokenizer.json")).sha256 == tok.sha256
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    import pickle

    assert pickle.loads(pickle.dumps(tok)).encode(TEXTS[0]) == tok.encode(TEXTS[0])

    ds = _saved_dataset(tmp_path / "ds")
    out = tmp_path / "data" / "hf"
    rc = preprocess_main(["--hf-dataset", str(ds), "--text-key", "content",
                          "--output-prefix", str(out), "--tokenizer-model", str(tok_dir),
                          "--workers", "2", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    prefix = f"{out}_text_document"
    assert _read_docs(prefix) == [tok.encode(d) + [tok.eod] for d in TEXTS if d]

    from tests.inproc import train_here

    run_dir = tmp_path / "run"
    train_here([*FAST, "data=indexed", f"data.blend=[{prefix}]",
                f"data.tokenizer_model={tok_dir}", "data.split='90,10,0'",
                f"model.vocab_size={tok.vocab_size}", "trainer.max_steps=1",
                "checkpoint.save_final=false"], run_dir, moefold_cache)
    assert read_metrics(run_dir)[1]["loss"] > 0


# -- what N processes print -------------------------------------------------------------
def _launch(nproc: int, overrides: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MOEFOLD_CACHE=str(cache),
               WANDB_SILENT="true", PYTHON=sys.executable)
    return subprocess.run(["bash", "launch/torchrun.sh", str(nproc), *overrides], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.distributed
def test_two_processes_print_once_without_fsdp_view_warning(tmp_path, moefold_cache):
    """launch/torchrun.sh 2 on an EP2 run (FSDP2 over the experts): every INFO line once,
    rank 1's Hydra log in train_rank1.log, no FSDP "returned a view tensor" warning."""
    run_dir = tmp_path / "ep2"
    p = _launch(2, [*FAST, "parallel.ep=2", "trainer.max_steps=2", "checkpoint.every=0",
                    "checkpoint.save_final=false", f"run_dir={run_dir}"], moefold_cache)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "view tensor" not in out
    assert out.count("MoE layers;") == 1 and out.count("step 2/2") == 1
    assert out.count("][INFO] - data:") == 1, out  # Hydra's job log: rank 0 only
    assert "[rank 1]" not in out  # nothing to warn about
    assert (run_dir / "train.log").read_text().count("data:") == 1
    assert (run_dir / "train_rank1.log").read_text().count("data:") == 1


@pytest.mark.distributed
def test_one_error_line_under_torchrun(tmp_path, moefold_cache):
    p = _launch(2, [*FAST, "model.num_kv_heads=3", f"run_dir={tmp_path / 'bad'}"],
                moefold_cache)
    assert p.returncode == 2
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "error" in ln.lower()]
    assert lines == ["error: model.num_kv_heads=3 does not divide model.num_heads=4 "
                     "(valid: 1, 2, 4)"], p.stdout + p.stderr
