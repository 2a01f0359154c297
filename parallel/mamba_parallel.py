"""Tensor parallelism for (Mixture-of-)Mamba blocks (models/mamba.py): d_inner is split
across the TP ranks (as Megatron's Mamba layer does).

- ``in_proj`` column-parallel: each rank gets its channels of x *and* of z (the weight is
  stored ``[M, d, 2, d_inner]``; ``Shard(3)`` splits both parts);
- the causal conv1d, dt bias, ``A_log``, ``D`` and the scan are per channel: local
  (``Shard`` on their channel dim);
- ``x_proj`` row-parallel (input channels split): its partial (dt, B, C) is all-reduced,
  and since every rank then uses all of dt/B/C with its own channels, their gradient is
  all-reduced on the way back (``region.all_reduce``);
- ``dt_proj`` column-parallel (output channels); ``out_proj`` row-parallel, its output
  all-reduced (the block's ``region.exit``), its input gradient handled by ``enter``.

Sequence parallelism: the residual stream stays sharded on the sequence; the block norm
runs on the rank's tokens (its weight's gradient summed over TP), ``enter`` all-gathers
the normed sequence for in_proj, ``exit`` reduce-scatters out_proj's partial output — the
same region as MoT blocks. With context parallelism the gathered sequence is the CP rank's
head+tail chunks, which the CP scan (parallel/ssm_context_parallel.py) expects; its
all-gathers run over the cp group, among ranks holding the same channels.

Weights are DTensors on the tp mesh (checkpoints reshard across TP sizes); the mixer reads
local shards through its ``local`` / ``ModalityLinear.weight_fn`` seams.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

from models.mamba import MambaBlock
from parallel.mot_parallel import TPRegion, shard_parameter, to_local

__all__ = ["apply_mamba_tensor_parallel"]

# parameter (relative to the mixer) -> the dim its channels are on
_SHARDS = {
    "in_proj.weight": 3, "x_proj.weight": 1, "dt_proj.weight": 2, "out_proj.weight": 1,
    "dt_bias": 1, "conv_weight": 0, "conv_bias": 0, "A_log": 0, "D": 0,
}


def apply_mamba_tensor_parallel(block: MambaBlock, tp_mesh: DeviceMesh, *,
                                sequence_parallel: bool) -> None:
    mixer = block.mixer
    for name, dim in _SHARDS.items():
        shard_parameter(mixer, name, tp_mesh, dim)
    for lin in (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj):
        lin.weight_fn = to_local
    mixer.local = to_local
    block.region = TPRegion(tp_mesh.get_group(), sequence_parallel)
