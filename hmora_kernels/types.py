"""Result types and routing rules shared by all backends."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch


class GroupOutput(NamedTuple):
    """What a routed group's forward returns.

    outputs: one (T, d_out_m) tensor per member (base + delta when bases are given, else the delta);
    logits:  (T, E) router logits, fp32 (None for task-only routing);
    p_tok:   (T, E) token-router softmax, fp32, what the auxiliary losses read (None for task-only); under
             `RankWise` the sigmoid scores;
    gates:   (T, E) final gates after the hybrid mix and the routing rule, fp32;
    routed_counts, kept_counts: (E,) int64 under a routing rule (None under the default rule): the real tokens
             (token_mask) whose rule chose expert e before the capacity limit, and those that kept it
             (equal unless `Switch` dropped tokens).
    """

    outputs: List[torch.Tensor]
    logits: Optional[torch.Tensor]
    p_tok: Optional[torch.Tensor]
    gates: torch.Tensor
    routed_counts: Optional[torch.Tensor] = None
    kept_counts: Optional[torch.Tensor] = None


# Routing rules other than the default (SPEC 3.4: soft, or top-k by `top_k` / `renorm`). Each turns the final
# mixed probabilities p (SPEC 3.3) of a token into its gates; README "Routing variants" gives the sources.

@dataclass(frozen=True)
class Switch:
    """Top-1 (MixLoRA's mixlora-switch, Switch Transformer): e* = the first expert of largest p, gate p[e*]
    (not renormalised). With a capacity C, each sequence's real tokens claim their expert in position order and
    the ones past the first C of an expert get no expert (gates 0); padding (token_mask 0) claims nothing and
    gets no expert. capacity None: no limit."""

    capacity: Optional[int] = None


@dataclass(frozen=True)
class TopP:
    """DynMoLE: experts in order of p (descending, lowest index first among equals) while their running sum
    (fp32, in that order) stays <= top_p, and at least the first keep_top_k; every expert when the normalised
    Tsallis entropy of p exceeds entropy_threshold (off for a threshold >= 1). Gates p * keep, not
    renormalised."""

    top_p: float = 0.75
    keep_top_k: int = 2
    entropy_threshold: float = 0.9
    entropy_index: float = 1.1
    entropy_eps: float = 1e-5


@dataclass(frozen=True)
class RankWise:
    """SMoRA (official code): scores s = sigmoid(logits), v = s + selection_bias (a non-gradient input), the
    top_k experts of v, gates top_k * v_i / sum of the selected v (sum k). Token routing only."""

    top_k: int = 8


ROUTING_RULES = (Switch, TopP, RankWise)
