"""The routing variants of issue 16 in hmora_kernels: Switch (MixLoRA's mixlora-switch), TopP (DynMoLE), RankWise
(SMoRA); MixLoRA's own top-k is the default rule with renorm="sum".

Hand-computed cases go through `routed_group`, the op the fused kernels implement (router logits log(p) + 1, whose
softmax is p, or task probabilities p for exact values), in every backend that does the rules; then the reference's
float64 gradients (gradcheck), the torch and triton backends against the float64 reference (values, counts and every
gradient, fp32 / fp16 / bf16; triton on smaller problems of its own, the interpreter being slow), the variants'
losses by hand, and the one-line errors."""
import math

import pytest
import torch
from torch.autograd import gradcheck

import hmora_kernels as hk

from group_cases import GroupCase, make_problem, run_group
from tolerances import assert_close

BACKENDS = ["reference", "torch", "triton"]  # triton: the fused kernels, in the interpreter
F16, BF16, F32, D64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
D_IN = 32


def group(backend, *, p=None, task_probs=None, rule=None, token_mask=None, selection_bias=None, top_k=None,
          renorm="softmax", kind=None, alpha=None, logits=None):
    """(GroupOutput, router-logits leaf) of routed_group with router logits log(p) + 1 (p: (T, E)) or given logits,
    or task probabilities alone (kind "task")."""
    if p is not None:
        logits = torch.tensor(p, dtype=F32).log() + 1.0
    if logits is not None:
        logits = logits.clone().requires_grad_(True)
    T, E = (logits if logits is not None else torch.zeros(task_probs.shape[0], task_probs.shape[1])).shape
    if task_probs is not None and logits is not None:
        T = logits.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D_IN, generator=g)
    A, B = torch.randn(E * 2, D_IN, generator=g), torch.randn(8, E * 2, generator=g)
    out = hk.routed_group(x, [A], [B], 1.0, router_logits=logits, task_probs=task_probs, alpha=alpha,
                          kind=kind or ("token" if logits is not None else "task"), top_k=top_k, renorm=renorm,
                          rule=rule, token_mask=token_mask, selection_bias=selection_bias, backend=backend)
    return out, logits


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual.detach().double(), torch.tensor(expected, dtype=D64), rtol=0, atol=tol)


# ---- Switch ---------------------------------------------------------------------------------------------------
# E = 3, one sequence of 6 tokens; e* = 0, 0, 1, 0, 0, 2 (row 4 is an exact tie between experts 0 and 1: expert 0)
SWITCH_P = [[.5, .25, .25], [.6, .2, .2], [.2, .7, .1], [.4, .3, .3], [.45, .45, .1], [.1, .2, .7]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_switch_capacity_overflow_drops_the_later_tokens(backend):
    """C = 2: expert 0 is chosen by tokens 0, 1, 3, 4; tokens 3 and 4 overflow and get no expert (gates 0)."""
    out, logits = group(backend, p=SWITCH_P, rule=hk.Switch(capacity=2), token_mask=torch.ones(1, 6))
    close(out.gates, [[.5, 0, 0], [.6, 0, 0], [0, .7, 0], [0, 0, 0], [0, 0, 0], [0, 0, .7]])
    assert out.routed_counts.tolist() == [4, 1, 1] and out.kept_counts.tolist() == [2, 1, 1]
    assert out.routed_counts.dtype == out.kept_counts.dtype == torch.int64
    out.gates.sum().backward()  # d p_e* / dz = p_e* (onehot(e*) - p): kept tokens only
    close(logits.grad, [[.25, -.125, -.125], [.24, -.12, -.12], [-.14, .21, -.07], [0, 0, 0], [0, 0, 0],
                        [-.07, -.14, .21]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_switch_padding_consumes_no_capacity(backend):
    """Left padding m = 0 0 1 1 1 1: the pads get no expert and claim nothing, so tokens 3 and 4 fit in C = 2."""
    out, _ = group(backend, p=SWITCH_P, rule=hk.Switch(capacity=2), token_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]))
    close(out.gates, [[0, 0, 0], [0, 0, 0], [0, .7, 0], [.4, 0, 0], [.45, 0, 0], [0, 0, .7]])
    assert out.routed_counts.tolist() == [2, 1, 1] and out.kept_counts.tolist() == [2, 1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_switch_counts_capacity_per_sequence(backend):
    """The same rows as two sequences of 6: each sequence drops its own tokens 3 and 4; C = 4 drops nothing; no
    capacity is plain top-1 (padding included)."""
    p = SWITCH_P + SWITCH_P
    out, _ = group(backend, p=p, rule=hk.Switch(capacity=2), token_mask=torch.ones(2, 6))
    assert (out.gates != 0).sum(-1).tolist() == [1, 1, 1, 0, 0, 1] * 2
    assert out.routed_counts.tolist() == [8, 2, 2] and out.kept_counts.tolist() == [4, 2, 2]
    out, _ = group(backend, p=p, rule=hk.Switch(capacity=4), token_mask=torch.ones(2, 6))
    assert (out.gates != 0).sum(-1).tolist() == [1] * 12 and out.kept_counts.tolist() == [8, 2, 2]
    out, _ = group(backend, p=p, rule=hk.Switch(), token_mask=torch.tensor([[0] * 6, [1] * 6]))
    assert (out.gates != 0).sum(-1).tolist() == [1] * 12  # no capacity: every token routed, pads too
    assert out.routed_counts.tolist() == out.kept_counts.tolist() == [4, 1, 1]  # counts are of real tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_switch_routes_by_the_mixed_probabilities(backend):
    """Hybrid with a = 1/2 and p_task = (0, 1): both tokens' own argmax is expert 0, the mix (.3, .7) and (.45, .55)
    sends both to expert 1 with its mixed probability as gate; C = 1 then drops the second."""
    kwargs = dict(p=[[.6, .4], [.9, .1]], task_probs=torch.tensor([[0.0, 1.0]]), alpha=torch.tensor([0.0]),
                  kind="hybrid", token_mask=torch.ones(1, 2))
    out, _ = group(backend, rule=hk.Switch(capacity=2), **kwargs)
    close(out.gates, [[0, .7], [0, .55]])
    out, _ = group(backend, rule=hk.Switch(capacity=1), **kwargs)
    close(out.gates, [[0, .7], [0, 0]])
    assert out.routed_counts.tolist() == [0, 2] and out.kept_counts.tolist() == [0, 1]


# ---- TopP (DynMoLE) -------------------------------------------------------------------------------------------
def top_p_gates(backend, rows, **rule):
    """Gates of TopP on exact probabilities (task-only routing: p is the given rows, no softmax rounding)."""
    out, _ = group(backend, task_probs=torch.tensor(rows, dtype=F32), rule=hk.TopP(**rule))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep_top_k", [1, 2])
def test_top_p_keeps_the_expert_that_reaches_p_exactly(backend, keep_top_k):
    """.5 + .25 = .75 = top_p: "<=" keeps the second expert, the third (crossing) is out; H = 0.871 < 0.9."""
    close(top_p_gates(backend, [[.5, .25, .125, .125]], keep_top_k=keep_top_k).gates, [[.5, .25, 0, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_token_whose_top_1_already_reaches_p(backend):
    """.8 > top_p: the top-p set is empty, keep_top_k decides (H = 0.495)."""
    close(top_p_gates(backend, [[.8, .1, .05, .05]], keep_top_k=1).gates, [[.8, 0, 0, 0]])
    close(top_p_gates(backend, [[.8, .1, .05, .05]], keep_top_k=2).gates, [[.8, .1, 0, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_ties_go_to_the_lowest_index(backend):
    close(top_p_gates(backend, [[.4, .4, .1, .1]], keep_top_k=1).gates, [[.4, 0, 0, 0]])
    close(top_p_gates(backend, [[.4, .4, .1, .1]], keep_top_k=2).gates, [[.4, .4, 0, 0]])
    close(top_p_gates(backend, [[.6, .15, .15, .1]], top_p=0.5, keep_top_k=2).gates, [[.6, .15, 0, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_all_experts_when_the_entropy_is_high(backend):
    """H = 0.992 > 0.9: every expert, gates = p (not renormalised); threshold 1 turns the broadcast off."""
    rows = [[.3, .25, .25, .2]]
    out = top_p_gates(backend, rows)
    close(out.gates, rows)
    assert out.routed_counts.tolist() == out.kept_counts.tolist() == [1, 1, 1, 1]
    close(top_p_gates(backend, rows, entropy_threshold=1.0).gates, [[.3, .25, 0, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_gradient_flows_to_the_kept_experts(backend):
    """p = (.5, .25, .125, .125), kept (1, 1, 0, 0), upstream (1, 2, 3, 4): dz = p (dp - <p, dp>), dp = (1, 2, 0, 0)."""
    out, logits = group(backend, p=[[.5, .25, .125, .125]], rule=hk.TopP(top_p=0.8))
    (out.gates * torch.tensor([1.0, 2, 3, 4])).sum().backward()
    close(logits.grad, [[0, .25, -.125, -.125]])


def test_tsallis_entropy_by_hand():
    """Normalised Tsallis entropy, q = 1.1, eps = 1e-5; q = 1 is Shannon over ln E; E = 1 gives 0."""
    p = torch.tensor([[.5, .25, .125, .125], [.8, .1, .05, .05], [.4, .4, .1, .1], [.3, .25, .25, .2]], dtype=D64)
    expected = [(1 - ((row + 1e-5) ** 1.1).sum().item()) / (1 - 4 ** -0.1) for row in p]
    close(hk.tsallis_entropy(p, 1.1, 1e-5), expected, 1e-12)
    assert [round(h, 5) for h in expected] == [0.87096, 0.49496, 0.85857, 0.99226]
    shannon = [-((row + 1e-5) * (row + 1e-5).log()).sum().item() / math.log(4) for row in p]
    close(hk.tsallis_entropy(p, 1.0, 1e-5), shannon, 1e-12)
    assert hk.tsallis_entropy(torch.ones(3, 1), 1.1, 1e-5).tolist() == [0.0] * 3


# ---- RankWise (SMoRA) -----------------------------------------------------------------------------------------
RANK_LOGITS = torch.tensor([[0.0, 0.0, math.log(3), -math.log(3)]])  # sigmoid: (.5, .5, .75, .25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_wise_gates_and_gradient(backend):
    """k = 2, b = 0: ranks {2, 0} (0 beats 1 on the tie), gates k v / sum v = (.8, 0, 1.2, 0);
    upstream (1, 2, 3, 4): dv_i = (k / V)(dg_i - sum_S g dg / k), dz = dv s (1 - s) = (-.48, 0, .24, 0)."""
    out, logits = group(backend, logits=RANK_LOGITS, rule=hk.RankWise(top_k=2), selection_bias=torch.zeros(4))
    close(out.p_tok, [[.5, .5, .75, .25]])
    close(out.gates, [[.8, 0, 1.2, 0]])
    (out.gates * torch.tensor([1.0, 2, 3, 4])).sum().backward()
    close(logits.grad, [[-.48, 0, .24, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_wise_bias_moves_selection_and_gates(backend):
    """b = (0, .01, 0, 0): v = (.5, .51, .75, .25) selects {2, 1}; the bias is in the gate values."""
    out, _ = group(backend, logits=RANK_LOGITS, rule=hk.RankWise(top_k=2),
                   selection_bias=torch.tensor([0.0, 0.01, 0, 0]))
    close(out.gates, [[0, 2 * .51 / 1.26, 2 * .75 / 1.26, 0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_wise_counts_only_real_tokens(backend):
    out, _ = group(backend, logits=RANK_LOGITS.repeat(3, 1), rule=hk.RankWise(top_k=2),
                   selection_bias=torch.zeros(4), token_mask=torch.tensor([[0, 1, 1]]))
    assert out.kept_counts.tolist() == out.routed_counts.tolist() == [2, 0, 2, 0]


# ---- MixLoRA (the default rule, renorm "sum") -----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixlora_top2_sum_gates_and_tie(backend):
    out, _ = group(backend, p=[[.5, .25, .125, .125], [.8, .1, .05, .05]], top_k=2, renorm="sum")
    close(out.gates, [[2 / 3, 1 / 3, 0, 0], [8 / 9, 1 / 9, 0, 0]])
    assert out.routed_counts is None and out.kept_counts is None  # the default rule counts nothing
    out, _ = group(backend, task_probs=torch.tensor([[.2, .2, .4, .2]]), top_k=2, renorm="sum")
    close(out.gates, [[1 / 3, 0, 2 / 3, 0]])  # {2, 0}: the tie between 0, 1 and 3 goes to 0


# ---- the variants' losses by hand ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_switch_losses_by_hand(backend):
    """f from the argmax before dropping, P the mean p: E sum f P = 3 (4/6 .375 + 1/6 .35 + 1/6 .275) = 1.0625;
    left padding: 0.965625. logits log p + 1: logsumexp = 1, z-loss 1."""
    p = torch.tensor(SWITCH_P, dtype=D64)
    top1 = hk.route(p.log() + 1, top_k=1, backend=backend)[1]
    assert hk.load_balancing_loss(p, top1, 1, backend=backend).item() == pytest.approx(1.0625)
    mask = torch.tensor([0, 0, 1, 1, 1, 1])
    assert hk.load_balancing_loss(p, top1, 1, mask, backend=backend).item() == pytest.approx(0.965625)
    assert hk.router_z_loss(p.log() + 1, backend=backend).item() == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixlora_balance_loss_by_hand(backend):
    """Top-2 of (.5, .25, .125, .125) and (.8, .1, .05, .05): f = (1, 1, 0, 0) (sums to k, not divided by it),
    P = (.65, .175, .0875, .0875): 4 (.65 + .175) = 3.3."""
    p = torch.tensor([[.5, .25, .125, .125], [.8, .1, .05, .05]], dtype=D64)
    gates = hk.route(p.log(), top_k=2, renorm="sum", backend=backend)[1]
    assert hk.load_balancing_loss(p, gates, 1, backend=backend).item() == pytest.approx(3.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynmole_loss_by_hand(backend):
    """Same two tokens, keep_top_k 2: mean H = 0.6829569; f = mean gate values (.65, .175, 0, 0), E sum f P =
    1.8125; 0.01 H + 0.001 B = 0.0086421. f carries gradient."""
    p = torch.tensor([[.5, .25, .125, .125], [.8, .1, .05, .05]], dtype=D64, requires_grad=True)
    gates = hk.route(p.log(), rule=hk.TopP(), backend=backend)[1]
    entropy = hk.entropy_loss(p, 1.1, 1e-5, backend=backend)
    balance = hk.load_balancing_loss(p, gates, 1, frequencies="gate_values", backend=backend)
    assert entropy.item() == pytest.approx(0.6829569, abs=1e-7)
    assert balance.item() == pytest.approx(1.8125)
    assert (0.01 * entropy + 0.001 * balance).item() == pytest.approx(0.0086421, abs=1e-7)
    selected_only = hk.load_balancing_loss(p, gates.detach(), 1, frequencies="selected", backend=backend)
    assert selected_only.item() == pytest.approx(4 * (.65 + .175))  # f = fraction selected = (1, 1, 0, 0)
    gates = gates.detach().requires_grad_(True)
    balance = hk.load_balancing_loss(p, gates, 1, frequencies="gate_values", backend=backend)
    grad_p, grad_g = torch.autograd.grad(balance, (p, gates))  # E sum_e f_e P_e over N = 2 tokens: E f / N, E P / N
    close(grad_p, [[1.3, .35, 0, 0]] * 2, 1e-12)
    close(grad_g, [[1.3, .35, .175, .175]] * 2, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_loss_masks_padding(backend):
    p = torch.tensor([[[.25, .25, .25, .25], [.97, .01, .01, .01]]], dtype=D64)
    h = hk.tsallis_entropy(p, 1.1, 1e-5)
    assert hk.entropy_loss(p, 1.1, 1e-5, torch.tensor([[0, 1]]), backend=backend).item() == pytest.approx(h[0, 1])
    assert hk.entropy_loss(p, 1.1, 1e-5, backend=backend).item() == pytest.approx(h.mean())


# ---- float64 gradients of the reference ------------------------------------------------------------------------
@pytest.mark.parametrize("rule,kind,hydra", [
    (hk.Switch(capacity=2), "hybrid", True),   # capacity drops, the mix's gradient into alpha and p_task
    (hk.Switch(), "task", False),              # task-only top-1: gradient into p_task only
    (hk.TopP(top_p=0.6), "hybrid", False),     # top-p with the entropy broadcast on some tokens
    (hk.RankWise(top_k=2), "token", False),    # sigmoid scores, bias in the gates
])
def test_gradcheck_routed_group_rules(rule, kind, hydra):
    T, d, E, r = 8, 7, 4, 2
    g = torch.Generator().manual_seed(3)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=D64) * scale).requires_grad_(True)

    x, W, b = rand(T, d), rand(E, d), rand(E)
    A = [rand(r if hydra else E * r, d) for _ in range(2)]
    B = [rand(dout, E * r) for dout in (4, 3)]
    p_task = torch.softmax(rand(2, E).detach(), -1).requires_grad_(True)
    alpha = torch.tensor([0.4], dtype=D64, requires_grad=True)
    extra = dict(token_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
                 selection_bias=torch.tensor([0.0, 0.02, -0.01, 0.0]) if isinstance(rule, hk.RankWise) else None)

    def f(x, A0, A1, B0, B1, W, b, p_task, alpha):
        out = hk.routed_group(x, [A0, A1], [B0, B1], 2.0, router_weight=W, router_bias=b, task_probs=p_task,
                              alpha=alpha, kind=kind, rule=rule, dropout_p=0.2, seed=11, backend="reference",
                              **extra)
        return (*out.outputs, out.gates) + (() if out.p_tok is None else (out.p_tok,))

    # fast mode: random projections of the Jacobian, so the per-token loops of the reference run a few times only
    assert gradcheck(f, (x, *A, *B, W, b, p_task, alpha), fast_mode=True)


def test_gradcheck_variant_losses():
    g = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(2, 5, 4, generator=g, dtype=D64) * 2, -1).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=D64)
    gates = hk.route(p.detach().reshape(10, 4).log(), rule=hk.TopP(), backend="reference")[1].reshape(2, 5, 4)
    gates = gates.requires_grad_(True)
    assert gradcheck(lambda p, g: hk.load_balancing_loss(p, g, 1, mask, frequencies="gate_values",
                                                         backend="reference"), (p, gates))
    for q in (1.0, 1.1, 1.7):
        assert gradcheck(lambda p: hk.entropy_loss(p, q, 1e-5, mask, backend="reference"), (p,))


# ---- torch backend against the float64 reference ---------------------------------------------------------------
CASES = [
    GroupCase("switch without capacity: top-1 with the unrenormalised gate, q/k/v members", T=128, d_in=48,
              d_outs=[32, 16, 16], E=8, r=4, rule=hk.Switch()),
    GroupCase("switch, capacity 3 of 32-token sequences (drops), left padding, hybrid, Hydra, dropout", T=128,
              d_in=48, d_outs=[32, 16], E=8, r=8, hydra=True, kind="hybrid", n_seq=4, padded=True,
              rule=hk.Switch(capacity=3), dropout_p=0.1),
    GroupCase("switch in a task-only layer: one expert per sequence", T=64, d_in=40, d_outs=[24], E=4, r=4,
              kind="task", n_seq=2, rule=hk.Switch()),
    GroupCase("switch with capacity, fp16", T=128, d_in=48, d_outs=[32], E=8, r=4, n_seq=2, padded=True,
              rule=hk.Switch(capacity=5), dtype=F16),
    GroupCase("switch with capacity, bf16 activations, fp32 parameters", T=128, d_in=48, d_outs=[32], E=8, r=4,
              n_seq=4, rule=hk.Switch(capacity=2), dtype=BF16, param_dtype=F32),
    GroupCase("top-p, DynMoLE defaults, gate/up pair", T=128, d_in=48, d_outs=[96, 96], E=8, r=8, rule=hk.TopP()),
    GroupCase("top-p in a hybrid layer with padding, Hydra, keep_top_k 1, top_p 0.5", T=128, d_in=48, d_outs=[32],
              E=8, r=4, hydra=True, kind="hybrid", n_seq=4, padded=True, rule=hk.TopP(top_p=0.5, keep_top_k=1)),
    GroupCase("top-p in a task-only layer, Shannon entropy (q = 1)", T=64, d_in=40, d_outs=[24], E=8, r=2,
              kind="task", n_seq=4, rule=hk.TopP(entropy_index=1.0)),
    GroupCase("top-p without the broadcast (threshold 1), E = 16", T=128, d_in=40, d_outs=[24], E=16, r=2,
              rule=hk.TopP(entropy_threshold=1.0)),
    GroupCase("top-p, fp16, dropout", T=128, d_in=48, d_outs=[32, 16], E=8, r=4, rule=hk.TopP(), dtype=F16,
              dropout_p=0.1),
    GroupCase("top-p, bf16, hybrid", T=128, d_in=48, d_outs=[32], E=8, r=4, kind="hybrid", n_seq=2,
              rule=hk.TopP(), dtype=BF16),
    GroupCase("rank-wise: 16 rank-1 experts, 4 active, selection bias, padding", T=128, d_in=48, d_outs=[32, 16],
              E=16, r=1, n_seq=2, padded=True, rule=hk.RankWise(top_k=4)),
    GroupCase("rank-wise at SMoRA's shape: 64 rank-1 experts, 8 active, q/k/v, dropout", T=128, d_in=64,
              d_outs=[48, 16, 16], E=64, r=1, rule=hk.RankWise(top_k=8), dropout_p=0.1),
    GroupCase("rank-wise, fp16", T=128, d_in=48, d_outs=[32], E=16, r=1, rule=hk.RankWise(top_k=3), dtype=F16),
    GroupCase("rank-wise, bf16 activations, fp32 parameters", T=128, d_in=48, d_outs=[32], E=32, r=1,
              rule=hk.RankWise(top_k=8), dtype=BF16, param_dtype=F32),
    GroupCase("MixLoRA: top-2 renormalised by sum, Hydra", T=128, d_in=48, d_outs=[96, 96], E=8, r=8, hydra=True,
              top_k=2, renorm="sum"),
]


# The fused kernels in the interpreter: small T (32-64) and d_in 32, each case for a path of the kernels.
TRITON_CASES = [
    GroupCase("switch, capacity 2 of 32-token sequences (drops), left padding, hybrid, Hydra, dropout", T=64, d_in=32,
              d_outs=[32, 16], E=8, r=4, hydra=True, kind="hybrid", n_seq=2, padded=True, rule=hk.Switch(capacity=2),
              dropout_p=0.1),
    GroupCase("switch with capacity, one A per expert (h keeps the top-1 block; dropped tokens none), fp16", T=64,
              d_in=32, d_outs=[32], E=8, r=4, n_seq=2, padded=True, rule=hk.Switch(capacity=3), dtype=F16),
    GroupCase("switch with capacity, bf16 activations, fp32 parameters, q/k/v", T=64, d_in=32, d_outs=[32, 16, 16],
              E=8, r=4, n_seq=2, rule=hk.Switch(capacity=2), dtype=BF16, param_dtype=F32),
    GroupCase("switch in a task-only layer, no capacity", T=32, d_in=32, d_outs=[16], E=4, r=4, kind="task",
              n_seq=2, rule=hk.Switch()),
    GroupCase("top-p, DynMoLE defaults, gate/up pair", T=64, d_in=32, d_outs=[32, 32], E=8, r=4, rule=hk.TopP()),
    GroupCase("top-p in a hybrid layer with padding, Hydra, keep_top_k 1, top_p 0.5", T=64, d_in=32, d_outs=[32],
              E=8, r=4, hydra=True, kind="hybrid", n_seq=2, padded=True, rule=hk.TopP(top_p=0.5, keep_top_k=1)),
    GroupCase("top-p in a task-only layer, Shannon entropy (q = 1)", T=32, d_in=32, d_outs=[16], E=8, r=2,
              kind="task", n_seq=2, rule=hk.TopP(entropy_index=1.0)),
    GroupCase("top-p without the broadcast (threshold 1), E = 16 (the 16-wide routing tile), bf16", T=64, d_in=32,
              d_outs=[16], E=16, r=2, rule=hk.TopP(entropy_threshold=1.0), dtype=BF16),
    GroupCase("top-p, fp16, dropout, E = 24 (the 64-wide routing tile)", T=64, d_in=32, d_outs=[32], E=24, r=2,
              rule=hk.TopP(), dtype=F16, dropout_p=0.1),
    GroupCase("rank-wise: 16 rank-1 experts, 4 active, selection bias, padding, 2 members", T=64, d_in=32,
              d_outs=[32, 16], E=16, r=1, n_seq=2, padded=True, rule=hk.RankWise(top_k=4)),
    GroupCase("rank-wise at SMoRA's shape: 64 rank-1 experts (the expert limit), 8 active, dropout", T=32, d_in=32,
              d_outs=[32], E=64, r=1, rule=hk.RankWise(top_k=8), dropout_p=0.1),
    GroupCase("rank-wise, bf16 activations, fp32 parameters", T=64, d_in=32, d_outs=[32], E=32, r=1,
              rule=hk.RankWise(top_k=3), dtype=BF16, param_dtype=F32),
]


@pytest.mark.parametrize("backend, case", [("torch", case) for case in CASES]
                         + [("triton", case) for case in TRITON_CASES if "triton" in BACKENDS], ids=str)
def test_backend_matches_reference(backend, case):
    problem = make_problem(case)
    assert_matches_reference(case, *run_group(case, problem, backend),
                             *run_group(case, problem, "reference", as_float64=True))


def assert_matches_reference(case, values, grads, expected_values, expected_grads):
    assert set(values) == set(expected_values)
    for name, expected in expected_values.items():
        if name.endswith("_counts"):
            assert torch.equal(values[name], expected), f"{name}: {values[name].tolist()} != {expected.tolist()}"
        else:
            assert_close(values[name], expected, case.dtype, f"value {name}")
    if isinstance(case.rule, hk.Switch) and case.rule.capacity is not None:
        assert (values["routed_counts"] > values["kept_counts"]).any(), "the case exists to drop tokens"
    for name, expected in expected_grads.items():
        assert grads[name] is not None, f"no gradient reached {name}"
        assert_close(grads[name], expected, case.dtype, f"grad {name}")


@pytest.mark.parametrize("case", [TRITON_CASES[1], TRITON_CASES[9]], ids=str)
def test_triton_deterministic_mode_with_rules(case):
    """torch.use_deterministic_algorithms(True): the atomic-free backward (rank_grad_kernel), where a dropped token
    (no selected expert) has no rank block to write or read; two runs agree bit for bit, values and counts too, and
    match the float64 reference."""
    problem = make_problem(case)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [run_group(case, problem, "triton") for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    for kind, first, second in zip(("value", "grad"), runs[0], runs[1]):
        for name in first:
            assert torch.equal(first[name], second[name]), f"{kind} {name} differs between deterministic runs"
    assert_matches_reference(case, *runs[0], *run_group(case, problem, "reference", as_float64=True))


# ---- errors ----------------------------------------------------------------------------------------------------
def group_error(**kwargs):
    x, A, B = torch.randn(6, 8), torch.randn(8, 8), torch.randn(5, 8)
    args = dict(router_weight=torch.randn(4, 8))
    args.update(kwargs)
    return hk.routed_group(x, [A], [B], 1.0, backend="torch", **args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rule=hk.Switch(), top_k=2), r"top_k=2 belongs to the default rule; rule=Switch\(capacity=None\) picks"),
    (dict(rule=hk.Switch(capacity=2)), r"Switch\(capacity=...\) counts per sequence: give token_mask"),
    (dict(rule=hk.Switch(capacity=0), token_mask=torch.ones(1, 6)), "Switch.capacity: expected None or an integer"),
    (dict(rule=hk.Switch(), token_mask=torch.ones(4, 2)), r"token_mask: expected \(num_sequences, seq_len\) with"),
    (dict(rule=hk.TopP(top_p=0.0)), r"TopP.top_p: expected a value in \(0, 1\], got 0.0"),
    (dict(rule=hk.TopP(keep_top_k=5)), r"TopP.keep_top_k: expected an integer in \[1, E = 4\], got 5"),
    (dict(rule=hk.TopP(entropy_index=3.0)), r"TopP.entropy_index: expected a Tsallis index q in \(0, 2\]"),
    (dict(rule=hk.TopP(entropy_threshold="high")), "TopP.entropy_threshold: expected a number > 0"),
    (dict(rule=hk.RankWise(top_k=2)), r"RankWise needs selection_bias of shape \(E = 4,\)"),
    (dict(rule=hk.RankWise(top_k=2), selection_bias=torch.zeros(3)), "selection_bias .3. must have E = 4"),
    (dict(rule=hk.RankWise(top_k=5), selection_bias=torch.zeros(4)), r"RankWise.top_k: expected an integer in"),
    (dict(rule=hk.RankWise(top_k=2), selection_bias=torch.zeros(4), kind="hybrid",
          task_probs=torch.full((1, 4), 0.25), alpha=torch.zeros(1)), "expected kind='token', got kind='hybrid'"),
    (dict(selection_bias=torch.zeros(4)), "selection_bias is an input of rule=RankWise"),
    (dict(rule="switch"), "rule: expected None .* or one of Switch, TopP, RankWise"),
    (dict(rule=hk.Switch(), kind="task", task_probs=torch.full((3, 4), 0.25), token_mask=torch.ones(2, 3)),
     r"token_mask \(2, 3\) and task_probs \(3, 4\) must have one row per sequence each"),
])
def test_rule_errors_are_one_clear_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        group_error(**kwargs)
    assert "\n" not in str(info.value)


def test_rank_wise_refuses_a_hydra_a():
    with pytest.raises(ValueError, match="RankWise experts are ranks of one LoRA"):
        hk.routed_group(torch.randn(6, 8), [torch.randn(1, 8)], [torch.randn(5, 4)], 1.0,
                        router_weight=torch.randn(4, 8), rule=hk.RankWise(top_k=2), selection_bias=torch.zeros(4),
                        backend="torch")


def test_loss_argument_errors():
    p = torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match="frequencies: expected one of"):
        hk.load_balancing_loss(p, p, 1, frequencies="counts")
    with pytest.raises(ValueError, match=r"entropy_index: expected a Tsallis index q in \(0, 2\]"):
        hk.entropy_loss(p, 0.0)


def test_triton_refuses_rank_wise_beyond_its_expert_limit():
    """Rank-wise experts are E*r rank-1 experts of the fused kernels, which route at most 64 experts per token: more
    is refused in one line naming the limit and the backend that does it (nothing falls back silently)."""
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match=r"E = 128 experts exceeds the kernels' limit 64; use backend='torch'") as info:
        hk.routed_group(torch.randn(6, 32), [torch.randn(128, 32)], [torch.randn(16, 128)], 1.0,
                        router_weight=torch.randn(128, 32), rule=hk.RankWise(top_k=8), selection_bias=torch.zeros(128),
                        backend="triton")
    assert "\n" not in str(info.value)
