"""Injected layers: a plain-LoRA Linear and the members of a routed group (SPEC 2).

Both wrap the frozen base `nn.Linear` as `base_layer` and own `lora_A` / `lora_B`; every B matrix is a
parameter whose name ends in `lora_B`. The arithmetic is done by `hmora_kernels` ops, never here.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

import hmora_kernels
from hmora_kernels import RankWise

from .config import HMoRAConfig
from .context import LOSS_TASK, ROUTING_TASK, ForwardContext, RoutingState, in_backward
from .reentrant import inject, sink
from .routers import Router


def draw_seed(dropout_p: float, dropout_rng: str, backend: str, device: torch.device):
    """A fresh dropout seed: a 1-element int64 tensor on `device` from its default generator, or 0 when no mask
    is drawn from a seed (no dropout, or "native" masks, which the reference and torch backends draw from the
    generator itself: a seed nobody reads would still advance it, and torch.compile drops unused draws, so
    compiled masks would no longer follow eager's).

    It stays on the device: reading it would make every layer wait for the host (and break torch.compile's graph).
    Activation checkpointing restores the generator's state before recomputing, so the recompute draws the same
    seed (and the same "native" masks)."""
    if dropout_p == 0.0 or (dropout_rng == "native" and hmora_kernels.resolve_backend(backend, device) != "triton"):
        return 0
    return torch.randint(0, 2**31 - 1, (1,), device=device)


def _kaiming_uniform(rows: int, d_in: int, device) -> nn.Parameter:
    weight = torch.empty(rows, d_in, device=device, dtype=torch.float32)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # U(-1/sqrt(d_in), 1/sqrt(d_in))
    return nn.Parameter(weight)


class AdapterLinear(nn.Module):
    """Common part: the frozen base layer and the A / B matrices (fp32, on the base weight's device)."""

    def __init__(self, base_layer: nn.Linear, a_rows: int, b_cols: int, config: HMoRAConfig, state: RoutingState):
        super().__init__()
        self.state = state  # shared with the model (a plain object, not a module): is the adapter on?
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.lora_A = _kaiming_uniform(a_rows, base_layer.in_features, device)
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, b_cols, device=device, dtype=torch.float32))
        self.scaling = config.scaling
        self.dropout_p = config.dropout
        self.dropout_rng = config.dropout_rng
        self.backend = config.backend

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads `proj.weight.dtype`
        return self.base_layer.weight

    def active_dropout(self) -> float:
        return self.dropout_p if self.training else 0.0


class LoRALinear(AdapterLinear):
    """Plain LoRA (SPEC 2.1): y = x W^T + b + s (drop(x) A^T) B^T."""

    def __init__(self, base_layer: nn.Linear, config: HMoRAConfig, state: RoutingState):
        super().__init__(base_layer, config.lora_r, config.lora_r, config, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.state.adapters_enabled:
            return self.base_layer(x)
        flat = x.reshape(-1, self.in_features)
        p = self.active_dropout()
        # the base output is ours alone (a frozen Linear keeps no output for backward): the op may add into it
        seed = draw_seed(p, self.dropout_rng, self.backend, x.device)
        out = hmora_kernels.lora(flat, self.lora_A, self.lora_B, self.scaling, dropout_p=p, seed=seed,
                                 dropout_rng=self.dropout_rng, base=self.base_layer(flat), reuse_base=True,
                                 backend=self.backend)
        return out.view(*x.shape[:-1], self.out_features)

    def merged_linear(self) -> nn.Linear:
        """The base Linear with s B A folded into its weight (in the weight's dtype)."""
        weight = self.base_layer.weight
        with torch.no_grad():
            delta = self.scaling * (self.lora_B @ self.lora_A)
            weight.copy_((weight.float() + delta).to(weight.dtype))
        return self.base_layer


class ExpertLinear(AdapterLinear):
    """One member of a routed group (SPEC 2.2): E LoRA experts, A_cat (E*r, d_in) or Hydra A (r, d_in),
    B_cat (d_out, E*r). The group's owner (member 0) holds the `router`."""

    def __init__(self, base_layer: nn.Linear, config: HMoRAConfig, state: RoutingState,
                 router: Optional[Router] = None):
        r, experts = config.lora_r, config.num_experts
        super().__init__(base_layer, r if config.use_hydra_lora else experts * r, experts * r, config, state)
        self.scaling = config.routed_scaling
        if router is not None:
            self.router = router
        self.group: Optional[RoutedGroup] = None  # a plain object: no module registered twice
        self.member_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.state.adapters_enabled:
            return self.base_layer(x)
        return self.group.member_output(self.member_index, x)


class RoutedGroup:
    """Layers sharing one router and one input (q/k/v, gate/up, or a single layer).

    The first member called computes every member's output in one `routed_group` op and leaves the others
    waiting in the forward's context, keyed by the identity of the shared input tensor.
    """

    def __init__(self, name: str, members: List[ExpertLinear], config: HMoRAConfig, state: RoutingState):
        self.name = name
        self.members = members
        self.top_k = config.gate_top_k
        self.renorm = config.renorm
        self.rule = config.routing_rule(members[0].router.kind)
        self.state = state
        # rank-wise routing: real tokens per expert since the last `take_selection_counts` (training forwards only)
        self.selection_counts: Optional[torch.Tensor] = None
        for index, member in enumerate(members):
            member.group, member.member_index = self, index

    @property
    def router(self) -> Router:
        return self.members[0].router

    def member_output(self, member: int, x: torch.Tensor) -> torch.Tensor:
        context = self.state.context
        waiting = context.take_pending(self.name, x, member)
        if waiting is not None:
            return waiting
        outputs = self.compute(x)
        context.put_pending(self.name, x, outputs, member)
        return outputs[member]

    def compute(self, x: torch.Tensor) -> List[torch.Tensor]:
        owner, router, context = self.members[0], self.router, self.state.context
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        # on the flat input, so that each base is a tensor of its own (not a view) the op may add into
        bases = [m.base_layer(flat) for m in self.members]
        p = owner.active_dropout()
        seed = draw_seed(p, owner.dropout_rng, owner.backend, x.device)
        recompute = context.reentrant_recompute()
        task_probs = loss_task_probs = None
        if router.kind != "token":
            # here, inside the layer's forward, where FSDP has gathered the task router's weights
            task_probs = self._task_probs(context, ROUTING_TASK, p, recompute)
            if task_probs is None:
                raise RuntimeError(f"{self.name}: a {router.kind} router needs the task representation of this "
                                   f"batch; call the HMoRAModel (forward or generate), not the wrapped base model")
            loss_task_probs = self._task_probs(context, LOSS_TASK, p, recompute)
        result = hmora_kernels.routed_group(
            flat, [m.lora_A for m in self.members], [m.lora_B for m in self.members], owner.scaling,
            **router.token_args(flat, p, seed, owner.dropout_rng),
            task_probs=None if task_probs is None else context.per_token_rows(self.name, task_probs, lead[0]),
            alpha=router.alpha if router.kind == "hybrid" else None, kind=router.kind, top_k=self.top_k,
            renorm=self.renorm, dropout_p=p, seed=seed, dropout_rng=owner.dropout_rng, bases=bases, reuse_bases=True,
            rule=self.rule, token_mask=None if self.rule is None else context.token_mask(self.name, lead, flat.device),
            selection_bias=getattr(router, "selection_bias", None), backend=owner.backend,
        )
        if isinstance(self.rule, RankWise) and owner.training and not (recompute or in_backward()):
            self._count_selections(result.kept_counts)
        experts = result.gates.shape[-1]
        logits, p_tok = (None if t is None else t.view(*lead, experts) for t in (result.logits, result.p_tok))
        gates = result.gates.view(*lead, experts)
        context.record(self.name, logits, p_tok, gates, task_probs, loss_task_probs)
        outputs = [out.view(*lead, -1) for out in result.outputs]
        if recompute:  # the auxiliary losses' terms of this group, recomputed with gradients (hmora.reentrant)
            terms = context.loss_terms
            if p_tok is not None and "token" in terms:
                outputs[0] = inject(outputs[0], terms["token"](logits, p_tok, gates), context, "token")
            task_loss_probs = task_probs if loss_task_probs is None else loss_task_probs
            if task_loss_probs is not None and "task" in terms:
                outputs[0] = inject(outputs[0], terms["task"](task_loss_probs), context, "task")
        return outputs

    def _count_selections(self, counts: torch.Tensor) -> None:
        """Adds a training forward's selections to the counts of the next selection-bias update (recomputations
        under activation checkpointing are not counted: they repeat a forward that was)."""
        with torch.no_grad():
            self.selection_counts = counts if self.selection_counts is None else self.selection_counts + counts

    def take_selection_counts(self) -> torch.Tensor:
        """(E,) int64 real tokens per expert since the last call (zeros if none), and start counting afresh."""
        counts = self.selection_counts
        self.selection_counts = None
        if counts is None:
            bias = self.router.selection_bias
            counts = torch.zeros(bias.shape, dtype=torch.int64, device=bias.device)
        return counts

    def _task_probs(self, context: ForwardContext, which: str, dropout_p: float, recompute: bool):
        """This group's task-router probabilities (num_sequences, E) of the context's task representation
        `which`, or None if the context has none."""
        task_repr = context.task_repr(self.name, which)
        if task_repr is None:
            return None
        if recompute:
            task_repr = sink(task_repr, context, which)
        return self.router.task_probs(task_repr, dropout_p)
