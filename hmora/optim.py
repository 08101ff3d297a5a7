"""Optimizer and schedule of the reference recipe (SPEC 5): AdamW, B matrices at eta_b * lr, transformers schedules."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .model import HMoRAModel

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def parameter_groups(model: torch.nn.Module, lr: float, eta_b: float) -> List[Dict]:
    """Two AdamW groups over the trainable parameters: B matrices at `eta_b * lr`, everything else at `lr`."""
    b_params, other_params = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (b_params if HMoRAModel.is_b_matrix(name) else other_params).append(param)
    if not b_params and not other_params:
        raise ValueError("the model has no trainable parameters; wrap it with hmora.get_hmora_model first")
    return [{"params": other_params, "lr": lr}, {"params": b_params, "lr": eta_b * lr}]


def build_optimizer(model: torch.nn.Module, lr: float, eta_b: float = 1.0,
                    weight_decay: float = 0.01) -> torch.optim.AdamW:
    if lr <= 0 or eta_b <= 0:
        raise ValueError(f"lr and eta_b must be > 0, got lr={lr}, eta_b={eta_b}")
    return torch.optim.AdamW(parameter_groups(model, lr, eta_b), lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str = "constant", warmup_steps: int = 0,
                    max_steps: Optional[int] = None, polynomial_power: float = 2.0, num_cycles: int = 5):
    """`transformers.get_scheduler(name, ...)`; the power / cycle count reach the schedules that take them.

    (The reference script meant to pass these too but built a set instead of a dict, so they never arrived.)
    """
    from transformers import get_scheduler

    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    specific = {"polynomial": {"power": polynomial_power}, "cosine_with_restarts": {"num_cycles": num_cycles}}
    # "constant" ignores warmup in transformers; the paper's "constant with 500 warmup steps" is constant_with_warmup
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps,
                         scheduler_specific_kwargs=specific.get(name))
