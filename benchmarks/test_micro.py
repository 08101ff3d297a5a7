"""Microbenchmarks of the public ops (pytest-benchmark): `pytest benchmarks/ --benchmark-enable`.

They time; they assert nothing about time. The triton backend is timed only on a CUDA device: under the
CPU interpreter its time measures Python, not the kernel (its bytes are what `hmora-bench` reports).
"""
from dataclasses import replace

import pytest
import torch

from benchmarks.workloads import PAPER, QWEN2_1_5B, Workload, backward, build_problem, forward

TIMED_BACKENDS = ["reference", "torch"] + (["triton"] if torch.cuda.is_available() else [])

# Qwen2-1.5B shapes at the paper setting (E 8, r 8, Hydra, top-2); small T so the reference loop stays seconds
CASES = {
    "qkv-group-T512": Workload(QWEN2_1_5B, replace(PAPER, dropout_p=0.0), 512, "group"),
    # dropout 0.1: the torch paths generate Philox masks with aten ops, the cost the fused kernels avoid
    "qkv-group-T128-dropout": Workload(QWEN2_1_5B, PAPER, 128, "group"),
    "decoder-layer-T128": Workload(QWEN2_1_5B, replace(PAPER, dropout_p=0.0), 128, "layer"),
}


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """One torch thread, as hmora-bench: on a shared, loaded machine OpenMP barriers dominate CPU timings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem(case: str):
    return build_problem(CASES[case], device="cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("backend", TIMED_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward(benchmark, case, backend):
    problem = _problem(case)
    with torch.no_grad():
        benchmark(forward, problem, backend)


@pytest.mark.parametrize("backend", TIMED_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward(benchmark, case, backend):
    problem = _problem(case)

    def step():
        problem.clear_grads()
        backward(problem, forward(problem, backend))

    benchmark(step)
