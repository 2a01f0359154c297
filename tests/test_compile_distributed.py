"""``parallel.compile=true`` (regional torch.compile of each block) trains exactly like
eager: one process compiled vs eager, and compiled layouts on 2 gloo ranks (EP with
activation checkpointing and dp_engine=auto; CP with FSDP; the two-batch overlap with
FSDP) vs the eager single process,
in one spawned process group (tests/inproc.py). The backend is aot_eager:
it runs dynamo (graph capture, graph breaks, guards) and AOTAutograd (the joint
forward/backward graph) like inductor does, without inductor's C++ code generation,
which costs minutes per layout on a shared 2-core CPU."""

from __future__ import annotations

import pytest

from tests.helpers import read_metrics
from tests.inproc import LazyRuns, selected_ids
from tests.parity import check_metrics, check_model
from tests.test_parity_distributed import COMMON, MODES, STEPS, _final_model

pytestmark = [pytest.mark.distributed]


@pytest.mark.parametrize("overrides, world, match", [
    (["parallel.compile=true", "parallel.tp=2"], 2, r"^parallel.compile=true with parallel"
     r"\.tp=2 is not supported yet"),
    (["parallel.compile_backend=tvm"], 1, "parallel.compile_backend='tvm'"),
])
def test_uncompilable_settings_fail_in_validation(overrides, world, match):
    from tests.helpers import compose_config
    from trainer.config import ConfigError, validate

    with pytest.raises(ConfigError, match=match) as e:
        validate(compose_config(overrides), world)
    assert "\n" not in str(e.value)

COMPILE = ["parallel.compile=true", "parallel.compile_backend=aot_eager"]
LAYOUTS = [
    ("ep2_ac_auto_compiled", 2,
     ["parallel.ep=2", "parallel.activation_checkpointing=true", "parallel.dp_engine=auto"]),
    ("cp2_fsdp_compiled", 2, ["parallel.cp=2", "parallel.dp_engine=fsdp"]),
    # the two-batch overlap compiles the blocks' whole-call submodules (FSDP units too)
    ("ep2_two_batch_fsdp_compiled", 2,
     ["parallel.ep=2", "parallel.dp_engine=fsdp", "parallel.two_batch_overlap=true"]),
]


def _check(run_dir, ref_metrics, ref_model, name: str) -> None:
    check_metrics(read_metrics(run_dir), ref_metrics, range(1, STEPS + 1), name)
    # compiling leaves the parameter names alone
    check_model(_final_model(run_dir), ref_model, name)


@pytest.fixture(scope="module")
def eager_reference(single_run):
    run_dir = single_run([*COMMON, *MODES["dropless"]])  # shared with the parity tests
    return read_metrics(run_dir), _final_model(run_dir)


def test_compiled_single_process_matches_eager(single_run, eager_reference):
    _check(single_run([*COMMON, *MODES["dropless"], *COMPILE]), *eager_reference, "compiled")


@pytest.fixture(scope="module")
def compiled_runs(request, tmp_path_factory, moefold_cache):
    jobs = {name: (n, [*COMMON, *MODES["dropless"], *COMPILE, *extra])
            for name, n, extra in LAYOUTS}
    return LazyRuns(tmp_path_factory.mktemp("compiled"), moefold_cache, jobs,
                    selected_ids(request, test_compiled_layout_matches_eager_single_process))


@pytest.mark.parametrize("name, nproc, extra", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_compiled_layout_matches_eager_single_process(name, nproc, extra, compiled_runs,
                                                      eager_reference):
    _check(compiled_runs(name), *eager_reference, name)
