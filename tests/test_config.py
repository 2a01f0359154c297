"""Config composition and validation: every preset composes; bad values fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from tests.helpers import REPO, compose_config
from trainer.config import ConfigError, validate

PRESETS = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_model_preset_composes_and_validates(preset):
    cfg = compose_config([f"model={preset}"])
    validate(cfg, world_size=1)
    assert cfg.model.name == preset


def test_demo_experiment_composes():
    cfg = compose_config(["experiment=demo"])
    validate(cfg, world_size=1)
    assert cfg.trainer.max_steps == 300 and cfg.experiment == "demo"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_kv_heads=3"], "model.num_kv_heads=3 does not divide model.num_heads=4"),
        (["model.moe.top_k=9"], "model.moe.top_k=9 must be in 1..model.moe.num_experts=8"),
        (["model.moe.score_func=relu"], "model.moe.score_func='relu' is not one of"),
        (
            ["model.moe.num_groups=3", "model.moe.group_topk=1"],
            "model.moe.num_groups=3 does not divide",
        ),
        (
            ["trainer.global_batch_size=6", "trainer.micro_batch_size=4"],
            "trainer.global_batch_size=6",
        ),
        (["optim.min_lr=1.0"], "optim.min_lr=1.0 must be in [0, optim.lr"),
        (["trainer.seq_len=4096"], "exceeds model.max_seq_len"),
        (["parallel.tp=2"], "parallel.tp=2 does not fit world size 1"),
        (["parallel.ddp_bucket_mb=0"], "parallel.ddp_bucket_mb=0.0 must be > 0"),
        (["data=indexed"], "data.source=indexed needs data.blend"),
        (
            ["model.moe.layer_freq=[1,0]"],
            "model.moe.layer_freq=[1, 0] must have model.num_layers=4",
        ),
        # multimodal / MoT
        (["model=mot_tiny", "data=digits_chameleon", "model.mot.untie=qkv"],
         "model.mot.untie='qkv' is not one of"),
        (["model=mot_tiny", "data=digits_speech"],
         "model.mot.modalities=['text', 'image'] must equal data.modalities"),
        (["model=mot_tiny", "data=digits_transfusion"],
         "data.setting=transfusion needs a model with a diffusion head"),
        (["model=mot_tiny", "data=digits_chameleon", "model.diffusion.patch_dim=4"],
         "model.diffusion.patch_dim=4 needs data.setting=transfusion"),
        (["model=mot_moe_tiny", "data=digits_chameleon", "model.mot.untie=none"],
         "model.mot.moe_modality needs the FFN untied"),
        (["model=mot_moe_tiny", "data=digits_chameleon", "model.mot.moe_modality=video"],
         "model.mot.moe_modality='video' is not one of"),
        (["model=mot_tiny", "data=digits_chameleon", "model.moe.num_experts=4"],
         "needs model.mot.moe_modality"),
        (["data=digits_chameleon", "data.modalities=[text,speech]"],
         "data.modalities=['text', 'speech'] must be"),
        (["model=mom_tiny", "data=digits_chameleon", "model.mamba.untie=[conv1d]"],
         "model.mamba.untie=['conv1d']: ['conv1d'] not in"),
        (["model=mom_tiny", "data=digits_chameleon", "model.mamba.layers=MAM"],
         "model.mamba.layers='MAM' must be 4 letters"),
        (["model=mom_tiny", "data=digits_chameleon", "model.mamba.layers=MEMA"],
         "model.mamba.layers='MEMA' has MoE layers (E) but model.moe.num_experts=0"),
        (["model=mom_moe_tiny", "data=digits_chameleon", "model.mamba.layers=MAMA"],
         "places its MoE layers with the letter E in model.mamba.layers"),
        (["model=mom_moe_tiny", "data=digits_chameleon", "model.moe.layer_freq=2"],
         "model.arch=mom picks its MoE layers by the E letters"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(overrides, message):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (
            ["parallel.ep=3"],
            8,
            "parallel.ep=3 does not fit world size 8 with parallel.pp=1, parallel.etp=1 (valid ep: 1, 2, 4, 8)",
        ),
        (
            ["parallel.ep=2", "model=dense_tiny"],
            2,
            "parallel.ep=2 does not divide model.moe.num_experts=0",
        ),
        (
            ["parallel.ep=4", "model.moe.num_experts=6", "trainer.global_batch_size=16"],
            4,
            "parallel.ep=4 does not divide model.moe.num_experts=6 (valid: 1, 2, 3, 6)",
        ),
        (["parallel.cp=2", "trainer.seq_len=34"], 2,
         "trainer.seq_len=34 must be a multiple of 2*parallel.cp*parallel.tp=4"),
        (["model=mot_tiny", "data=digits_transfusion", "model.diffusion.patch_dim=4",
          "parallel.tp=2"], 2, "data.setting=transfusion supports DP/FSDP and CP; not "),
        (["model=mot_moe_tiny", "data=digits_chameleon", "parallel.cp=2"], 2,
         "MoT+MoE (model.mot.moe_modality) supports DP/FSDP, EP and PP; not"),
        (["model=mom_tiny", "data=digits_chameleon", "parallel.tp=2", "model.hidden_size=33",
          "model.head_dim=8", "model.mamba.expand=1", "trainer.seq_len=160"], 2,
         "parallel.tp=2 does not divide the Mamba d_inner=33"),
        (["parallel.pp=2", "parallel.vpp=2"], 2,
         "parallel.pp_schedule=1f1b runs one stage per rank; parallel.vpp=2 needs"),
        (["parallel.vpp=2", "parallel.pp_schedule=interleaved_1f1b"], 1,
         "parallel.vpp=2 / parallel.pp_layers need parallel.pp > 1"),
        (["parallel.pp=2", "parallel.vpp=3", "parallel.pp_schedule=zbv",
          "model.num_layers=6"], 2, "parallel.pp_schedule=zbv needs parallel.vpp=2, got 3"),
        (["parallel.pp=2", "parallel.pp_schedule=zero_bubble"], 2,
         "parallel.pp_schedule='zero_bubble' is not one of"),
        (["parallel.pp=2", "parallel.vpp=4", "parallel.pp_schedule=interleaved_1f1b"], 2,
         "model.num_layers=4 is fewer than the 8 pipeline stages"),
        (["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved_zb",
          "trainer.global_batch_size=10", "trainer.micro_batch_size=2"], 2,
         "needs the micro-batches per step (5) to be a multiple of 2"),
        (["parallel.pp=2", "model.tie_embeddings=true"], 2, "cannot be pipelined"),
        (
            ["parallel.pp=2", "parallel.pp_layers=[1,2]"],
            2,
            "parallel.pp_layers=[1, 2] must list 2 positive layer counts (one per stage: "
            "pp*vpp) summing to model.num_layers=4",
        ),
        (
            ["parallel.pp=4", "trainer.global_batch_size=4", "trainer.micro_batch_size=2"],
            4,
            "parallel.pp=4 needs at least 4 micro-batches per step, got",
        ),
        (
            ["parallel.tp=4", "model.num_kv_heads=2"],
            4,
            "parallel.tp=4 does not divide model.num_kv_heads=2 (valid tp: 1, 2)",
        ),
        (
            ["parallel.etp=2", "model.moe.expert_ffn_hidden_size=33"],
            2,
            "parallel.etp=2 does not divide model.moe.expert_ffn_hidden_size=33 (valid: 1, 3, 11, 33)",
        ),
        (
            ["parallel.etp=2", "model=dense_tiny"],
            2,
            "(the model has no experts)",
        ),
        (
            ["parallel.tp=2", "model.vocab_size=2049"],
            2,
            "model.vocab_size=2049 is not a multiple of parallel.tp=2: the vocabulary is split "
            "evenly across TP ranks; pad it (e.g. model.vocab_size=2050;",
        ),
        (
            ["parallel.tp=2", "trainer.seq_len=33"],
            2,
            "trainer.seq_len=33 must be a multiple of parallel.tp=2: MoE layers split",
        ),
        (["parallel.sequence_parallel=true"], 2, "needs parallel.tp > 1"),
        (
            ["parallel.tp=2", "parallel.sequence_parallel=true", "trainer.seq_len=33"],
            2,
            "trainer.seq_len=33 must be a multiple of parallel.tp=2",
        ),
        (["parallel.dp_engine=none"], 2, "parallel.dp_engine=none with 2 ranks"),
        (
            ["trainer.global_batch_size=4", "trainer.micro_batch_size=4"],
            2,
            "trainer.global_batch_size=4 is not a multiple of trainer.micro_batch_size*dp=4*2",
        ),
        (["parallel.ep=2", "parallel.expert_placement=/no/such/placement.json"], 2,
         "parallel.expert_placement=/no/such/placement.json is neither contiguous"),
        (["parallel.ep=2", "parallel.expert_placement=auto", "checkpoint.async_save=true"], 2,
         "does not work with checkpoint.async_save=true"),
        # two-batch overlap: what it needs, all reasons in one line
        (["parallel.two_batch_overlap=true", "parallel.dp_engine=ddp"], 2,
         "parallel.two_batch_overlap=true needs an expert all-to-all in flight (parallel.ep > 1"),
        (["parallel.two_batch_overlap=true", "parallel.ep=2", "parallel.dp_engine=ddp",
          "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
          "parallel.overlap=false"], 2,
         "needs an expert all-to-all in flight (parallel.ep > 1, parallel.dispatcher="
         "alltoall, parallel.overlap=true); at least 2 micro-batches per step (this layout "
         "has 1: raise trainer.global_batch_size or lower trainer.micro_batch_size)"),
        (["parallel.two_batch_overlap=true", "parallel.ep=2", "parallel.pp=2",
          "parallel.dp_engine=ddp", "trainer.global_batch_size=10",
          "trainer.micro_batch_size=1"], 4,
         "an even number of micro-batches per step under pipeline parallelism (this "
         "layout has 5"),
    ],
)
def test_impossible_layouts_fail_before_launch(overrides, world, message):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    assert message in str(err.value)


def test_two_batch_overlap_layouts_are_valid():
    # ddp over the dense group; FSDP over it (the blocks' whole-call submodules) and when
    # only the experts are sharded (dense dp 1); auto
    for overrides, world in ((["parallel.dp_engine=ddp",
                               "parallel.activation_checkpointing=true"], 2),
                              ([], 2), (["parallel.dp_engine=auto"], 4),
                              (["model=mom_moe_tiny", "data=digits_chameleon",
                                "parallel.activation_checkpointing=true"], 2),
                              (["parallel.pp=2", "parallel.pp_schedule=zbv",
                                "parallel.vpp=2"], 4),
                              (["parallel.tp=2"], 2)):
        validate(compose_config(["parallel.two_batch_overlap=true", "parallel.ep=2",
                                 "trainer.global_batch_size=8", "trainer.micro_batch_size=1",
                                 *overrides]),
                 world_size=world)


def test_folded_layout_is_valid():
    # EP4 over 4 ranks with dense DP4: experts borrow the data-parallel ranks (folding)
    validate(
        compose_config(
            ["parallel.ep=4", "trainer.global_batch_size=8", "trainer.micro_batch_size=2"]
        ),
        world_size=4,
    )


def test_unknown_key_and_wrong_type_fail_at_compose():
    with pytest.raises(ConfigCompositionException):
        compose_config(["model.hidden_sise=32"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["trainer.max_steps=lots"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["model=no_such_preset"])


def test_layer_freq_pattern():
    from trainer.config import moe_layer_pattern

    cfg = compose_config(["model.moe.layer_freq=2", "model.num_layers=4"])
    assert moe_layer_pattern(cfg.model) == [True, False, True, False]
    cfg = compose_config(["model=deepseek_moe_16b"])
    pattern = moe_layer_pattern(cfg.model)
    assert pattern[0] is False and all(pattern[1:])
    assert Path(REPO / "configs" / "config.yaml").is_file()
