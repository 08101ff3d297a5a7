"""The vectorised torch backend equals the per-expert reference: values and every gradient, per dtype tolerance."""
import pytest
import torch

import hmora_kernels as hk

from group_cases import GroupCase, check_lora_against_reference, make_problem, run_group
from tolerances import assert_close

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

CASES = [
    GroupCase("single token: T = 1 edge of every reduction over tokens", T=1, d_in=40, d_outs=[24], E=2, r=4),
    GroupCase("odd T and d not a multiple of 16, three members of different d_out (q/k/v)",
              T=7, d_in=37, d_outs=[29, 13, 13], E=8, r=4, top_k=2),
    GroupCase("one expert: a routed group degenerates to plain LoRA; rank 1", T=7, d_in=33, d_outs=[20], E=1, r=1),
    GroupCase("one expert Hydra-shaped A: the layouts coincide", T=7, d_in=33, d_outs=[20], E=1, r=4, hydra=True),
    GroupCase("top-1: hard routing", T=128, d_in=48, d_outs=[32, 16], E=8, r=8, top_k=1),
    GroupCase("top-k = E: every expert selected, softmax renorm of all probabilities",
              T=128, d_in=48, d_outs=[32], E=8, r=8, top_k=8),
    GroupCase("sum renormalisation", T=128, d_in=48, d_outs=[32], E=8, r=8, top_k=2, renorm="sum"),
    GroupCase("Hydra, paper routing (top-2), gate/up pair", T=128, d_in=48, d_outs=[96, 96], E=8, r=8, hydra=True,
              top_k=2),
    GroupCase("many experts, rank 16", T=128, d_in=40, d_outs=[24], E=16, r=16, top_k=2, hydra=True),
    GroupCase("large rank 64", T=128, d_in=72, d_outs=[40], E=2, r=64),
    GroupCase("hybrid layer: token + task mix with alpha, 4 sequences", T=128, d_in=48, d_outs=[32, 16], E=8, r=8,
              hydra=True, kind="hybrid", top_k=2, n_seq=4),
    GroupCase("task-only layer: no token router", T=128, d_in=48, d_outs=[32], E=8, r=4, kind="task", top_k=2,
              n_seq=2),
    GroupCase("hybrid, soft routing, E = 16", T=128, d_in=40, d_outs=[24], E=16, r=4, kind="hybrid", n_seq=8),
    GroupCase("dropout: independent masks for router and each member", T=128, d_in=48, d_outs=[32, 16], E=8, r=8,
              top_k=2, dropout_p=0.1),
    GroupCase("no base outputs: the op returns the deltas", T=7, d_in=37, d_outs=[29], E=2, r=4, with_bases=False),
    GroupCase("many tokens: T = 1000, k = 2, Hydra, hybrid", T=1000, d_in=64, d_outs=[48, 16], E=8, r=8, hydra=True,
              kind="hybrid", top_k=2, n_seq=4),
    GroupCase("fp16 activations and parameters", T=128, d_in=48, d_outs=[32, 16], E=8, r=8, top_k=2, dtype=F16),
    GroupCase("bf16 activations, Hydra, hybrid", T=128, d_in=48, d_outs=[32], E=8, r=8, hydra=True, kind="hybrid",
              top_k=2, n_seq=2, dtype=BF16),
    GroupCase("bf16 activations with fp32 adapter parameters", T=128, d_in=48, d_outs=[32], E=2, r=16, top_k=1,
              dtype=BF16, param_dtype=F32),
    GroupCase("fp16 activations with fp32 parameters, dropout", T=7, d_in=37, d_outs=[13], E=8, r=4, top_k=8,
              dtype=F16, param_dtype=F32, dropout_p=0.2),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_routed_group_matches_reference(case):
    problem = make_problem(case)
    expected_values, expected_grads = run_group(case, problem, "reference", as_float64=True)
    values, grads = run_group(case, problem, "torch")
    for name, expected in expected_values.items():
        assert_close(values[name], expected, case.dtype, f"value {name}")
        out_dtype = case.dtype if name.startswith("y") else (torch.float64 if case.dtype == torch.float64 else F32)
        assert values[name].dtype == out_dtype, f"{name} has dtype {values[name].dtype}, expected {out_dtype}"
    for name, expected in expected_grads.items():
        assert grads[name] is not None, f"no gradient reached {name}"
        assert_close(grads[name], expected, case.dtype, f"grad {name}")


REUSE_CASES = [c for c in CASES if c.with_bases and (c.dropout_p or len(c.d_outs) == 3 or c.kind == "hybrid")]


@pytest.mark.parametrize("case", REUSE_CASES, ids=str)
def test_reuse_bases_adds_into_the_bases_with_the_same_results(case):
    """reuse_bases: each output is its base tensor, updated in place (no new (T, d_out) tensor), and values and
    gradients are those of the default (with dropout and with mixed activation and parameter dtypes too)."""
    problem = make_problem(case)
    want_values, want_grads = run_group(case, problem, "torch")
    values, grads = run_group(case, problem, "torch", reuse_bases=True)
    for name, want in want_values.items():
        assert_close(values[name], want, case.dtype, f"value {name}")
    for name, want in want_grads.items():
        assert_close(grads[name], want, case.dtype, f"grad {name}")
    bases = [b.clone() for b in problem.bases]
    out = hk.routed_group(problem.x, problem.members_A, problem.members_B, 2.0, router_weight=problem.router_weight,
                          task_probs=problem.task_probs, alpha=problem.alpha, kind=case.kind, top_k=case.top_k,
                          bases=bases, reuse_bases=True, backend="torch")
    assert all(y.data_ptr() == b.data_ptr() for y, b in zip(out.outputs, bases))
    base = problem.bases[0].clone()
    y = hk.lora(problem.x, problem.members_A[0][:case.r], problem.members_B[0][:, :case.r], 2.0, base=base,
                reuse_base=True, backend="torch")
    assert y.data_ptr() == base.data_ptr()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_input_routes_in_fp32_with_dropout(backend):
    """Routing is fp32 end to end: with bf16 x and dropout, the router's dropped input is not rounded to bf16 before
    its fp32 GEMM, so logits and probabilities equal the float64 reference within the fp32 tolerance (the bf16 one
    is 3000x looser; rounding x / (1 - p) to bf16 put the logits 1.5e-2 off)."""
    if backend == "triton":
        pytest.importorskip("triton")
    case = GroupCase("bf16 x, fp32 router, dropout", T=64, d_in=48, d_outs=[32], E=8, r=8, hydra=True, top_k=2,
                     dtype=BF16, param_dtype=F32, dropout_p=0.1)
    problem = make_problem(case)
    expected, _ = run_group(case, problem, "reference", as_float64=True)
    values, _ = run_group(case, problem, backend)
    for name in ("logits", "p_tok"):
        assert_close(values[name], expected[name], F32, name)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("T,d_in,d_out,r", [(1, 40, 24, 4), (7, 37, 29, 1), (1000, 64, 48, 64)],
                         ids=["T1", "odd-sizes-rank1", "T1000-rank64"])
def test_lora_matches_reference(dtype, T, d_in, d_out, r):
    check_lora_against_reference("torch", dtype, T, d_in, d_out, r)


@pytest.mark.parametrize("case", [c for c in CASES if c.dtype == F32][:4], ids=str)
def test_non_contiguous_and_stride0_inputs(case):
    """A transposed x and a stride-0 (expanded) bias give the same result as their contiguous copies."""
    problem = make_problem(case)
    wide = torch.zeros(problem.x.shape[0], 2 * problem.x.shape[1], dtype=problem.x.dtype)
    wide[:, ::2] = problem.x
    x_t = wide[:, ::2]  # same values, column stride 2
    assert not x_t.is_contiguous()
    bias = problem.router_bias
    bias_b = bias[:1].expand(bias.shape[0]) if bias is not None else None  # stride 0
    n = len(problem.members_A)
    kwargs = dict(router_weight=problem.router_weight, task_probs=problem.task_probs, alpha=problem.alpha,
                  kind=case.kind, top_k=case.top_k, bases=problem.bases)
    for backend in ("reference", "torch"):
        got = hk.routed_group(x_t, problem.members_A, problem.members_B, 2.0, router_bias=bias_b, backend=backend,
                              **kwargs)
        want = hk.routed_group(problem.x, problem.members_A, problem.members_B, 2.0, backend=backend,
                               router_bias=None if bias is None else bias_b.contiguous(), **kwargs)
        for m in range(n):
            torch.testing.assert_close(got.outputs[m], want.outputs[m], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backward_inside", [True, False])
def test_bf16_autocast_forward_with_dropout(backward_inside):
    """A forward under bf16 autocast (hmora-train --bf16, TRL) hands the dropout shrink's backward bf16 dh for fp32
    weights, and a backward called inside autocast computes mm in bf16: neither may meet an fp32 buffer or weight
    as it is (both raised). Native masks: the reference draws the same."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=g)
    A = [torch.randn(4, 32, generator=g) for _ in range(2)]
    B = [torch.randn(8, 16, generator=g) for _ in range(2)]  # E 4, Hydra r 4
    W = torch.randn(4, 32, generator=g)
    grads = {}
    for backend in ("reference", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, *A, *B, W)]
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = hk.routed_group(leaves[0], leaves[1:3], leaves[3:5], 1.0, router_weight=leaves[5], kind="token",
                                  top_k=2, dropout_p=0.1, dropout_rng="native", backend=backend)
            loss = sum(y.float().square().sum() for y in out.outputs)
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        grads[backend] = [t.grad for t in leaves]
    for name, got, expected in zip(["x", "A0", "A1", "B0", "B1", "W"], grads["torch"], grads["reference"]):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05 * expected.abs().max().item(), msg=name)
