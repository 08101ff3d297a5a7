"""Result types shared by all backends."""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch


class GroupOutput(NamedTuple):
    """What a routed group's forward returns.

    outputs: one (T, d_out_m) tensor per member (base + delta when bases are given, else the delta);
    logits:  (T, E) router logits, fp32 (None for task-only routing);
    p_tok:   (T, E) token-router softmax, fp32, what the auxiliary losses read (None for task-only);
    gates:   (T, E) final gates after the hybrid mix and top-k, fp32.
    """

    outputs: List[torch.Tensor]
    logits: Optional[torch.Tensor]
    p_tok: Optional[torch.Tensor]
    gates: torch.Tensor
