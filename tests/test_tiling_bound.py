"""The tiled-GEMM lower bound behind issue 15's as-issued analysis (benchmarks.tiling_bound): exact against a
brute force over every tile, and never above what the fused kernels are measured to issue."""
import json
import math
import os

from hypothesis import given, settings, strategies as st

from benchmarks import tiling_bound
from benchmarks.measure import measure_memory
from benchmarks.workloads import ModelShape, Setting, Workload, build_problem, minimum_traffic_bytes

RESULTS = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks", "rank-cpu-results.json")


@settings(max_examples=60, deadline=None)
@given(P=st.integers(1, 40), Q=st.integers(1, 40), K=st.integers(1, 9), accumulators=st.integers(1, 300))
def test_fewest_rereads_equal_a_brute_force_over_every_tile(P, Q, K, accumulators):
    """The search takes only the widest BN for each BM; every (BM, BN) pair must not do better."""
    brute = min(K * (P * (math.ceil(Q / BN) - 1) + Q * (math.ceil(P / BM) - 1))
                for BM in range(1, P + 1) for BN in range(1, Q + 1) if BM * BN <= accumulators)
    extra, BM, BN = tiling_bound.gemm_reread_elements(P, Q, K, accumulators)
    assert extra == brute
    assert BM * BN <= accumulators


def test_a_tile_covering_the_gemm_rereads_nothing_and_split_k_pays_partial_sums():
    assert tiling_bound.gemm_reread_elements(64, 48, 100, 64 * 48)[0] == 0
    assert tiling_bound.split_tiles_under(64, 48, 128, 64 * 64, allowed=0) == (1, (64, 64, 1))
    # one 16 x 16 tile (the smallest block) and k splits: each extra split reads and writes the output once more
    assert tiling_bound.split_tiles_under(16, 16, 128, 16 * 16, allowed=2 * 16 * 16 * 3) == (4, (16, 16, 4))
    assert tiling_bound.split_tiles_under(64, 48, 128, 16 * 16, allowed=0)[0] == 0  # any tiling re-reads


def test_bound_is_below_the_fused_forward_measured_in_the_interpreter():
    """A per-expert group small enough for the interpreter (d_in 256, E*r 128, three members): the fused forward's
    issued bytes are at least the bound for its own accumulator budget (32 tokens x 256 columns of shrink_route)."""
    shape = ModelShape("small", hidden=256, intermediate=512, kv_out=64)
    w = Workload(shape, Setting(num_experts=8, rank=16, hydra=False, top_k=2, dropout_p=0.0), tokens=96,
                 scope="group")
    row = measure_memory(w, "triton", build_problem(w))["forward"]
    bound = tiling_bound.forward_bound(w, accumulators=32 * 256)
    assert bound["rereads"] > 0  # 96 tokens x 384 columns do not fit one program's accumulators
    assert bound["minimum"] == row.traffic_min
    assert bound["bound"] <= row.traffic_bytes


def test_bound_is_below_every_fused_forward_of_the_committed_grid():
    """Issue 15's grid as measured (docs/benchmarks/rank-cpu-results.json): at the kernels' own budget and at
    both budgets of the analysis the bound never exceeds the fused forward's issued bytes, and the issue's T 1024
    point is over the torch backend's count at 128 registers x 8 warps (the claim docs/BENCHMARKS.md makes)."""
    with open(RESULTS) as f:
        results = list(tiling_bound.bound_rows(json.load(f)["rows"]))
    measured = [r for r in results if r["triton"] is not None]
    assert len(measured) == 21  # 16 E 8 workloads, 4 E 64, the T 1024 point
    for r in measured:
        assert tiling_bound.forward_bound(r["workload"], 32 * 256)["bound"] <= r["triton"]
        for b in r["budgets"].values():
            assert b["bound"] <= r["triton"]
    (t1024,) = [r for r in results if r["workload"].tokens == 1024]
    assert t1024["budgets"]["128 regs x 8 warps"]["bound"] > t1024["torch"]
    assert t1024["budgets"]["128 regs x 8 warps"]["programs"] == (0, None)


def test_workloads_rebuilt_from_committed_rows_have_the_rows_minimum():
    """The bound starts from the row's workload: rebuilt from the row (dtype, weights' dtype, routing), its minimum is
    the one the benchmark measured against, for fp32 rows and for bf16 / fp16 rows with fp32 weights."""
    for name in ("rank-cpu", "dtypes-cpu"):
        with open(os.path.join(os.path.dirname(RESULTS), f"{name}-results.json")) as f:
            rows = [r for r in json.load(f)["rows"] if r["phase"] != "both"]
        assert rows
        for r in rows:
            w = tiling_bound.workload_of(r)
            assert minimum_traffic_bytes(w, r["phase"]) == r["traffic_min"], (name, r)
