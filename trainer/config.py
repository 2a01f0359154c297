"""The one run schema: dataclasses registered with Hydra's ConfigStore.

YAML files under ``configs/`` are merged onto these typed nodes, so an unknown key or a
wrong type fails at compose time. ``validate`` then checks the cross-field constraints
(divisibility, ranges, choices) and raises ``ConfigError`` with one line naming the key,
the value and what would be valid. All of this runs before any process group exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import ListConfig

from models.config import MODALITY_ARCHS, ModelConfig, MoEConfig, check_attention, has_experts
from models.config import experts_per_layer as _experts_per_layer
from models.config import moe_layer_pattern as _moe_layer_pattern
from parallel.dims import divisors
from trainer.errors import ConfigError


@dataclass
class DataConfig:
    name: str = "pydoc"
    # builtin: the embedded corpus (Python's own pydoc topics), tokenised on first use
    # into cache_dir. indexed: Megatron indexed datasets listed in ``blend``.
    source: str = "builtin"
    # Megatron-style blend: ["prefix"] or [w1, "prefix1", w2, "prefix2", ...]; a prefix
    # names <prefix>.bin / <prefix>.idx (scripts/preprocess_data.py writes
    # <output-prefix>_text_document.bin/.idx).
    blend: list = field(default_factory=list)
    # sentencepiece .model or Hugging Face tokenizer.json / its directory; empty with
    # source=builtin -> a sentencepiece model trained on the corpus (cached).
    tokenizer_model: str = ""
    # vocabulary of the tokenizer trained for the builtin corpus
    builtin_vocab_size: int = 2048
    split: str = "98,2,0"  # train,valid,test weights
    # attend only within each packed document (ids from the EOD tokens) and restart RoPE
    # positions per document; off = Megatron's default (attention across documents)
    document_mask: bool = False
    cache_dir: str = "${oc.env:MOEFOLD_CACHE,${oc.env:HOME}/.cache/moefold}"
    # source=multimodal (trainer/data/multimodal.py): the embedded captioned digits
    setting: str = "chameleon"  # chameleon | transfusion
    modalities: list = field(default_factory=lambda: ["text", "image"])  # + speech
    caption_first: float = 0.8  # fraction of documents whose caption precedes the image
    valid_fraction: float = 0.1  # held-out documents


@dataclass
class ParallelConfig:
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    sequence_parallel: bool = False
    # fsdp | ddp | none | auto (ddp while an unsharded replica's params+grads+AdamW fit in
    # a quarter of a rank's memory, else fsdp: parallel/parallelize.py choose_dp_engine)
    dp_engine: str = "fsdp"
    # FSDP gradient reduce-scatter without PP: last = after the last micro-batch only (holds
    # unsharded fp32 grads until then), every = after each micro-batch (shards only)
    fsdp_grad_sync: str = "last"
    # FSDP2 explicit prefetch: the next N blocks' all-gathers are issued as a block starts
    # its forward (the previous N in backward); 0 = FSDP2's implicit order only
    fsdp_prefetch: int = 1
    # gpipe | 1f1b | interleaved_1f1b | interleaved_zb | zbv (parallel/pipeline.py)
    pp_schedule: str = "1f1b"
    vpp: int = 1  # pipeline stages per rank (interleaved / zero-bubble schedules)
    pp_layers: Optional[list[int]] = None  # layers per stage (pp*vpp entries); None = even
    dispatcher: str = "alltoall"  # alltoall | allgather
    # overlap communication with compute: ddp buckets all-reduce during the last backward,
    # shared experts run while the EP all-to-all is in flight (docs/parallelism.md)
    overlap: bool = True
    ddp_bucket_mb: float = 25.0  # MiB of gradients per ddp all-reduce bucket (> 0)
    # run micro-batches in pairs, interleaved at the expert all-to-all: one's attention and
    # experts compute while the other's tokens travel (parallel/runner.py; two micro-batches'
    # activations live at once)
    two_batch_overlap: bool = False
    activation_checkpointing: bool = False
    # torch.compile each block (regional, after TP/EP/CP; parallel/parallelize.py)
    compile: bool = False
    # inductor (needs a C++ compiler on CPU) | aot_eager (traces, no codegen) | eager
    compile_backend: str = "inductor"
    # ranks of the job; 0 = from the launcher (WORLD_SIZE). A dry run builds this layout.
    world_size: int = 0
    dry_run_rank: int = 0  # the rank whose model and memory trainer.dry_run reports
    # per-rank accelerator memory (GiB) the dry run checks the estimate against; 0 = none
    gpu_memory_gib: float = 0.0
    # process-group timeout: a collective waiting longer on a dead/frozen rank fails
    timeout_s: float = 600.0
    # choose the layout with the planner (trainer/planner.py, docs/planner.md) for the
    # launched world size and cluster.*; sizes set > 1 (tp, cp, pp, vpp, ep, etp) and a
    # pp_schedule other than 1f1b stay fixed, the rest is chosen
    auto: bool = False
    # which EP rank holds which experts (parallel/expert_placement.py): contiguous | auto
    # (optimised from the run_dir's routing traces, logger.routing_trace_every) | a
    # placement JSON file (scripts/expert_placement.py); checkpoints stay layout-free
    expert_placement: str = "contiguous"


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # No weight decay on norms, biases and embeddings.
    no_decay_norm_bias_embed: bool = True
    warmup_steps: int = 20
    decay_style: str = "cosine"  # cosine | linear | wsd | constant
    # wsd: the last fraction of the steps decays linearly to min_lr.
    wsd_decay_fraction: float = 0.2
    decay_steps: int = 0  # 0 -> trainer.max_steps


@dataclass
class TrainerConfig:
    max_steps: int = 200
    seed: int = 1234
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seq_len: int = 64
    grad_clip: float = 1.0  # 0 disables
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    # CPU only: keep freed memory in the process (glibc mmap/trim thresholds 1 GiB):
    # auto = on unless FSDP shards the model (docs/memory.md) | on | off
    reuse_cpu_memory: str = "auto"
    # collate the next step's batches on a background thread (pinned on CUDA):
    # auto = on for CUDA runs | on | off; the data and its order are the same either way
    prefetch: str = "auto"
    log_every: int = 1
    eval_every: int = 50  # 0 disables validation
    eval_iters: int = 2  # global batches per validation
    # Peak FLOP/s per device for MFU; 0 -> known GPU table, or measured on CPU.
    peak_tflops: float = 0.0
    # Stop after this many steps of *this* process (testing kill/resume); 0 = off.
    stop_after_steps: int = 0
    # Build rank parallel.dry_run_rank of a parallel.world_size job on the meta device
    # (fake process group), write <run_dir>/memory.json and exit (trainer/dry_run.py).
    dry_run: bool = False
    # docs/reliability.md: a non-finite loss / grad norm skips the step (skip) or ends
    # the run (stop); more than skip_budget skipped steps within skip_window steps ends it
    nonfinite: str = "skip"  # skip | stop
    skip_budget: int = 10
    skip_window: int = 100
    spike_factor: float = 0.0  # skip a step whose loss > factor x recent mean; 0 = off
    step_timeout_s: float = 1800.0  # watchdog: a step/eval/save running longer exits; 0 = off


@dataclass
class CheckpointConfig:
    dir: str = "${run_dir}/checkpoints"
    every: int = 0  # steps; 0 disables periodic checkpoints
    resume: str = "auto"  # auto | none | <path to a step_* checkpoint directory>
    keep_last: int = 2  # 0 keeps all
    save_final: bool = True
    # write periodic checkpoints in a background thread (DCP async_save after a copy to
    # host memory; published atomically at the next save or the end of the run)
    async_save: bool = False
    # Resuming with other model / data / optim / schedule settings than the checkpoint's
    # is refused unless the key or its section is listed here (e.g. [optim.lr] or
    # [optim, trainer.max_steps]); listed keys take this run's value.
    allow_changes: list = field(default_factory=list)
    # run_dir/run.lock of a run on another host counts as abandoned when its heartbeat
    # (refreshed every 30 s) is older than this; same host: when its pid is gone.
    lock_stale_after_s: float = 900.0


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "moefold"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list = field(default_factory=list)


@dataclass
class LoggerConfig:
    console: str = "rich"  # rich | plain | none
    tensorboard: bool = True
    # expert-load heatmap image every N steps (0 disables)
    expert_load_every: int = 50
    # record which experts every token chose on every N-th step into run_dir/routing/
    # (input of parallel.expert_placement=auto and scripts/expert_placement.py); 0 = off
    routing_trace_every: int = 0
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ClusterConfig:
    """The machines a plan is for (trainer/planner.py; defaults per GPU type there, with
    their sources; 0 = the table's value for ``gpu``)."""
    gpus: int = 0  # 0 = the launched world size (parallel.world_size / WORLD_SIZE)
    gpus_per_node: int = 8  # NVLink domain size
    gpu: str = "h100_80gb"  # h100_80gb | h200 | b200 | a100_80gb | cpu
    memory_gib: float = 0.0  # per GPU
    peak_tflops: float = 0.0  # dense bf16 per GPU
    achievable_fraction: float = 0.0  # of the peak, for the model's matmuls
    intra_node_gbps: float = 0.0  # GB/s per GPU per direction (NVLink)
    inter_node_gbps: float = 0.0  # GB/s per GPU per direction (InfiniBand / RoCE NIC)


@dataclass
class PlanConfig:
    """``python -m scripts.plan`` (docs/planner.md)."""
    layout: str = ""  # "tp=2 pp=8 ep=8 ..." evaluates this layout instead of searching
    top: int = 10  # candidates printed and written (and checked for memory) at least
    usable_memory_fraction: float = 0.9  # of cluster memory_gib a plan may use
    max_builds: int = 600  # meta-model builds before the search stops, with a message


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    # Hydra multirun jobs get their own sub-directory (the job's overrides, or its number)
    run_dir: str = "runs/${model.name}${moefold_multirun_subdir:}"
    # free-form tag of the experiment preset that set the rest
    experiment: Optional[str] = None


def multirun_subdir() -> str:
    """``/<job overrides>`` (or ``/<job number>``) inside a Hydra multirun, else "": jobs
    of one sweep must not share (and silently resume) one run_dir."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return ""
        name = str(hc.job.override_dirname or "") or f"job{hc.job.num}"
    except Exception:  # no Hydra context (compose API, tests) or a sweep-level resolve
        return ""
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(safe) > 80:  # long override lists: a prefix plus a hash of all of them
        import hashlib

        safe = f"{safe[:60]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return "/" + safe


# --help descriptions of the fields that carry no comment in their dataclass.
_KEY_HELP = {
    "model.name": "preset name (run_dir default, checkpoint metadata)",
    "model.vocab_size": "embedding rows; >= the data tokenizer's vocabulary",
    "model.hidden_size": "model width", "model.num_layers": "transformer blocks",
    "model.num_heads": "attention query heads",
    "model.num_kv_heads": "key/value heads (GQA); divides num_heads",
    "model.max_seq_len": "longest sequence the RoPE tables cover",
    "model.rope_theta": "RoPE base", "model.norm_eps": "RMSNorm epsilon",
    "model.tie_embeddings": "share the input embedding and the output head",
    "model.init_std": "std of the normal weight initialisation",
    "model.moe.top_k": "experts per token",
    "model.moe.topk_scaling_factor": "scale of the top-k routing weights",
    "model.moe.group_topk": "groups kept per token by group-limited routing",
    "model.moe.expert_bias_update_rate": "step of the aux-loss-free expert bias update",
    "model.moe.pad_to_capacity": "pad every expert to its capacity (fixed shapes)",
    "model.moe.min_capacity": "lower bound of an expert's capacity in tokens",
    "model.mamba.d_state": "Mamba SSM state size", "model.mamba.d_conv": "Mamba conv width",
    "model.mamba.expand": "Mamba inner width / hidden_size",
    "model.mamba.dt_min": "Mamba dt initialisation range, low",
    "model.mamba.dt_max": "Mamba dt initialisation range, high",
    "data.name": "data preset name", "data.cache_dir": "tokenizer / corpus / index cache",
    "parallel.tp": "tensor-parallel size (attention, dense MLPs)",
    "parallel.cp": "context-parallel size (folded with EP)",
    "parallel.pp": "pipeline stages", "parallel.ep": "expert-parallel size",
    "parallel.etp": "tensor-parallel size inside experts",
    "parallel.sequence_parallel": "shard norms/dropout activations over TP ranks",
    "parallel.activation_checkpointing": "recompute activations in backward",
    "optim.name": "optimizer (adamw)", "optim.lr": "peak learning rate",
    "optim.min_lr": "learning rate at the end of the decay",
    "optim.weight_decay": "AdamW weight decay", "optim.beta1": "AdamW beta1",
    "optim.beta2": "AdamW beta2", "optim.eps": "AdamW epsilon",
    "optim.warmup_steps": "linear warm-up steps",
    "trainer.max_steps": "optimizer steps of the whole run",
    "trainer.seed": "seeds initialisation and data order",
    "trainer.micro_batch_size": "sequences per forward/backward on one rank",
    "trainer.global_batch_size": "sequences per optimizer step, all ranks",
    "trainer.seq_len": "tokens per sequence", "trainer.log_every": "steps between metric lines",
    "trainer.skip_budget": "skipped steps allowed within skip_window",
    "trainer.skip_window": "window (steps) of skip_budget",
    "checkpoint.dir": "where checkpoints go",
    "checkpoint.save_final": "checkpoint the last step",
    "logger.tensorboard": "write TensorBoard events to <run_dir>/tb",
    "logger.wandb.project": "wandb project", "logger.wandb.entity": "wandb entity",
    "logger.wandb.name": "wandb run name", "logger.wandb.tags": "wandb tags",
}


def key_descriptions(cls: type = None, prefix: str = "") -> list[tuple[str, str]]:
    """``[(dotted key, one-line description)]`` of every leaf of the schema, the
    descriptions taken from the comments beside or above each dataclass field."""
    import dataclasses
    import inspect

    cls = Config if cls is None else cls
    comments: dict[str, str] = {}
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        lines = []
    pending: list[str] = []
    for line in lines[1:]:
        body = line.rstrip("\n")
        m = re.match(r"^    #\s?(.*)$", body)
        if m:
            pending.append(m.group(1).strip())
            continue
        m = re.match(r"^    (\w+)\s*:\s*[^#]*?(?:\s+#\s?(.*))?$", body)
        if m and not body.strip().startswith(("def ", "@")):
            comments[m.group(1)] = (m.group(2) or " ".join(pending)).strip()
        pending = []
    out: list[tuple[str, str]] = []
    for f in dataclasses.fields(cls):
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(default):
            out += key_descriptions(type(default), key + ".")
        else:
            out.append((key, comments.get(f.name) or _KEY_HELP.get(key, "")))
    return out


def help_template() -> str:
    """``python -m trainer.train --help``: the groups, then every key with its comment."""
    rows = key_descriptions()
    width = max(len(k) for k, _ in rows) + 2
    keys = "\n".join(f"  {k:<{width}}{d}".rstrip() for k, d in rows)
    keys = keys.replace("${", "\\${")  # comments quoting interpolations stay text
    return (
        "moefold trainer: python -m trainer.train [group=option] [key=value] ...\n"
        "(README.md; every group and key: docs/configs.md)\n\n"
        "== Configuration groups ==\n"
        "Compose your configuration from those groups (group=option)\n\n"
        "$APP_CONFIG_GROUPS\n\n"
        "== Keys ==\n"
        "Override any of them (key=value); print the composed config with --cfg job\n\n"
        f"{keys}\n"
    )


def register_configs() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("moefold_multirun_subdir", multirun_subdir, replace=True)
    cs = ConfigStore.instance()
    # Group YAMLs merge onto the typed nodes of this schema, so a typo in any of them
    # (or on the command line) is an error naming the key.
    cs.store(name="moefold_schema", node=Config)
    # --help lists every key with the comment of its dataclass field (configs/config.yaml
    # selects it with `override hydra/help: moefold`)
    cs.store(group="hydra/help", name="moefold",
             node={"app_name": "moefold", "header": "", "footer": "",
                   "template": help_template()})


def _choice(key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, valid))}")


def _positive(key: str, value: int | float) -> None:
    if not value > 0:  # NaN too
        raise ConfigError(f"{key}={value} must be > 0")


def _non_negative(key: str, value: int | float) -> None:
    if not value >= 0:
        raise ConfigError(f"{key}={value} must be >= 0")


def moe_layer_pattern(model: ModelConfig) -> list[bool]:
    """Which layers are MoE (True); see ``models.config.moe_layer_pattern``."""
    try:
        return _moe_layer_pattern(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _spec(num_experts: Any) -> Any:
    """``model.moe.num_experts`` as the user wrote it (a plain list, not a ListConfig)."""
    return num_experts if isinstance(num_experts, int) else list(num_experts)


def experts_per_layer_checked(model: ModelConfig) -> list[int]:
    """``models.config.experts_per_layer`` with its errors as one-line ``ConfigError``s."""
    ne = model.moe.num_experts
    if isinstance(ne, bool) or not (isinstance(ne, int) or (
            isinstance(ne, (list, tuple, ListConfig))
            and all(isinstance(e, int) and not isinstance(e, bool) for e in ne))):
        raise ConfigError(f"model.moe.num_experts={ne!r} must be an int or a list of ints "
                          f"(one per layer, model.num_layers={model.num_layers})")
    moe_layer_pattern(model)  # layer_freq errors first
    try:
        return _experts_per_layer(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_model(m: ModelConfig) -> None:
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
        _positive(f"model.{key}", getattr(m, key))
    _choice("model.arch", m.arch, ("llm", "mot", "mom"))
    try:  # model.attention and the model.mla sizes
        check_attention(m)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if m.arch in MODALITY_ARCHS:
        _validate_mot(m)
    if m.arch == "mom":
        _validate_mamba(m)
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads} "
            f"(valid: {divisors(m.num_heads)})"
        )
    if m.head_dim == 0 and m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} does not divide model.hidden_size={m.hidden_size} "
            f"(set model.head_dim or use num_heads in: {divisors(m.hidden_size)})"
        )
    for key in ("init_std", "norm_eps", "rope_theta", "max_seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    _non_negative("model.head_dim", m.head_dim)
    if (m.head_dim or m.hidden_size // m.num_heads) % 2:
        raise ConfigError("model.head_dim must be even for RoPE")
    moe = m.moe
    counts = experts_per_layer_checked(m)
    pattern = moe_layer_pattern(m)
    if not all(pattern):
        _positive("model.ffn_hidden_size", m.ffn_hidden_size)
    if not any(counts):
        if moe.residual:
            raise ConfigError("model.moe.residual=true needs routed experts "
                              "(model.moe.num_experts > 0)")
        return
    _positive("model.moe.expert_ffn_hidden_size", moe.expert_ffn_hidden_size)
    fewest = min(e for e in counts if e)
    nulls = max(moe.num_null_experts, 0)
    if not 1 <= moe.top_k <= fewest + nulls:
        raise ConfigError(
            (f"model.moe.top_k={moe.top_k} must be in 1..model.moe.num_experts={fewest}"
             if isinstance(moe.num_experts, int) else
             f"model.moe.top_k={moe.top_k} must be in 1..{fewest} (the fewest experts of a "
             f"MoE layer, model.moe.num_experts={_spec(moe.num_experts)})")
            + (f" + num_null_experts={nulls}" if nulls else "")
        )
    _positive("model.moe.topk_scaling_factor", moe.topk_scaling_factor)
    for key in ("expert_bias_update_rate", "min_capacity", "num_shared_experts",
                "first_k_dense"):
        _non_negative(f"model.moe.{key}", getattr(moe, key))
    _choice("model.moe.score_func", moe.score_func, ("softmax", "sigmoid"))
    _choice("model.moe.drop_policy", moe.drop_policy, ("probs", "position"))
    if moe.residual and (moe.num_shared_experts or moe.shared_expert_gate):
        raise ConfigError(
            "model.moe.residual=true is its own dense branch: set model.moe.num_shared_experts"
            f"=0 and shared_expert_gate=false (got {moe.num_shared_experts}, "
            f"{moe.shared_expert_gate})")
    if moe.num_groups:
        if not 1 <= moe.group_topk <= moe.num_groups:
            raise ConfigError(
                f"model.moe.group_topk={moe.group_topk} must be in 1..model.moe.num_groups="
                f"{moe.num_groups}"
            )
        for i, E in enumerate(counts):  # group-limited routing: every MoE layer on its own
            if not E:
                continue
            where = "" if isinstance(moe.num_experts, int) else f"[{i}]"
            if E % moe.num_groups:
                raise ConfigError(
                    f"model.moe.num_groups={moe.num_groups} does not divide "
                    f"model.moe.num_experts{where}={E} (valid: {divisors(E)})"
                )
            per_group = E // moe.num_groups
            if moe.top_k > moe.group_topk * per_group:
                raise ConfigError(
                    f"model.moe.top_k={moe.top_k} exceeds the {moe.group_topk * per_group} "
                    f"experts of model.moe.num_experts{where}={E} reachable in group_topk="
                    f"{moe.group_topk} groups of {per_group}"
                )
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        raise ConfigError(f"model.moe.capacity_factor={moe.capacity_factor} must be > 0 or null")
    if moe.pad_to_capacity and moe.capacity_factor is None:
        raise ConfigError("model.moe.pad_to_capacity=true needs model.moe.capacity_factor set")
    for key in ("aux_loss_coeff", "seq_aux_loss_coeff", "z_loss_coeff"):
        if getattr(moe, key) < 0:
            raise ConfigError(f"model.moe.{key}={getattr(moe, key)} must be >= 0")
    _validate_moe_features(moe)


def _validate_moe_features(moe) -> None:
    """Null experts and the global-batch load-balancing scope (docs/moe_features.md)."""
    _non_negative("model.moe.num_null_experts", moe.num_null_experts)
    _choice("model.moe.aux_loss_scope", moe.aux_loss_scope, ("micro_batch", "global_batch"))
    if moe.aux_loss_scope == "global_batch" and moe.aux_loss_coeff <= 0:
        raise ConfigError("model.moe.aux_loss_scope=global_batch needs "
                          f"model.moe.aux_loss_coeff > 0 (got {moe.aux_loss_coeff})")
    n = moe.num_null_experts
    if not n:
        return
    if moe.expert_bias:  # the bias update balances real experts only: nulls would starve
        raise ConfigError(f"model.moe.num_null_experts={n} does not support "
                          "model.moe.expert_bias=true (use model.moe.aux_loss_coeff > 0)")
    if moe.num_groups:
        raise ConfigError(f"model.moe.num_null_experts={n} does not support "
                          f"model.moe.num_groups={moe.num_groups} (null experts have no group)")
    if not isinstance(moe.num_experts, int):
        raise ConfigError(f"model.moe.num_null_experts={n} needs one expert count for every "
                          f"layer, not the per-layer list model.moe.num_experts")


def _validate_mot(m: ModelConfig) -> None:
    from models.modality import UNTIE

    _choice("model.mot.untie", m.mot.untie, UNTIE)
    if not m.mot.modalities:
        raise ConfigError("model.mot.modalities must name at least one modality")
    if m.mot.moe_modality:
        from models.modality import untied_parts

        if m.mot.moe_modality not in m.mot.modalities:
            raise ConfigError(f"model.mot.moe_modality={m.mot.moe_modality!r} is not one of "
                              f"model.mot.modalities={list(m.mot.modalities)}")
        if not has_experts(m):
            raise ConfigError("model.mot.moe_modality needs model.moe.num_experts > 0")
        if "ffn" not in untied_parts(m.mot.untie):
            raise ConfigError(f"model.mot.moe_modality needs the FFN untied (model.mot.untie="
                              f"{m.mot.untie!r}; valid: ffn, ffn_qkv, all)")
    elif has_experts(m):
        raise ConfigError(f"model.arch={m.arch} with model.moe.num_experts > 0 needs "
                          "model.mot.moe_modality=<the modality whose FFN is the MoE>")
    if m.diffusion.patch_dim < 0:
        raise ConfigError(f"model.diffusion.patch_dim={m.diffusion.patch_dim} must be >= 0")
    if m.diffusion.patch_dim:
        _positive("model.diffusion.num_timesteps", m.diffusion.num_timesteps)
        if m.diffusion.loss_weight < 0:
            raise ConfigError(f"model.diffusion.loss_weight={m.diffusion.loss_weight} must be >= 0")


def _validate_mamba(m: ModelConfig) -> None:
    from models.mamba import PROJECTIONS

    mc = m.mamba
    for key in ("d_state", "d_conv", "expand", "scan_chunk"):
        _positive(f"model.mamba.{key}", getattr(mc, key))
    _choice("model.mamba.kernels", mc.kernels, ("auto", "cuda", "torch"))
    bad = [p for p in mc.untie if p not in PROJECTIONS]
    if bad:
        raise ConfigError(f"model.mamba.untie={list(mc.untie)}: {bad} not in {list(PROJECTIONS)}")
    if mc.layers and (len(mc.layers) != m.num_layers or set(mc.layers) - {"M", "A", "E"}):
        raise ConfigError(f"model.mamba.layers={mc.layers!r} must be {m.num_layers} letters "
                          "of M (Mamba) / A (attention) / E (attention + MoE), or empty "
                          "(all Mamba)")
    if not 0 < mc.dt_min <= mc.dt_max:
        raise ConfigError(f"model.mamba.dt_min={mc.dt_min} / dt_max={mc.dt_max} need "
                          "0 < dt_min <= dt_max")
    if has_experts(m) and "E" not in mc.layers:
        raise ConfigError("model.arch=mom with model.moe.num_experts > 0 places its MoE "
                          "layers with the letter E in model.mamba.layers (e.g. MEMA); "
                          f"got layers={mc.layers!r}")
    if "E" in mc.layers and not has_experts(m):
        raise ConfigError(f"model.mamba.layers={mc.layers!r} has MoE layers (E) but "
                          "model.moe.num_experts=0")
    if has_experts(m) and (m.moe.layer_freq != 1 or m.moe.first_k_dense):
        raise ConfigError("model.arch=mom picks its MoE layers by the E letters of "
                          "model.mamba.layers; leave model.moe.layer_freq=1 and "
                          f"first_k_dense=0 (got {m.moe.layer_freq}, {m.moe.first_k_dense})")


def _validate_mamba_kernels(m: ModelConfig, tp: int, device: str) -> None:
    """``model.mamba.kernels=cuda`` requires the kernels, so their layout rules are checked
    here: causal_conv1d's channel-last path needs the local d_inner (expand * hidden / tp)
    to be a multiple of 8. ``auto`` falls back to the reference where a rule fails."""
    if m.arch != "mom" or m.mamba.kernels != "cuda":
        return
    if device == "cpu":
        raise ConfigError("model.mamba.kernels=cuda needs trainer.device=cuda or auto "
                          "(valid on CPU: auto, torch)")
    d_local = m.mamba.expand * m.hidden_size // tp
    if d_local % 8:
        raise ConfigError(f"model.mamba.kernels=cuda: d_inner/parallel.tp = {m.mamba.expand}"
                          f"*{m.hidden_size}/{tp} = {d_local} must be a multiple of 8 "
                          "(causal_conv1d's channel-last layout); use kernels=auto or torch")


def _validate_multimodal(cfg: Config) -> None:
    from trainer.data.multimodal import MODALITIES, SETTINGS

    d, m = cfg.data, cfg.model
    _choice("data.setting", d.setting, SETTINGS)
    mods = list(d.modalities)
    if mods not in (list(MODALITIES[:2]), list(MODALITIES)):
        raise ConfigError(f"data.modalities={mods} must be [text, image] or [text, image, speech]")
    if m.arch in MODALITY_ARCHS and list(m.mot.modalities) != mods:
        raise ConfigError(f"model.mot.modalities={list(m.mot.modalities)} must equal "
                          f"data.modalities={mods}")
    if d.setting == "transfusion":
        if m.arch not in MODALITY_ARCHS or not m.diffusion.patch_dim:
            raise ConfigError("data.setting=transfusion needs a model with a diffusion head "
                              "(model.arch=mot or mom, model.diffusion.patch_dim=4)")
        p = cfg.parallel
        if p.tp > 1 or p.pp > 1:
            raise ConfigError("data.setting=transfusion supports DP/FSDP and CP; not "
                              f"parallel.tp={p.tp} / parallel.pp={p.pp} yet")
    elif m.arch in MODALITY_ARCHS and m.diffusion.patch_dim:
        raise ConfigError(f"model.diffusion.patch_dim={m.diffusion.patch_dim} needs "
                          "data.setting=transfusion")
    if not 0 <= d.caption_first <= 1 or not 0 < d.valid_fraction < 1:
        raise ConfigError("data.caption_first must be in [0, 1] and data.valid_fraction in (0, 1)")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Check the whole config; raises ConfigError (one line) on the first problem."""
    validate_model(cfg.model)
    t, o, d = cfg.trainer, cfg.optim, cfg.data
    for key in ("max_steps", "micro_batch_size", "global_batch_size", "seq_len", "log_every"):
        _positive(f"trainer.{key}", getattr(t, key))
    if t.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"trainer.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    _choice("trainer.precision", t.precision, ("auto", "fp32", "bf16"))
    _choice("trainer.reuse_cpu_memory", t.reuse_cpu_memory, ("auto", "on", "off"))
    _choice("trainer.prefetch", t.prefetch, ("auto", "on", "off"))
    _choice("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _choice("trainer.nonfinite", t.nonfinite, ("skip", "stop"))
    if t.skip_budget < 0 or t.skip_window < 1:
        raise ConfigError(f"trainer.skip_budget={t.skip_budget} must be >= 0 and "
                          f"trainer.skip_window={t.skip_window} >= 1")
    if t.spike_factor != 0 and t.spike_factor <= 1:
        raise ConfigError(f"trainer.spike_factor={t.spike_factor} must be > 1 (or 0: off)")
    if t.step_timeout_s < 0 or cfg.parallel.timeout_s <= 0:
        raise ConfigError(f"trainer.step_timeout_s={t.step_timeout_s} must be >= 0 and "
                          f"parallel.timeout_s={cfg.parallel.timeout_s} > 0")
    _choice("optim.name", o.name, ("adamw",))
    _choice("optim.decay_style", o.decay_style, ("cosine", "linear", "wsd", "constant"))
    _positive("optim.lr", o.lr)
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    if not 0 < o.wsd_decay_fraction <= 1:
        raise ConfigError(f"optim.wsd_decay_fraction={o.wsd_decay_fraction} must be in (0, 1]")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(o, key) < 1:
            raise ConfigError(f"optim.{key}={getattr(o, key)} must be in [0, 1)")
    _positive("optim.eps", o.eps)
    _non_negative("optim.weight_decay", o.weight_decay)
    _non_negative("optim.decay_steps", o.decay_steps)
    _validate_trainer_ranges(t)
    _validate_checkpoint(cfg.checkpoint)
    _choice("data.source", d.source, ("builtin", "indexed", "multimodal"))
    if d.source == "multimodal":
        _validate_multimodal(cfg)
    elif cfg.model.arch in MODALITY_ARCHS and cfg.model.diffusion.patch_dim:
        raise ConfigError("model.diffusion.patch_dim > 0 needs data=digits_transfusion")
    if d.source == "indexed" and not d.blend:
        raise ConfigError("data.source=indexed needs data.blend=[<prefix>] or [w1,p1,w2,p2,...]")
    _choice("logger.console", cfg.logger.console, ("rich", "plain", "none"))
    _choice("logger.wandb.mode", cfg.logger.wandb.mode, ("disabled", "offline", "online"))
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 0:
        raise ConfigError("checkpoint.every and checkpoint.keep_last must be >= 0")
    validate_parallel(cfg, world_size)


def _validate_trainer_ranges(t: TrainerConfig) -> None:
    if not 0 <= t.seed < 2**32:  # numpy's (and Megatron's) seeds are uint32
        raise ConfigError(f"trainer.seed={t.seed} must be in [0, 2**32)")
    for key in ("grad_clip", "eval_every", "peak_tflops", "stop_after_steps"):
        _non_negative(f"trainer.{key}", getattr(t, key))
    if t.eval_every and t.eval_iters < 1:
        raise ConfigError(f"trainer.eval_iters={t.eval_iters} must be >= 1 when validation "
                          f"is on (trainer.eval_every={t.eval_every}; 0 disables it)")


_ALLOW_SECTIONS = ("model", "data", "optim", "trainer")


def _validate_checkpoint(c: CheckpointConfig) -> None:
    _positive("checkpoint.lock_stale_after_s", c.lock_stale_after_s)
    for key in c.allow_changes:
        if not isinstance(key, str) or str(key).split(".")[0] not in _ALLOW_SECTIONS:
            raise ConfigError(f"checkpoint.allow_changes: {key!r} must be a key or section "
                              f"of {', '.join(_ALLOW_SECTIONS)} (e.g. optim.lr, optim)")


def m_arch_moe(cfg: Config) -> bool:
    return cfg.model.arch in MODALITY_ARCHS and bool(cfg.model.mot.moe_modality)


def validate_parallel(cfg: Config, world_size: int) -> None:
    """The layout: ``parallel/``'s own ``check_*`` functions (one-line ``ValueError``s,
    turned into ``ConfigError`` here) plus what only the whole config can tell."""
    from parallel.context_parallel import check_context_parallel
    from parallel.dims import ParallelDims  # the one source of truth for layouts
    from parallel.expert_parallel import check_expert_parallel
    from parallel.expert_placement import check_placement_spec
    from parallel.pipeline import SCHEDULES, check_pipeline
    from parallel.runner import check_two_batch_overlap
    from parallel.tensor_parallel import check_tensor_parallel

    p, m, t = cfg.parallel, cfg.model, cfg.trainer
    _positive("parallel.vpp", p.vpp)
    if p.world_size < 0 or p.gpu_memory_gib < 0:
        raise ConfigError(f"parallel.world_size={p.world_size} and parallel.gpu_memory_gib="
                          f"{p.gpu_memory_gib} must be >= 0")
    if p.world_size and p.world_size != world_size:
        raise ConfigError(f"parallel.world_size={p.world_size} but the launcher started "
                          f"{world_size} processes (0 = take the launcher's)")
    if not 0 <= p.dry_run_rank < world_size:
        raise ConfigError(f"parallel.dry_run_rank={p.dry_run_rank} must be in "
                          f"[0, {world_size})")
    _choice("parallel.dp_engine", p.dp_engine, ("fsdp", "ddp", "none", "auto"))
    _choice("parallel.fsdp_grad_sync", p.fsdp_grad_sync, ("last", "every"))
    if not isinstance(p.fsdp_prefetch, int) or p.fsdp_prefetch < 0:
        raise ConfigError(f"parallel.fsdp_prefetch={p.fsdp_prefetch!r} must be an int >= 0")
    if not p.ddp_bucket_mb > 0:
        raise ConfigError(f"parallel.ddp_bucket_mb={p.ddp_bucket_mb} must be > 0 "
                          "(MiB of gradients per all-reduce)")
    _choice("parallel.compile_backend", p.compile_backend, ("inductor", "aot_eager", "eager"))
    if p.compile and p.tp > 1:
        raise ConfigError(f"parallel.compile=true with parallel.tp={p.tp} is not supported yet "
                          "(dynamo fails on the TP blocks' DTensors); use parallel.tp=1 or "
                          "parallel.compile=false")
    if p.compile and p.compile_backend == "inductor" and _cpu_run(t.device):
        import shutil

        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise ConfigError("parallel.compile=true with parallel.compile_backend=inductor on "
                              "CPU needs a C++ compiler (no g++/c++/clang++ on PATH); use "
                              "parallel.compile_backend=aot_eager")
    _choice("parallel.pp_schedule", p.pp_schedule, tuple(SCHEDULES))
    try:
        dims = ParallelDims.from_config(p, world_size)
        if t.global_batch_size % (t.micro_batch_size * dims.dp):
            raise ConfigError(
                f"trainer.global_batch_size={t.global_batch_size} is not a multiple of "
                f"trainer.micro_batch_size*dp={t.micro_batch_size}*{dims.dp}")
        counts = experts_per_layer_checked(m)  # pyramid MoE: each layer's E must divide
        check_expert_parallel(m.moe.num_experts if isinstance(m.moe.num_experts, int)
                              else counts, m.moe.expert_ffn_hidden_size, p.ep, p.etp,
                              p.dispatcher)
        if m_arch_moe(cfg) and (p.tp > 1 or p.cp > 1):
            raise ConfigError(f"MoT+MoE (model.mot.moe_modality) supports DP/FSDP, EP and PP; "
                              f"not parallel.tp={p.tp} / parallel.cp={p.cp} yet")
        check_context_parallel(t.seq_len, p.cp, p.tp)
        check_placement_spec(p.expert_placement)
        if p.expert_placement not in ("", "contiguous") and cfg.checkpoint.async_save:
            raise ConfigError("parallel.expert_placement other than contiguous does not work "
                              "with checkpoint.async_save=true yet (DCP's staging copy drops "
                              "the placed-expert chunk map); use a synchronous save")
        # under the two-batch overlap the pipeline's micro-batches are pairs
        check_pipeline(p.pp, p.vpp, p.pp_schedule, t.global_batch_size // (
            t.micro_batch_size * dims.dp * (2 if p.two_batch_overlap else 1)), m.num_layers,
            list(p.pp_layers or []) or None, m.tie_embeddings)
        check_tensor_parallel(m, p.tp, seq_len=t.seq_len,
                              sequence_parallel=p.sequence_parallel, world_size=world_size)
        check_two_batch_overlap(p, t.global_batch_size // (
            t.micro_batch_size * dims.dp))
    except ConfigError:
        raise
    except ValueError as e:  # the documented one-line errors of the check_* functions
        raise ConfigError(str(e)) from None
    _validate_mamba_kernels(m, p.tp, t.device)
    if p.dp_engine == "none" and (dims.dp * dims.cp > 1 or dims.edp > 1):
        raise ConfigError(
            f"parallel.dp_engine=none with {world_size} ranks would train unsynchronised "
            "replicas (valid: fsdp, ddp)"
        )


def _cpu_run(device: str) -> bool:
    if device == "cpu":
        return True
    import torch

    return device == "auto" and not torch.cuda.is_available()


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "moe_layer_pattern",
    "register_configs",
    "validate",
]
