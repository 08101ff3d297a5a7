"""hmora_kernels: grouped mixture-of-LoRA-experts ops with reference, torch and triton backends.

Tensor ops only, no model knowledge. See `hmora_kernels.ops` for the math of each op.
"""
from .dispatch import BACKENDS, resolve as resolve_backend
from .dropout import DROPOUT_RNGS, keep_mask, philox_uniform, stream_seed
from .ops import entropy_loss, gjs_loss, load_balancing_loss, lora, route, routed_group, router_z_loss
from .reference import entropy, tsallis_entropy
from .types import GroupOutput, RankWise, Switch, TopP

__all__ = [
    "BACKENDS", "DROPOUT_RNGS", "GroupOutput", "RankWise", "Switch", "TopP", "entropy", "entropy_loss", "gjs_loss",
    "keep_mask", "load_balancing_loss", "lora", "philox_uniform", "resolve_backend", "route", "routed_group",
    "router_z_loss", "stream_seed", "tsallis_entropy",
]
