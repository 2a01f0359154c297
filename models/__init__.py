"""Single-device model definitions (plain PyTorch; never imports torch.distributed or
parallel/). ``build_model`` is the entry point; parallel/ fills the seams the modules
expose: ``MoELayer.dispatcher``, ``Attention.attn_fn``, ``Transformer.layers``."""

from models.build import build_model
from models.config import ModelConfig, MoEConfig, moe_layer_pattern
from models.flops import param_counts, training_flops_per_token
from models.moe import Dispatcher, LocalDispatcher, MoELayer, set_aux_loss_scale
from models.transformer import Transformer

__all__ = [
    "Dispatcher",
    "LocalDispatcher",
    "ModelConfig",
    "MoEConfig",
    "MoELayer",
    "Transformer",
    "build_model",
    "moe_layer_pattern",
    "param_counts",
    "set_aux_loss_scale",
    "training_flops_per_token",
]
