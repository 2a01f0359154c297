import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.perf import reuse_freed_cpu_memory  # noqa: E402

reuse_freed_cpu_memory()  # in-process tests allocate like the CPU trainer does


@pytest.fixture(scope="session")
def moefold_cache(tmp_path_factory) -> Path:
    """One data/tokenizer cache for the whole session (the builtin corpus builds once)."""
    path = tmp_path_factory.mktemp("moefold_cache")
    os.environ["MOEFOLD_CACHE"] = str(path)
    return path
