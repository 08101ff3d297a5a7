"""Ahead-of-time compile check (no GPU here): every Triton kernel, in every configuration the dispatcher can
choose, compiles to cubin for sm_80 and sm_90, without register spills and within the hardware's register and
shared-memory limits. Runs `python -m benchmarks.compile_report --json` in a subprocess without
TRITON_INTERPRET (the conftest sets it for this process, and interpreted kernels cannot be compiled)."""
import json
import os
import subprocess
import sys
from pathlib import Path

KERNELS = {"shrink_route_kernel", "expand_kernel", "output_grad_kernel", "route_grad_kernel", "input_grad_kernel"}


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--json"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode in (0, 1), f"compile report crashed:\n{done.stderr[-4000:]}"
    rows = json.loads(done.stdout)
    assert {row["kernel"] for row in rows} == KERNELS
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}
    for row in rows:
        what = f"{row['kernel']} {row['arch']} ({row['scenario']})"
        assert row["local"] == 0 and row["stack"] == 0, f"{what} spills: LOCAL {row['local']} STACK {row['stack']}"
        assert 0 < row["reg"] <= row["limits"]["reg"], f"{what}: {row['reg']} registers per thread"
        assert row["reg"] * 32 * row["num_warps"] <= row["limits"]["reg_file"], f"{what}: register file exceeded"
        assert row["shared"] <= row["limits"]["shared"], f"{what}: {row['shared']} B shared memory"
    assert done.returncode == 0
