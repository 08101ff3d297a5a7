"""How few bytes any tiled forward can issue: the lower bound behind issue 15's as-issued target.

A GEMM (P x K)(K x Q) whose programs each accumulate a BM x BN output tile in registers loads every input element
once per output tile it feeds: K * (P * ceil(Q / BN) + Q * ceil(P / BM)) elements, however K is walked (splitting K
across programs adds partial sums on top). Registers cap the tile: BM * BN <= the accumulators one program holds.
The fused forward's first GEMM (x against every member's A: P = T, Q = members x A's rows, K = d_in) must run in
some such tiling, so the workload's minimum plus that GEMM's re-reads is a lower bound on the forward's issued
bytes for any design whose programs load their operands from global memory for each output tile (Triton's GEMMs:
shared memory stages operand tiles, it does not keep them across output tiles). The torch backend's count is taken
at aten operator boundaries (each GEMM's operands counted once; cuBLAS's own tile re-reads are not seen), so where
the bound exceeds it, no register-tiled forward can issue fewer bytes than the torch backend's count.

    python -m benchmarks.tiling_bound docs/benchmarks/rank-cpu-results.json
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .workloads import MODELS, Setting, Workload, minimum_traffic_bytes

# fp32 accumulators one program can hold: 128 registers of each of 8 warps' threads (128 x 256, the largest tile of
# Triton's matmul tutorial configurations), and the whole 64K-register file of an SM (nothing left for operands)
ACCUMULATOR_BUDGETS = {"128 regs x 8 warps": 128 * 256, "whole register file": 64 * 1024}
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16)}


def tile_rereads(P: int, Q: int, K: int, BM: int, BN: int) -> int:
    """Input elements a BM x BN tiling of (P x K)(K x Q) issues beyond reading each input once."""
    return K * (P * (math.ceil(Q / BN) - 1) + Q * (math.ceil(P / BM) - 1))


def gemm_reread_elements(P: int, Q: int, K: int, accumulators: int) -> Tuple[int, int, int]:
    """(fewest input elements issued beyond reading each input once, BM, BN) over every tile BM x BN <= accumulators
    (any integer sizes, not only Triton's powers of two: a bound for every design)."""
    best = None
    for BM in range(1, P + 1):
        BN = min(Q, accumulators // BM)  # a wider tile never re-reads more
        if BN == 0:
            break
        extra = tile_rereads(P, Q, K, BM, BN)
        if best is None or extra < best[0]:
            best = (extra, BM, BN)
    return best


def split_tiles_under(P: int, Q: int, K: int, accumulators: int, allowed: int) -> Tuple[int, Optional[tuple]]:
    """Most programs (tiles x K splits, powers of two as Triton's blocks) whose issued re-reads plus split-K partial
    sums (a read and a write of each output element per extra split) stay within `allowed` elements."""
    sizes = [1 << i for i in range(4, 14)]
    best = (0, None)
    for BM in sizes:
        for BN in sizes:
            if BM * BN > accumulators:
                continue
            tiles = math.ceil(P / BM) * math.ceil(Q / BN)
            reread = tile_rereads(P, Q, K, BM, BN)
            for splits in range(1, K // 16 + 1):
                if reread + 2 * (splits - 1) * P * Q > allowed:
                    break
                if tiles * splits > best[0]:
                    best = (tiles * splits, (BM, BN, splits))
    return best


def workload_of(row: Dict[str, object]) -> Workload:
    routing = row["routing"]
    top_k = None if routing == "soft" else int(str(routing).removeprefix("top-"))
    setting = Setting(num_experts=row["experts"], rank=row["rank"], hydra=row["hydra"], top_k=top_k,
                      dropout_p=row["dropout"], dtype=DTYPES[row["dtype"]],
                      param_dtype=DTYPES.get(row.get("param_dtype")), dropout_rng=row.get("dropout_rng") or "philox")
    return Workload(MODELS[row["model"]], setting, row["tokens"], row["scope"])


def first_gemm(w: Workload) -> Tuple[int, int, int]:
    """(P, Q, K) of the group's first GEMM: x (T x d_in) against every member's A."""
    (group,) = [a for a in w.adapters() if a.routed and w.scope == "group"]
    return w.tokens, len(group.d_outs) * group.a_rows(w.setting), group.d_in


def forward_bound(w: Workload, accumulators: int) -> Dict[str, object]:
    """The forward's minimum, the first GEMM's fewest re-reads (bytes), their sum and the tile (BM, BN)."""
    extra, BM, BN = gemm_reread_elements(*first_gemm(w), accumulators)
    minimum = minimum_traffic_bytes(w, "forward")
    rereads = extra * w.setting.dtype.itemsize
    return dict(minimum=minimum, rereads=rereads, bound=minimum + rereads, tile=(BM, BN))


def bound_rows(rows: List[Dict[str, object]]) -> Iterator[Dict[str, object]]:
    """Per routed-group workload with a torch forward row: the bound at each budget beside the torch backend's and
    (when measured) the fused path's forward bytes, in the grid's order."""
    forward = {}
    for r in rows:
        if r.get("scope") != "group" or r["phase"] != "forward" or r.get("traffic_bytes") is None:
            continue  # the decoder-layer rows have no routed-group workload
        if r["routing"] != "soft" and not str(r["routing"]).removeprefix("top-").isdigit():
            continue  # the routing rules: Setting needs the rule object, which the row does not carry
        key = (r["model"], r["tokens"], r["experts"], r["rank"], r["hydra"], r["routing"], r["dtype"])
        forward.setdefault(key, {})[r["implementation"]] = r
    results = []
    for impls in forward.values():
        if "torch" not in impls:
            continue
        w = workload_of(impls["torch"])
        torch_bytes = impls["torch"]["traffic_bytes"]
        out = dict(workload=w, torch=torch_bytes, budgets={},
                   triton=impls["triton"]["traffic_bytes"] if "triton" in impls else None)
        for name, accumulators in ACCUMULATOR_BUDGETS.items():
            b = forward_bound(w, accumulators)
            allowed = (torch_bytes - b["minimum"]) // w.setting.dtype.itemsize
            out["budgets"][name] = dict(b, programs=split_tiles_under(*first_gemm(w), accumulators, allowed))
        results.append(out)
    yield from sorted(results, key=grid_order)


def grid_order(result: Dict[str, object]) -> tuple:
    w = result["workload"]
    s = w.setting
    return w.tokens, s.num_experts * s.rank, not s.hydra, s.routing, s.num_experts


def markdown(results: List[Dict[str, object]]) -> str:
    names = list(ACCUMULATOR_BUDGETS)
    head = ["T", "E", "r", "A", "routing", "dtype", "min MB", "torch /min", "triton /min"]
    for n in names:
        head += [f"bound /min ({n})", f"shrink programs under torch's count ({n})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        w = res["workload"]
        s = w.setting
        mn = res["budgets"][names[0]]["minimum"]
        cells = [w.tokens, s.num_experts, s.rank, "Hydra" if s.hydra else "per-expert", s.routing,
                 str(s.dtype).removeprefix("torch."), f"{mn / 1e6:.1f}", f"{res['torch'] / mn:.2f}x",
                 "" if res["triton"] is None else f"{res['triton'] / mn:.2f}x"]
        for n in names:
            b = res["budgets"][n]
            count, tile = b["programs"]
            over = b["bound"] > res["torch"]
            bold = "**" if over else ""  # over the torch backend's count: no design within the budget beats it
            programs = "none" if tile is None else f"{count} ({tile[0]} x {tile[1]}, {tile[2]} x K)"
            cells += [f"{bold}{b['bound'] / mn:.2f}x{bold}", programs]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tiling_bound", description=__doc__.split("\n")[0])
    parser.add_argument("results_json", help="a hmora-bench results.json with torch (and triton) forward rows")
    args = parser.parse_args(argv)
    with open(args.results_json) as f:
        rows = json.load(f)["rows"]
    results = list(bound_rows(rows))
    if not results:
        parser.error(f"{args.results_json}: no forward rows of a routed group (soft or top-k) with a torch measurement")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
