import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import distributed_utils  # noqa: E402
from trainer.perf import reuse_freed_cpu_memory  # noqa: E402

reuse_freed_cpu_memory()  # in-process tests allocate like the CPU trainer does


@pytest.fixture(scope="session")
def moefold_cache(tmp_path_factory) -> Path:
    """One data/tokenizer cache for the whole session (the builtin corpus builds once)."""
    path = tmp_path_factory.mktemp("moefold_cache")
    os.environ["MOEFOLD_CACHE"] = str(path)
    return path


# Every spawned rank of the session forks with the trainer already imported (tests/inproc.py).
distributed_utils.PRELOAD.append("tests.inproc")


@pytest.fixture(scope="session")
def single_run(tmp_path_factory, moefold_cache):
    """``single_run(overrides) -> run_dir``: one single-process training run in this
    process (tests/inproc.py), done once per distinct overrides for the whole session, so
    modules whose references are the same run share it."""
    from tests.inproc import train_here

    runs: dict[tuple[str, ...], Path | BaseException] = {}

    def get(overrides: list[str]) -> Path:
        key = tuple(overrides)
        if key not in runs:
            run_dir = tmp_path_factory.mktemp("single")
            try:
                train_here(list(overrides), run_dir, moefold_cache)
                runs[key] = run_dir
            except Exception as e:  # every test that needs this run fails with it
                runs[key] = e
        if isinstance(runs[key], BaseException):
            raise runs[key]
        return runs[key]

    return get
