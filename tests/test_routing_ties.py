"""The top-k selection rule, the same in every backend (hmora_kernels.route): experts ordered by p descending, NaN
above every number, equal values (NaN and NaN too) by the lowest expert index; the first k. A row with a NaN gets NaN
gates exactly at its selected experts. Each case goes through `routed_group`, the op the fused kernels implement."""
import math

import pytest
import torch

import hmora_kernels as hk

BACKENDS = ["reference", "torch", "triton"]
E, D_IN = 8, 32
NAN = float("nan")


def gates_of(backend, *, logits=None, task_probs=None, top_k, renorm="softmax"):
    """The gates routed_group computes for router logits (deeper-router path) or task probabilities (task-only)."""
    if backend == "triton":
        pytest.importorskip("triton")
    T = logits.shape[0] if logits is not None else task_probs.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D_IN, generator=g)
    A, B = torch.randn(E * 4, D_IN, generator=g), torch.randn(16, E * 4, generator=g)
    out = hk.routed_group(x, [A], [B], 1.0, router_logits=logits, task_probs=task_probs,
                          kind="token" if logits is not None else "task", top_k=top_k, renorm=renorm,
                          backend=backend)
    return out.gates


def selected(gates):
    return [sorted(torch.nonzero((row != 0) | row.isnan()).flatten().tolist()) for row in gates]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_equal_logits_select_the_lowest_indices(backend, k):
    gates = gates_of(backend, logits=torch.zeros(5, E), top_k=k)
    assert selected(gates) == [list(range(k))] * 5
    torch.testing.assert_close(gates[:, :k], torch.full((5, k), 1.0 / k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renorm", ["softmax", "sum"])
def test_saturated_router_takes_the_winner_then_the_lowest_zero(backend, renorm):
    """exp(-200) underflows: p is exactly one-hot, so the second choice is a tie among seven exact zeros."""
    logits = torch.zeros(4, E)
    logits[torch.arange(4), torch.tensor([5, 0, 7, 1])] = 200.0
    p = torch.softmax(logits, -1)
    assert ((p == 0) | (p == 1)).all()
    gates = gates_of(backend, logits=logits, top_k=2, renorm=renorm)
    winners = [5, 0, 7, 1]
    runner_up = [0, 1, 0, 0]
    second = 1 / (1 + math.e) if renorm == "softmax" else 0.0  # softmax over the selected (1, 0), or 0 / 1
    for t in range(4):
        assert gates[t, winners[t]].item() == pytest.approx(1 - second, abs=1e-6)
        assert gates[t, runner_up[t]].item() == pytest.approx(second, abs=1e-6)
        others = [e for e in range(E) if e not in (winners[t], runner_up[t])]
        assert (gates[t, others] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN is the input
def test_nan_rows_select_nan_first_and_gate_nan_there(backend):
    rows = torch.tensor([
        [0.05, 0.10, NAN, 0.20, 0.15, 0.05, NAN, 0.10],   # two NaN: both first (by index), then the largest number
        [NAN] * E,                                         # all NaN: the lowest indices
        [0.30, 0.05, 0.05, 0.20, 0.10, 0.10, 0.10, 0.10],  # no NaN: unaffected
    ])
    gates = gates_of(backend, task_probs=rows, top_k=3)
    assert selected(gates) == [[2, 3, 6], [0, 1, 2], [0, 3, 4]]
    assert gates[:2][gates[:2] != 0].isnan().all() and gates[:2].isnan().sum() == 6
    torch.testing.assert_close(gates[2, [0, 3, 4]], torch.softmax(torch.tensor([0.30, 0.20, 0.10]), 0))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ties_in_route_and_in_every_dtype(backend):
    """hk.route (the backends' shared routing) follows the rule in float64 as in float32."""
    for dtype in (torch.float32, torch.float64):
        _, gates = hk.route(torch.zeros(3, 16, dtype=dtype), top_k=4, backend=backend)
        assert selected(gates) == [[0, 1, 2, 3]] * 3
