"""The first hour of a new user, as the README tells it: data by name (a Hugging Face
dataset, a Hugging Face tokenizer), the README's own commands, and what N processes print.
"""

from __future__ import annotations

import json
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
    for attempt in ("ep2", "ep2_again"):
        run_dir = tmp_path / attempt
        p = _launch(2, [*FAST, "parallel.ep=2", "trainer.max_steps=2", "checkpoint.every=0",
                        "checkpoint.save_final=false", f"run_dir={run_dir}"], moefold_cache)
        out = p.stdout + p.stderr
        # Seen once in CI (loaded machine, not reproduced in 13 runs here): rank 0 aborted
        # in C++ teardown after its last step ("terminate called without an active
        # exception", SIGABRT; one Python thread left, groups destroyed). As
        # tests/inproc.py does for a rank killed by a signal, that case alone gets one
        # more run; any other failure, or a second abort, fails the test.
        if not (p.returncode and "step 2/2" in out and "SIGABRT" in out):
            break
        print(f"retrying once after a teardown abort: {out[-600:]}", flush=True)
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


# -- the README's commands, as written --------------------------------------------------
def readme_commands() -> list[str]:
    """Every command of README.md's fenced bash blocks (continuation lines joined,
    comments dropped)."""
    text = (REPO / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = re.sub(r"\s+#.*$", "", cmd).strip()
            if cmd and not cmd.startswith("#"):
                cmds.append(re.sub(r"\s+", " ", cmd))
    return cmds


# Run as written, with these appended (tiny step counts, a temporary run_dir). The README's
# other commands are not run here: `make demo`/`make test` (the set-up itself, what CI
# runs), `source .venv/bin/activate` (shell state), `moefold-train` (the console script of
# `trainer.train:main`, only on PATH after `make install`), launch/torchrun.sh N (multi-
# process layouts: tests/test_parity_distributed.py and the tests above), sbatch (needs
# Slurm), the multimodal/jamba runs and compare_dense_vs_mot (minutes on CPU; their
# presets are covered by tests/test_mot.py, tests/test_mamba.py, tests/test_presets.py).
TINY = ["trainer.max_steps=2", "trainer.eval_every=0", "trainer.seq_len=32",
        "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "logger.console=plain",
        "logger.tensorboard=false", "logger.expert_load_every=0", "checkpoint.every=0",
        "checkpoint.save_final=false"]
RUN_TRAIN = ("python -m trainer.train", "python -m trainer.train model=dense_tiny",
             "python -m trainer.train model.moe.num_experts=16",
             "python -m trainer.train run_dir=runs/exp1",
             "python -m trainer.train data=indexed")


def _run(cmd: str, tmp: Path, cache: Path, extra: list[str] = ()) -> str:
    argv = shlex.split(cmd) + list(extra)
    assert argv[0] == "python"
    env = dict(os.environ, OMP_NUM_THREADS="1", MOEFOLD_CACHE=str(cache), WANDB_SILENT="true")
    p = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path, moefold_cache):
    cmds = readme_commands()
    for must in ("make demo", "make test", "source .venv/bin/activate"):
        assert must in cmds
    train = [c for c in cmds if c == RUN_TRAIN[0] or c.startswith(RUN_TRAIN[1:])]
    assert len(train) == len(RUN_TRAIN), train
    # ~6 s each on a loaded CPU: the default, the MoE options and your own data run; the
    # dense_tiny and run_dir=runs/exp1 lines are checked to be there (same entry point,
    # different overrides covered by tests/test_train_e2e.py).
    train = [train[0], train[2], train[4]]
    pre = [c for c in cmds if c.startswith("python scripts/preprocess_data.py")]
    plot = [c for c in cmds if c.startswith("python scripts/plot_metrics.py")]
    assert len(pre) == 1 and len(plot) == 1

    # Your own data: the README's files under data/ live in tmp; the vocabulary shrinks
    # from 32000 to what a few kilobytes of text can train (the only edit to the command).
    data = tmp_path / "data"
    data.mkdir()
    from pydoc_data.topics import topics

    with open(data / "docs.jsonl", "w") as f:
        for k in sorted(topics)[:40]:
            f.write(json.dumps({"text": topics[k]}) + "\n")
    own = lambda c: c.replace("data/", f"{data}/").replace("32000", "1000")  # noqa: E731
    out = _run(own(pre[0]), tmp_path, moefold_cache)
    assert f"{data}/corpus_text_document.bin" in out

    runs = {}
    for i, cmd in enumerate(train):
        run_dir = tmp_path / f"run{i}"
        if cmd.startswith("python -m trainer.train data=indexed"):
            cmd = own(cmd)
        _run(cmd, tmp_path, moefold_cache, [*TINY, f"run_dir={run_dir}"])
        runs[cmd] = read_metrics(run_dir)
        assert sorted(runs[cmd]) == [1, 2]
    png = tmp_path / "loss.png"
    _run(plot[0].replace("runs/demo/<timestamp>", str(tmp_path / "run0"))
         .replace("loss.png", str(png)), tmp_path, moefold_cache)
    assert png.stat().st_size > 0


def test_help_describes_every_key():
    from trainer.config import key_descriptions

    rows = key_descriptions()
    assert not [k for k, d in rows if not d]
    p = subprocess.run([sys.executable, "-m", "trainer.train", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "model: " in p.stdout and "== Keys ==" in p.stdout
    for key, _ in rows:
        assert re.search(rf"^  {re.escape(key)} ", p.stdout, flags=re.M), key
