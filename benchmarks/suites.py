"""Named suites: which workloads, implementations and metrics one `hmora-bench` run covers.

quick    seconds: a smoke run of every section at tiny T.
default  a few minutes on 2 idle CPU cores: the paper setting (Qwen2-1.5B shapes, E 8, r 8, Hydra, top-2,
         dropout 0.1) for the routed group at T 256 and the decoder layer at T 128, T scaling 64..256, and
         speedup vs E*r at T 256. The triton kernels run in the interpreter, ~a minute per 1k tokens of a group.
paper    the issue's acceptance point: the same at T 4096 (seconds on a GPU; hours in the CPU interpreter).
paper-cpu  the acceptance point as the interpreter counts it here (about an hour): the routed group and the
         decoder layer at T 4096, at dropout 0 (the fused kernels' bytes do not depend on dropout: their masks
         are regenerated in registers; the default suite shows both).
scaling-cpu  the routed group at T 256 .. 4096 (octaves), dropout 0: the linear-in-T plot up to the acceptance point.
variants-cpu  the routed group at T 1024, dropout 0, Hydra or per-expert A x top-2 or soft routing.
dtypes-cpu  the routed group at T 256 at the paper's dropout 0.1 as hmora's models run it (fp32 adapters and
         router, "native" masks), Hydra or per-expert A, top-2, activations in fp32, bf16 and fp16: saved bytes, traffic
         and launches of every implementation (about 25 minutes: the interpreter draws the masks element by element).
rank-cpu  the routed group at E*r 128 .. 1024 (E 8, r 16 .. 128; and E 64, r 16), Hydra or per-expert A x top-2 or
         soft routing, T 256, dropout 0: traffic and saved bytes against E*r.
rules-cpu  the routing rules (Switch C 160 and top-2 with per-expert A, DynMoLE top-p with Hydra, SMoRA's 64 rank-1
         experts top-8): the q/k/v group, dropout 0: bytes of every implementation at T 256, torch wall time at T 1024.
llama-cpu  LLaMA-3-8B shapes, routed group at T 256 and decoder layer at T 64 (minutes).
full     paper + LLaMA-3-8B shapes, T up to 16k (torch paths; triton to 4096), E 2..64 x r 4..64,
         Hydra on/off, soft/top-2, torch.compile.
layer-cpu  CPU time of one hybrid decoder layer of Qwen2-1.5B (layer 14 of 28) in a transformers model, T 1024,
         fp32, 2 threads, forward + backward, at dropout 0.1 and 0: the bare layer, a plain-PyTorch stand-in for the
         reference implementation (nn.Dropout per adapter), hmora's torch backend with the native and the philox
         mask generator, and torch.compile of it (benchmarks.decoder_layer). About 6 minutes on 2 idle cores at
         --repeats 12 (the philox and torch.compile rows take at most 5 rounds).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

import torch

import hmora_kernels as hk

from .decoder_layer import LayerCase, LayerSetting
from .workloads import LLAMA3_8B, PAPER, QWEN2_1_5B, Setting, Workload

MEMORY_IMPLS = ("reference", "torch", "triton")
# what hmora's models run: fp32 adapters and routers (whatever the model's dtype) and the "native" dropout masks
HMORA_MODEL = dict(param_dtype=torch.float32, dropout_rng="native")


@dataclass(frozen=True)
class Case:
    """One workload measured with some implementations; `section` names the table/plot it feeds."""

    section: str
    workload: Workload
    implementations: Tuple[str, ...]
    memory: bool
    timing: bool


def _paper_point(tokens: int, scopes: Sequence[str] = ("group", "layer"), model=QWEN2_1_5B,
                 setting: Setting = PAPER) -> List[Case]:
    return [Case("paper", Workload(model, setting, tokens, scope), MEMORY_IMPLS, memory=True, timing=False)
            for scope in scopes]


def _scaling(tokens: Sequence[int], impls: Tuple[str, ...] = MEMORY_IMPLS, setting: Setting = PAPER) -> List[Case]:
    return [Case("scaling", Workload(QWEN2_1_5B, setting, t, "group"), impls, memory=True, timing=False)
            for t in tokens]


def _speedup(tokens: int, grid: Sequence[Tuple[int, int]], settings: Sequence[Setting],
             impls: Tuple[str, ...]) -> List[Case]:
    # dropout 0: with dropout the torch paths spend their time generating Philox masks, not in the adapter math
    return [Case("speedup", Workload(QWEN2_1_5B, replace(s, num_experts=e, rank=r, dropout_p=0.0), tokens, "group"),
                 impls, memory=False, timing=True)
            for s in settings for e, r in grid]


def _suites() -> Dict[str, List[object]]:
    variants = [PAPER, replace(PAPER, hydra=False), replace(PAPER, top_k=None), replace(PAPER, hydra=False, top_k=None)]
    small_grid = [(2, 4), (4, 4), (8, 4), (8, 8), (16, 8), (64, 4)]  # E*r 8 .. 256
    full_grid = [(e, r) for e in (2, 8, 16, 64) for r in (4, 8, 16, 64)]
    timed = ("reference", "torch")
    paper = _paper_point(4096) + [Case("speedup", Workload(QWEN2_1_5B, replace(PAPER, dropout_p=0.0), 4096, "group"),
                                       ("reference", "torch", "torch.compile"), memory=False, timing=True)]
    no_dropout = replace(PAPER, dropout_p=0.0)
    # per-expert A top-2 beside switch (top-1, compact rank activations), top-p with the recipe's Hydra, SMoRA
    rules = [replace(no_dropout, hydra=False), replace(no_dropout, hydra=False, top_k=None, rule=hk.Switch(160)),
             replace(no_dropout, top_k=None, rule=hk.TopP()),
             replace(no_dropout, num_experts=64, rank=1, hydra=False, top_k=None, rule=hk.RankWise(8))]
    # the fused kernels' bytes do not depend on dropout (their masks live in registers; the default suite
    # measures both), so the interpreter counts T 4096 at dropout 0, where the torch paths skip the Philox masks
    paper_cpu = _paper_point(4096, setting=no_dropout) + [
        Case("speedup", Workload(QWEN2_1_5B, no_dropout, 4096, "group"), ("reference", "torch", "torch.compile"),
             memory=False, timing=True),
    ]
    return {
        "layer-cpu": [
            # the acceptance rows first, with every round asked for; the bit-exact masks and torch.compile after,
            # in at most 5 rounds (philox adds seconds per step, compiling takes minutes)
            LayerCase(LayerSetting(dropout=0.1), ("bare", "stand-in", "hmora")),
            LayerCase(LayerSetting(dropout=0.0), ("bare", "stand-in", "hmora")),
            LayerCase(LayerSetting(dropout=0.1), ("bare", "stand-in", "hmora-philox", "hmora+compile"), max_rounds=5),
        ],
        "paper-cpu": paper_cpu,
        # the q/k/v group over four octaves of T up to the acceptance point, dropout 0 as paper-cpu (10 min)
        "scaling-cpu": _scaling([256, 512, 1024, 2048, 4096], setting=no_dropout),
        # the routing variants' bytes: Hydra or per-expert A, top-2 or soft, the group at T 1024 (8 min)
        "variants-cpu": [Case("variants", Workload(QWEN2_1_5B, replace(v, dropout_p=0.0), 1024, "group"),
                              MEMORY_IMPLS, memory=True, timing=False) for v in variants],
        # the paper setting (dropout 0.1) and per-expert A as hmora's models run them, in the dtypes users train
        # in: bytes of every implementation
        "dtypes-cpu": [Case("dtypes", Workload(QWEN2_1_5B, replace(v, dtype=dtype, **HMORA_MODEL), 256,
                                     "group"), MEMORY_IMPLS, memory=True, timing=False)
                       for v in (PAPER, replace(PAPER, hydra=False))
                       for dtype in (torch.float32, torch.bfloat16, torch.float16)],
        # E*r 128 .. 1024 with 8 experts (r 16 .. 128), and 64 experts of rank 16, every variant (the rank tiling)
        "rank-cpu": [Case("rank", Workload(QWEN2_1_5B, replace(v, num_experts=e, rank=r, dropout_p=0.0), 256, "group"),
                          MEMORY_IMPLS, memory=True, timing=False)
                     for e, r in ((8, 16), (8, 32), (8, 64), (8, 128), (64, 16)) for v in variants],
        # the routing rules at the paper setting (C = ceil(1.25 * 1024 / 8)) and SMoRA's: bytes at T 256 and the
        # torch backend's time at T 1024
        "rules-cpu": [Case("rules", Workload(QWEN2_1_5B, s, 256, "group"), MEMORY_IMPLS, memory=True, timing=False)
                      for s in rules]
        + [Case("speedup", Workload(QWEN2_1_5B, s, 1024, "group"), ("torch",), memory=False, timing=True)
           for s in rules],
        # LLaMA-3-8B shapes at interpreter-sized T, paper setting with dropout 0.1
        "llama-cpu": _paper_point(256, ("group",), model=LLAMA3_8B) + _paper_point(64, ("layer",), model=LLAMA3_8B),
        "quick": _paper_point(64, ("group",)) + _scaling([32]) + _speedup(64, [(2, 4), (8, 8)], [PAPER], timed),
        "default": _paper_point(256, ("group",)) + _paper_point(128, ("layer",)) + _scaling([64, 128])
        + _speedup(256, small_grid, [PAPER], timed),
        "paper": paper,
        "full": paper + _paper_point(4096, model=LLAMA3_8B) + _scaling([512, 1024, 2048])
        + _scaling([8192, 16384], impls=("reference", "torch"))
        + _speedup(512, full_grid, variants, ("reference", "torch", "torch.compile", "triton")),
    }


SUITES = _suites()
