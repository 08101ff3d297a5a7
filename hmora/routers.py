"""Routers of one routed group (SPEC 3): a token router on the layer input, a task router on the task
representation, and the learnable hybrid mixing weight alpha, as the layer's kind needs them."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hmora_kernels.dropout import ROUTER_STREAM, apply_dropout

ROUTER_KINDS = ("token", "hybrid", "task")


class RouterMLP(nn.Sequential):
    """d_in -> E in one Linear (default), or d_in -> hidden -> ... -> E with ReLU between (deeper routers).

    Linear layers sit at the even indices; the default nn.Linear initialisation, with bias (SPEC 2.3), unless
    `bias` is False or `init_std` draws the weights from N(0, init_std) (the MixLoRA / Switch recipes).
    """

    def __init__(self, d_in: int, num_experts: int, num_layers: int, hidden_dim: int, device=None,
                 bias: bool = True, init_std: Optional[float] = None):
        widths = [d_in] + [hidden_dim] * (num_layers - 1) + [num_experts]
        layers = []
        for i in range(num_layers):
            if i:
                layers.append(nn.ReLU())
            linear = nn.Linear(widths[i], widths[i + 1], bias=bias, device=device, dtype=torch.float32)
            if init_std is not None:
                nn.init.normal_(linear.weight, std=init_std)
                if bias:
                    nn.init.zeros_(linear.bias)
            layers.append(linear)
        super().__init__(*layers)

    @property
    def single_linear(self) -> bool:
        return len(self) == 1


class Router(nn.Module):
    """The router of one group. kind "token": `token_mlp`; "task": `task_mlp`; "hybrid": both and `alpha` (1,).

    Owns no state between forwards: `token_args` and `task_probs` return values for this forward only. The one
    exception is rank-wise routing's `selection_bias` buffer (E,), which only `HMoRAModel.update_routing_bias`
    changes, once per optimizer step, never a forward.
    """

    def __init__(self, kind: str, d_in: int, d_task: int, num_experts: int, num_layers: int, hidden_dim: int,
                 alpha_init: float, device=None, bias: bool = True, init_std: Optional[float] = None,
                 jitter: float = 0.0, selection_bias: bool = False):
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"router kind: expected one of {ROUTER_KINDS}, got {kind!r}")
        self.kind = kind
        self.jitter = jitter
        mlp = dict(num_layers=num_layers, hidden_dim=hidden_dim, device=device, bias=bias, init_std=init_std)
        if kind != "task":
            self.token_mlp = RouterMLP(d_in, num_experts, **mlp)
        if kind == "hybrid":
            # 1-D, not a scalar: FSDP2's fully_shard refuses scalar parameters (checkpoints with a scalar load)
            self.alpha = nn.Parameter(torch.tensor([float(alpha_init)], device=device))
        if kind != "token":
            self.task_mlp = RouterMLP(d_task, num_experts, **mlp)
        if selection_bias:
            self.register_buffer("selection_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))

    def token_args(self, x: torch.Tensor, dropout_p: float, seed, dropout_rng: str) -> dict:
        """Keyword arguments of `hmora_kernels.routed_group` for the token router on the flat input x (T, d_in).

        One Linear: its weight and bias go to the kernel (which draws the router's dropout mask itself).
        Deeper, or with jitter while training: the logits, computed here on the router's dropout stream, the same
        stream the kernel would use; the jitter is drawn from torch's generator, which activation checkpointing
        restores before a recompute.
        """
        if self.kind == "task":
            return {}
        jitter = self.jitter if self.training else 0.0
        if self.token_mlp.single_linear and jitter == 0.0:
            return {"router_weight": self.token_mlp[0].weight, "router_bias": self.token_mlp[0].bias}
        # fp32 before the mask and its scale: routing stays fp32 end to end (x may be bf16)
        dropped = apply_dropout(x.to(torch.float32), dropout_p, seed, ROUTER_STREAM, dropout_rng)
        if jitter:
            dropped = dropped * torch.empty_like(dropped).uniform_(1.0 - jitter, 1.0 + jitter)
        return {"router_logits": self.token_mlp(dropped)}

    def task_probs(self, task_repr: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """p_task = softmax(W_s drop(task_repr) + b_s), (B, E) in fp32; its own dropout mask (SPEC 2.4)."""
        dropped = F.dropout(task_repr.to(torch.float32), dropout_p, self.training)
        return torch.softmax(self.task_mlp(dropped), dim=-1)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"
