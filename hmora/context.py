"""The per-forward routing context: what one forward of HMoRAModel hands to the injected layers.

Gates are never cached on modules. The model's forward creates a `ForwardContext` (the task representation of
this batch and, when the task-router loss is taken over other sources, theirs), installs it in the `RoutingState`
shared by all injected layers, and in a `finally` stops its recording and drops every group output still waiting
for its member. Each routed group applies its own task router to the task representation inside its layer's
forward, where FSDP has unsharded the layer's parameters. The context stays installed until the next forward, so
that activation checkpointing, which recomputes layers during backward, routes with the same task representation; it
holds no gates and no layer activations by then. Outside its forward or generate it serves the task representation
only to such a recomputation (never to a later direct call of the base model). Consequence: with activation
checkpointing, backpropagate a forward's loss before the next forward of the same model (the order of every training
loop).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

# Names of the task representations a context carries: the one routing uses, and the task-router loss's sources.
ROUTING_TASK, LOSS_TASK = "routing", "loss"


def in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointed layers are recomputed)."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is None or graph_task_id() != -1


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if `b` is `a` or an alias of it holding the same values: the same view of the same memory, not written
    since. DeepSpeed ZeRO-3 hands each module its own `detach()`ed alias of the input."""
    return a is b or (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                      and a.storage_offset() == b.storage_offset() and a.shape == b.shape
                      and a.stride() == b.stride() and a.dtype == b.dtype and a._version == b._version)


class ForwardContext:
    """task_reprs: {ROUTING_TASK: (B, d), LOSS_TASK: (N, d)}, each optional. `loss_terms`: name -> function of one
    router's value giving its term of an auxiliary loss ("token": (logits, p_tok, gates) -> loss with this forward's
    mask; "task": p_task -> loss), used to recompute the terms under reentrant checkpointing."""

    def __init__(self, task_reprs: Optional[Dict[str, torch.Tensor]] = None, record: bool = False,
                 attention_mask: Optional[torch.Tensor] = None,
                 loss_terms: Optional[Dict[str, Callable[..., torch.Tensor]]] = None):
        self.task_reprs = {k: v for k, v in (task_reprs or {}).items() if v is not None}
        self.active = True  # inside the forward or generate that created it
        self.recording = record
        self.attention_mask = attention_mask
        self.loss_terms = loss_terms or {}
        # reentrant checkpointing (see hmora.reentrant): set when the layers ran under no_grad in the forward
        self.layers_without_grad = False
        self.task_grads: Dict[str, torch.Tensor] = {}
        self.loss_grad_scales: Dict[str, torch.Tensor] = {}
        # group owner name -> (the shared input tensor, {member index: output not yet handed out})
        self.pending: Dict[str, Tuple[torch.Tensor, Dict[int, torch.Tensor]]] = {}
        self.logits: Dict[str, torch.Tensor] = {}
        self.p_tok: Dict[str, torch.Tensor] = {}
        self.gates: Dict[str, torch.Tensor] = {}
        self.task_probs: Dict[str, torch.Tensor] = {}
        self.loss_task_probs: Dict[str, torch.Tensor] = {}

    def task_repr(self, owner: str, which: str = ROUTING_TASK) -> Optional[torch.Tensor]:
        """The task representation `which` of this forward (None if it has none), for router `owner`."""
        if not (self.active or in_backward()):  # never a previous batch's task representation
            raise RuntimeError(
                f"{owner}: task routing needs the task representation of this batch; call the HMoRAModel "
                f"(forward or generate), not the wrapped base model directly")
        return self.task_reprs.get(which)

    @staticmethod
    def per_token_rows(owner: str, probs: torch.Tensor, batch: int) -> torch.Tensor:
        """(batch, E) task probabilities, repeated per sequence when generation expanded the batch (beams,
        several returned sequences)."""
        if probs.shape[0] != batch:
            if batch % probs.shape[0]:
                raise ValueError(
                    f"{owner}: the task batch has {probs.shape[0]} sequences but the LM batch has {batch}; "
                    f"pass one task_input_ids row per input_ids row")
            probs = probs.repeat_interleave(batch // probs.shape[0], dim=0)
        return probs

    def token_mask(self, owner: str, lead: Tuple[int, ...], device) -> torch.Tensor:
        """(batch, seq_len) real-token mask of a layer input of leading shape `lead` = (batch, seq_len): the last
        seq_len columns of this forward's 2-D attention mask (a cached generation step feeds only its new tokens),
        repeated per sequence when generation expanded the batch; all ones without such a mask."""
        rows, length = (lead[0], lead[1]) if len(lead) == 2 else (1, math.prod(lead))
        mask = self.attention_mask
        if len(lead) != 2 or mask is None or mask.dim() != 2 or mask.shape[1] < length:
            return torch.ones(rows, length, dtype=torch.bool, device=device)
        mask = mask[:, -length:]
        if mask.shape[0] != rows:
            if rows % mask.shape[0]:
                raise ValueError(f"{owner}: the attention mask has {mask.shape[0]} rows but the layer input has "
                                 f"{rows} sequences; pass one attention_mask row per input_ids row")
            mask = mask.repeat_interleave(rows // mask.shape[0], dim=0)
        return mask.to(device) != 0

    def take_pending(self, owner: str, x: torch.Tensor, member: int) -> Optional[torch.Tensor]:
        """The output the group computed for `member` on this very input, if it is waiting."""
        entry = self.pending.get(owner)
        if entry is None or not same_values(entry[0], x) or member not in entry[1]:
            return None
        output = entry[1].pop(member)
        if not entry[1]:
            del self.pending[owner]
        return output

    def put_pending(self, owner: str, x: torch.Tensor, outputs: List[torch.Tensor], member: int) -> None:
        rest = {i: out for i, out in enumerate(outputs) if i != member}
        if rest:
            self.pending[owner] = (x, rest)

    def reentrant_recompute(self) -> bool:
        """True inside the recomputation of a layer that reentrant checkpointing ran under no_grad."""
        return self.layers_without_grad and not self.recording and torch.is_grad_enabled()

    def record(self, owner: str, logits: Optional[torch.Tensor], p_tok: Optional[torch.Tensor], gates: torch.Tensor,
               task_probs: Optional[torch.Tensor], loss_task_probs: Optional[torch.Tensor]) -> None:
        if not self.recording:
            return
        self.layers_without_grad |= not torch.is_grad_enabled()
        for table, value in ((self.logits, logits), (self.p_tok, p_tok), (self.task_probs, task_probs),
                             (self.loss_task_probs, loss_task_probs)):
            if value is not None:
                table[owner] = value
        self.gates[owner] = gates

    def finish(self) -> None:
        """End of the forward: no more recording; drop waiting group outputs and the recorded router values
        (the forward has put them into its output)."""
        self.active = self.recording = False
        self.pending = {}
        self.logits, self.p_tok, self.gates, self.task_probs, self.loss_task_probs = {}, {}, {}, {}, {}


class RoutingState:
    """Holder of the current ForwardContext and of the adapter switch, shared by an HMoRAModel and all its injected
    layers."""

    def __init__(self):
        self.context = ForwardContext()
        self.adapters_enabled = True  # False inside HMoRAModel.disable_adapter(): every layer is its base layer

    def install(self, context: ForwardContext) -> ForwardContext:
        previous, self.context = self.context, context
        return previous
