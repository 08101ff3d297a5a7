"""Named suites: which workloads, implementations and metrics one `hmora-bench` run covers.

default  the paper point (Qwen2-1.5B shapes, T 4096, E 8, r 8, Hydra, top-2, dropout 0.1), routed group and
         decoder layer, memory metrics of every implementation; T scaling 512..4096; speedup vs E*r at T 512.
full     adds LLaMA-3-8B shapes, T up to 16k, E 2..64 x r 4..64, Hydra on/off, soft/top-2, torch.compile.
quick    tiny version of default for a smoke run (seconds).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

from .workloads import LLAMA3_8B, PAPER, QWEN2_1_5B, Setting, Workload

MEMORY_IMPLS = ("reference", "torch", "triton")
TIME_IMPLS = ("reference", "torch", "triton")


@dataclass(frozen=True)
class Case:
    """One workload measured with some implementations; `section` names the table/plot it feeds."""

    section: str
    workload: Workload
    implementations: Tuple[str, ...]
    memory: bool
    timing: bool


def _paper_point(tokens: int, scopes: Sequence[str] = ("group", "layer"), model=QWEN2_1_5B) -> List[Case]:
    return [Case("paper", Workload(model, PAPER, tokens, scope), MEMORY_IMPLS, memory=True, timing=False)
            for scope in scopes]


def _scaling(tokens: Sequence[int]) -> List[Case]:
    return [Case("scaling", Workload(QWEN2_1_5B, PAPER, t, "group"), MEMORY_IMPLS, memory=True, timing=False)
            for t in tokens]


def _speedup(tokens: int, grid: Sequence[Tuple[int, int]], settings: Sequence[Setting],
             impls: Tuple[str, ...]) -> List[Case]:
    # dropout 0: with dropout the torch paths spend their time generating Philox masks, not in the adapter math
    return [Case("speedup", Workload(QWEN2_1_5B, replace(s, num_experts=e, rank=r, dropout_p=0.0), tokens, "group"),
                 impls, memory=False, timing=True)
            for s in settings for e, r in grid]


def _suites() -> Dict[str, List[Case]]:
    top2_hydra = PAPER
    variants = [PAPER, replace(PAPER, hydra=False), replace(PAPER, top_k=None), replace(PAPER, hydra=False, top_k=None)]
    small_grid = [(2, 4), (8, 8), (8, 32), (64, 8), (32, 32)]
    full_grid = [(e, r) for e in (2, 8, 16, 64) for r in (4, 8, 16, 64)]
    return {
        "quick": _paper_point(256, ("group",)) + _scaling([128, 256])
        + _speedup(128, [(2, 4), (8, 8)], [top2_hydra], ("reference", "torch")),
        "default": _paper_point(4096) + _scaling([512, 1024, 2048])
        + _speedup(512, small_grid, [top2_hydra], ("reference", "torch")),
        "full": _paper_point(4096) + _paper_point(4096, model=LLAMA3_8B)
        + _scaling([512, 1024, 2048, 8192, 16384])
        + _speedup(512, full_grid, variants, ("reference", "torch", "torch.compile", "triton")),
    }


SUITES = _suites()
