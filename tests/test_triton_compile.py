"""Ahead-of-time compile check (no GPU here): every tier of kernel configuration the planner can choose compiles to
cubin for sm_80 and sm_90, exactly as Triton's JIT would compile it, without register spills and within the
hardware's register and shared-memory limits. `python -m benchmarks.compile_report --all` compiles every
configuration and dtype signature (an hour or more: outside CI). The compile steps run in subprocesses without
TRITON_INTERPRET (the conftest sets it for this process, and interpreted kernels cannot be compiled)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hmora_kernels.triton_backend.plan import MAX_EXPERTS, MAX_RANK, MAX_RANK_WIDTH, check_limits, configuration_space

KERNELS = {"shrink_route_kernel", "expand_kernel", "output_grad_kernel", "route_grad_kernel", "input_grad_kernel",
           "rank_grad_kernel"}
ROOT = Path(__file__).resolve().parents[1]


def without_interpreter(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def planner_space():
    """(tiers, (E, r) pairs) of everything the planner can choose inside the limits."""
    tiers, pairs = set(), set()
    for config, shape, _, _ in configuration_space():
        tiers.add(repr(config.tier))
        pairs.add((shape.E, shape.r))
    return tiers, pairs


def test_every_tier_compiles_for_sm80_and_sm90_without_spills(planner_space):
    done = without_interpreter("-m", "benchmarks.compile_report", "--json", timeout=1200)
    assert done.returncode in (0, 1), f"compile report crashed:\n{done.stderr[-4000:]}"
    rows = json.loads(done.stdout)
    assert {row["kernel"] for row in rows} == KERNELS
    tiers, _ = planner_space
    for arch in ("sm_80", "sm_90"):
        compiled = {row["tier"] for row in rows if row["arch"] == arch}
        assert compiled == tiers, f"{arch}: tiers the planner can choose but CI does not compile: {tiers - compiled}"
    for row in rows:
        what = f"{row['kernel']} {row['arch']} ({row['config']})"
        assert row["local"] == 0 and row["stack"] == 0, f"{what} spills: LOCAL {row['local']} STACK {row['stack']}"
        assert 0 < row["reg"] <= row["limits"]["reg"], f"{what}: {row['reg']} registers per thread"
        assert row["reg"] * 32 * row["num_warps"] <= row["limits"]["reg_file"], f"{what}: register file exceeded"
        assert row["shared"] <= row["limits"]["shared"], f"{what}: {row['shared']} B shared memory"
    assert done.returncode == 0


# Configurations that spilled while the per-tier check compiled another configuration of their tier (issue 11), as
# (kernel, groups whose launches include it, constexprs the planner must now choose for it, compiled kernels: one
# per dtype signature of the groups x sm_80 / sm_90).
SPILLED = {
    # expand, per-expert A, chunks of 8 experts x 8 ranks (E >= 3, r <= 8: the paper's E 8 r 8): 8 bytes on sm_80,
    # 32 on sm_90 at 32 tokens a block; the fp32 and bf16 kernels spilled
    "expand 8x8 chunks": ("expand_kernel", "[GroupSpec(8, 8, False, d, (d,) * 3, (d,) * 3, 'token') "
                          "for d in (torch.float32, torch.bfloat16)]",
                          dict(EC=8, RCH=8, HYDRA=False, BM=16), 4),
    # rank_grad (deterministic), per-expert A, 1 expert x 64 ranks (r 33..64), TF32: 40 bytes on sm_80 at BM 32
    "rank_grad 1x64 chunks": ("rank_grad_kernel", "[GroupSpec(1, 33, False, d, (d,), (d,), 'hybrid', top_k=1, "
                              "deterministic=True) for d in (torch.float32, torch.bfloat16)]",
                              dict(EC=1, RCH=64, HYDRA=False, BM=16, DOT="tf32"), 4),
    # input_grad with full-fp32 dots, 3 members x 64 columns of h (e.g. E 1 r 33): 16 bytes on sm_90 at MG 4
    "input_grad ieee 64 columns": ("input_grad_kernel", "[GroupSpec(1, 33, False, torch.float32, (torch.float32,) * 3, "
                                   "(torch.float32,) * 3, 'hybrid', top_k=1, precision='ieee')]",
                                   dict(HC=64, MG=2, DOT="ieee"), 2),
}


@pytest.mark.parametrize("case", sorted(SPILLED))
def test_configurations_that_spilled_compile_clean(case):
    kernel, specs, expected, compiles = SPILLED[case]
    code = ("import json, torch; from hmora_kernels.triton_backend.aot import ARCHS, GroupSpec, launch_jobs, run_job; "
            f"print(json.dumps([run_job(job, arch) for job in launch_jobs({specs}) if job.kernel == {kernel!r} "
            "for arch in ARCHS]))")
    done = without_interpreter("-c", code, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == compiles
    for row in rows:
        what = f"{row['arch']} ({row['config']}, {row['constexprs']})"
        assert {k: row["constexprs"][k] for k in expected} == expected, what
        assert row["local"] == 0 and row["stack"] == 0, f"{what} spills: LOCAL {row['local']} STACK {row['stack']}"


def test_sampled_groups_launch_only_configurations_the_check_compiles():
    """The compile check's jobs come from the planner's enumeration. Groups drawn wider than its representatives
    (up to 12 members in two launch groups, members and bases of mixed dtypes, every routing kind, router logits
    given, any top-k, both modes and precisions, the routing rules) are recorded through the real launch code, and so
    are the routing rules at the paper setting and SMoRA's (`rule_groups`, what `compile_report --rules` compiles);
    every launch must be a compiled kernel of the enumeration (the JIT's specialisation key), or the check misses
    what the GPU would run. The rules are run-time kernel arguments: they add no kernel."""
    code = ("import json; from hmora_kernels.triton_backend.aot import rule_groups, sampled_groups, uncovered_launches; "
            "print(json.dumps(uncovered_launches(sampled_groups(30, seed=1) + rule_groups())))")
    done = without_interpreter("-c", code, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_kernels_accept_exactly_the_enumerated_space(planner_space):
    """check_limits lets through exactly the (E, r) the compile check enumerates, and names the limit otherwise."""
    _, pairs = planner_space
    for E in range(1, MAX_EXPERTS + 3):
        for r in range(1, MAX_RANK + 3):
            try:
                check_limits(E, r)
                accepted = True
            except ValueError as err:
                accepted = False
                assert "limit" in str(err) and "backend='torch'" in str(err)
            assert accepted == ((E, r) in pairs), f"E={E} r={r}: check_limits and the compile check disagree"
    assert (MAX_EXPERTS, MAX_RANK_WIDTH // MAX_EXPERTS) in pairs and (MAX_RANK_WIDTH // MAX_RANK, MAX_RANK) in pairs
