"""The per-forward routing context: what one forward of HMoRAModel hands to the injected layers.

Gates are never cached on modules. The model's forward creates a `ForwardContext` (the task probabilities
of this batch), installs it in the `RoutingState` shared by all injected layers, and in a `finally` stops
its recording and drops every group output still waiting for its member. The context stays installed
until the next forward, so that activation checkpointing, which recomputes layers during backward, routes
with the same task probabilities; it holds no gates and no layer activations by then. Outside its forward or
generate it serves task probabilities only to such a recomputation (never to a later direct call of the base
model). Consequence: with activation checkpointing, backpropagate a forward's loss before the next forward of
the same model (the order of every training loop).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch


def in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointed layers are recomputed)."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is None or graph_task_id() != -1


class ForwardContext:
    def __init__(self, task_probs: Optional[Dict[str, torch.Tensor]] = None, record: bool = False,
                 attention_mask: Optional[torch.Tensor] = None, aux_loss=None):
        self.task_probs = task_probs or {}
        self.active = True  # inside the forward or generate that created it
        self.recording = record
        self.attention_mask = attention_mask
        self.aux_loss = aux_loss  # (p_tok, gates, mask) -> one router's auxiliary loss, for recomputation
        # reentrant checkpointing (see hmora.reentrant): set when the layers ran under no_grad in the forward
        self.layers_without_grad = False
        self.task_grads: Dict[str, torch.Tensor] = {}
        self.aux_grad_scale: Optional[torch.Tensor] = None
        # group owner name -> (the shared input tensor, {member index: output not yet handed out})
        self.pending: Dict[str, Tuple[torch.Tensor, Dict[int, torch.Tensor]]] = {}
        self.p_tok: Dict[str, torch.Tensor] = {}
        self.gates: Dict[str, torch.Tensor] = {}

    def task_probs_for(self, owner: str, batch: int) -> torch.Tensor:
        """The (batch, E) task probabilities of router `owner`, repeated per sequence when generation expanded
        the batch (beams, several returned sequences)."""
        probs = self.task_probs.get(owner)
        if probs is None or not (self.active or in_backward()):  # never a previous batch's task weights
            raise RuntimeError(
                f"{owner}: task routing needs the task representation of this batch; call the HMoRAModel "
                f"(forward or generate), not the wrapped base model directly")
        if probs.shape[0] != batch:
            if batch % probs.shape[0]:
                raise ValueError(
                    f"{owner}: the task batch has {probs.shape[0]} sequences but the LM batch has {batch}; "
                    f"pass one task_input_ids row per input_ids row")
            probs = probs.repeat_interleave(batch // probs.shape[0], dim=0)
        return probs

    def take_pending(self, owner: str, x: torch.Tensor, member: int) -> Optional[torch.Tensor]:
        """The output the group computed for `member` on this very input tensor, if it is waiting."""
        entry = self.pending.get(owner)
        if entry is None or entry[0] is not x or member not in entry[1]:
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

    def record(self, owner: str, p_tok: Optional[torch.Tensor], gates: torch.Tensor) -> None:
        if not self.recording:
            return
        self.layers_without_grad |= not torch.is_grad_enabled()
        if p_tok is not None:
            self.p_tok[owner] = p_tok
        self.gates[owner] = gates

    def finish(self) -> None:
        """End of the forward: no more recording; drop waiting group outputs and the recorded router values
        (the forward has put them into its output)."""
        self.active = self.recording = False
        self.pending = {}
        self.p_tok, self.gates = {}, {}


class RoutingState:
    """Holder of the current ForwardContext, shared by an HMoRAModel and all its injected layers."""

    def __init__(self):
        self.context = ForwardContext()

    def install(self, context: ForwardContext) -> ForwardContext:
        previous, self.context = self.context, context
        return previous
