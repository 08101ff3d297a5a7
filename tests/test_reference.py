"""The reference ops: float64 gradcheck of every op, and small cases computed by hand from SPEC.md."""
import math

import pytest
import torch
from torch.autograd import gradcheck

import hmora_kernels as hk

D64 = torch.float64


def rand(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64) * scale).requires_grad_(True)


def test_gradcheck_lora_with_dropout():
    x, A, B = rand(5, 9, seed=1), rand(3, 9, seed=2), rand(6, 3, seed=3)
    assert gradcheck(lambda x, A, B: hk.lora(x, A, B, 1.5, dropout_p=0.3, seed=4, backend="reference"), (x, A, B))


@pytest.mark.parametrize("kind,top_k,hydra", [
    ("token", None, False),   # soft routing, one A per expert
    ("token", 2, True),       # the paper's top-2 with Hydra
    ("hybrid", 2, False),     # token + task mix: gradients into alpha and task_probs
    ("task", 1, True),        # task-only: no router, gradient into task_probs only
])
def test_gradcheck_routed_group(kind, top_k, hydra):
    T, d, E, r = 6, 7, 3, 2
    x = rand(T, d, seed=1)
    A = [rand(r if hydra else E * r, d, seed=2 + m) for m in range(2)]
    B = [rand(dout, E * r, seed=5 + m) for m, dout in enumerate([4, 3])]
    W, b = rand(E, d, seed=8), rand(E, seed=9)
    p_task = torch.softmax(rand(2, E, seed=10).detach(), -1).requires_grad_(True)
    alpha = torch.tensor(0.4, dtype=D64, requires_grad=True)

    def f(x, A0, A1, B0, B1, W, b, p_task, alpha):
        out = hk.routed_group(x, [A0, A1], [B0, B1], 2.0, router_weight=W, router_bias=b, task_probs=p_task,
                              alpha=alpha, kind=kind, top_k=top_k, dropout_p=0.2, seed=11, backend="reference")
        extra = () if out.p_tok is None else (out.p_tok, out.logits)
        return (*out.outputs, out.gates, *extra)

    assert gradcheck(f, (x, *A, *B, W, b, p_task, alpha))


@pytest.mark.parametrize("renorm", ["softmax", "sum"])
def test_gradcheck_route(renorm):
    logits, p_task = rand(8, 4, seed=1), torch.softmax(rand(2, 4, seed=2).detach(), -1).requires_grad_(True)
    alpha = torch.tensor(-0.2, dtype=D64, requires_grad=True)
    assert gradcheck(lambda l, p, a: hk.route(l, task_probs=p, alpha=a, kind="hybrid", top_k=2, renorm=renorm,
                                              backend="reference"), (logits, p_task, alpha))


def test_gradcheck_losses():
    p = torch.softmax(rand(2, 5, 4, seed=1).detach() * 2, -1).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=D64)
    # gamma_b = 0.9 keeps this batch off the balance cap, so every branch of the loss has a gradient to check
    assert gradcheck(lambda p: hk.gjs_loss(p, 0.5, 0.9, mask, backend="reference"), (p,))
    assert hk.gjs_loss(p, 0.5, 0.9, mask, backend="reference").item() > 0
    gates = hk.route(p.detach().reshape(10, 4), top_k=2, backend="reference")[1].reshape(2, 5, 4)
    assert gradcheck(lambda p: hk.load_balancing_loss(p, gates, 2, mask, backend="reference"), (p,))
    assert gradcheck(lambda l: hk.router_z_loss(l, mask, backend="reference"), (rand(2, 5, 4, seed=3),))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_top2_renormalisations_by_hand(backend):
    # the two largest probabilities are 0.291 and 0.167 (SPEC 3.4)
    p = torch.tensor([[0.291, 0.167, 0.150, 0.140, 0.132, 0.120]], dtype=D64)
    logits = p.log()  # softmax(log p) = p
    _, gates = hk.route(logits, top_k=2, renorm="softmax", backend=backend)
    assert gates[0, :2].tolist() == pytest.approx([0.5310, 0.4690], abs=5e-4)  # e^.291 / (e^.291 + e^.167)
    assert (gates[0, 2:] == 0).all()
    _, gates = hk.route(logits, top_k=2, renorm="sum", backend=backend)
    assert gates[0, :2].tolist() == pytest.approx([0.291 / 0.458, 0.167 / 0.458], abs=1e-9)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_softmax_top2_gates_stay_within_bounds(backend):
    """Softmax over two probabilities in [0, 1] lies in [1/(1+e), e/(1+e)] = [0.269, 0.731] (SPEC 3.4)."""
    logits = torch.randn(500, 8, dtype=D64) * 10
    _, gates = hk.route(logits, top_k=2, backend=backend)
    selected = gates[gates > 0]
    assert selected.numel() == 1000
    assert selected.min() >= 1 / (1 + math.e) - 1e-12 and selected.max() <= math.e / (1 + math.e) + 1e-12


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_hybrid_mix_by_hand(backend):
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=D64)
    p_task = torch.tensor([[1.0, 0.0], [0.25, 0.75]], dtype=D64)  # tokens 0-1 are sequence 0, tokens 2-3 sequence 1
    alpha = torch.tensor(0.0, dtype=D64)  # sigmoid(0) = 1/2
    p_tok, gates = hk.route(logits, task_probs=p_task, alpha=alpha, kind="hybrid", backend=backend)
    s2 = 1 / (1 + math.exp(-2))
    s1 = 1 / (1 + math.exp(-1))
    expected = [[0.75, 0.25], [(s2 + 1) / 2, (1 - s2) / 2], [0.375, 0.625], [(1 - s1 + 0.25) / 2, (s1 + 0.75) / 2]]
    torch.testing.assert_close(gates, torch.tensor(expected, dtype=D64))
    _, task_only = hk.route(None, task_probs=p_task, kind="task", num_tokens=4, backend=backend)
    torch.testing.assert_close(task_only, p_task.repeat_interleave(2, 0))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gjs_loss_at_its_ends(backend):
    E, gamma_c, gamma_b = 8, 0.5, 0.98
    one_hot = torch.eye(E, dtype=D64)
    balanced_certain = one_hot.repeat(4, 1)  # every token sure, experts used evenly
    assert hk.gjs_loss(balanced_certain, gamma_c, gamma_b, backend=backend).item() == pytest.approx(0.0, abs=1e-7)
    collapsed = one_hot[[3] * 32]  # every token surely to expert 3
    assert hk.gjs_loss(collapsed, gamma_c, gamma_b, backend=backend).item() == pytest.approx(gamma_b, abs=1e-7)
    uniform = torch.full((32, E), 1.0 / E, dtype=D64)
    assert hk.gjs_loss(uniform, gamma_c, gamma_b, backend=backend).item() == pytest.approx(1 - gamma_c, abs=1e-7)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gjs_loss_ignores_masked_tokens(backend):
    E = 4
    good = torch.eye(E, dtype=D64).repeat(2, 1).reshape(1, 8, E)
    junk = torch.full((1, 8, E), 1.0 / E, dtype=D64)
    p = torch.cat([good, junk], dim=0)
    mask = torch.tensor([[1] * 8, [0] * 8])
    assert hk.gjs_loss(p, 0.5, 0.98, mask, backend=backend).item() == pytest.approx(0.0, abs=1e-7)
    assert hk.gjs_loss(p, 0.5, 0.98, backend=backend).item() > 0.1


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_load_balancing_and_z_loss_by_hand(backend):
    # E = 2, top-1: half the tokens to each expert, p = 0.5 everywhere -> 2 * (0.5*0.5 + 0.5*0.5) = 1
    p = torch.full((4, 2), 0.5, dtype=D64)
    gates = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]], dtype=D64)
    assert hk.load_balancing_loss(p, gates, 1, backend=backend).item() == pytest.approx(1.0)
    # collapsed on expert 0 with p = (0.9, 0.1): 2 * 0.9 * 1 = 1.8
    p = torch.tensor([[0.9, 0.1]] * 4, dtype=D64)
    gates = torch.tensor([[1.0, 0]] * 4, dtype=D64)
    assert hk.load_balancing_loss(p, gates, 1, backend=backend).item() == pytest.approx(1.8)
    logits = torch.zeros(3, 4, dtype=D64)  # logsumexp = ln 4
    assert hk.router_z_loss(logits, backend=backend).item() == pytest.approx(math.log(4) ** 2)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_losses_agree_between_backends(backend):
    p = torch.softmax(torch.randn(3, 11, 8, dtype=D64) * 2, -1)
    mask = (torch.rand(3, 11) > 0.3).to(D64)
    gates = hk.route(p.reshape(-1, 8).log(), top_k=2, backend="reference")[1].reshape(3, 11, 8)
    for fn, args in [(hk.gjs_loss, (p, 0.5, 0.98, mask)), (hk.load_balancing_loss, (p, gates, 2, mask)),
                     (hk.router_z_loss, (p.log(), mask))]:
        torch.testing.assert_close(fn(*args, backend=backend), fn(*args, backend="reference"))
