"""The fused Triton backend, run by the Triton interpreter on CPU, equals the float64 reference:
values and every gradient (x, each A and B, router weight and bias, alpha, task probabilities, and the
gradients that reach p_tok and the gates), with the per-dtype tolerances of tests/tolerances.py.

Dropout: the reference draws the kernels' very masks (hmora_kernels.dropout is bit-identical to tl.rand),
so dropout cases compare against the reference directly, same seed, same masks.
"""
import pytest
import torch

import hmora_kernels as hk

from group_cases import GroupCase, check_lora_against_reference, make_problem, run_group
from tolerances import assert_close

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# A pairwise-covering subset of the grid (T incl. 1 and odd; E 1/2/8/16; r 1/4/8/16/64; k 1/2/E; Hydra on/off;
# token/task/hybrid; fp32/fp16/bf16; fp32 parameters under half activations; different d_out; dropout on).
CASES = [
    GroupCase("T = 1: every reduction over tokens has one term", T=1, d_in=40, d_outs=[24], E=2, r=4, top_k=1),
    GroupCase("odd T and d_in, q/k/v with different d_out, E = 8 r = 4 top-2 (E*r = 32 padded blocks)",
              T=7, d_in=37, d_outs=[29, 13, 13], E=8, r=4, top_k=2),
    GroupCase("one expert, rank 1: K = 1 padded to the 16-wide tl.dot minimum", T=7, d_in=33, d_outs=[20], E=1, r=1),
    GroupCase("top-k = E = 8: softmax renorm over all probabilities, Hydra", T=50, d_in=48, d_outs=[32], E=8, r=8,
              top_k=8, hydra=True),
    GroupCase("sum renormalisation, 4 members (the member limit)", T=50, d_in=40, d_outs=[16, 24, 8, 16], E=8,
              r=4, top_k=2, renorm="sum"),
    GroupCase("E = 16 (the expert limit), Hydra r = 4, hybrid soft routing, 5 sequences", T=45, d_in=40,
              d_outs=[24], E=16, r=4, hydra=True, kind="hybrid", n_seq=5),
    GroupCase("task-only layer, top-2, 3 sequences", T=51, d_in=48, d_outs=[32, 16], E=8, r=8, kind="task",
              top_k=2, n_seq=3),
    GroupCase("r = 64, E = 2 (E*r = 128, the wide tile tier), hybrid top-1", T=40, d_in=72, d_outs=[40], E=2,
              r=64, kind="hybrid", top_k=1, n_seq=2),
    GroupCase("Hydra r = 16, E = 8 (E*r = 128) top-2, gate/up pair", T=40, d_in=48, d_outs=[64, 64], E=8, r=16,
              hydra=True, top_k=2),
    GroupCase("dropout p = 0.1: router and every member draw their own mask", T=50, d_in=48, d_outs=[32, 16], E=8,
              r=8, top_k=2, dropout_p=0.1),
    GroupCase("no base outputs: the op returns the deltas", T=7, d_in=37, d_outs=[29], E=2, r=4, with_bases=False),
    GroupCase("T = 1000, paper routing (Hydra, hybrid, top-2): many token blocks and split reductions",
              T=1000, d_in=32, d_outs=[48, 16], E=8, r=8, hydra=True, kind="hybrid", top_k=2, n_seq=4),
    GroupCase("fp16 activations and parameters, top-2", T=50, d_in=48, d_outs=[32, 16], E=8, r=8, top_k=2,
              dtype=F16),
    GroupCase("bf16, Hydra, hybrid, E = 16 top-2", T=50, d_in=48, d_outs=[32], E=16, r=4, hydra=True,
              kind="hybrid", top_k=2, n_seq=2, dtype=BF16),
    GroupCase("bf16 activations, fp32 parameters, r = 16 top-1", T=50, d_in=48, d_outs=[32], E=2, r=16, top_k=1,
              dtype=BF16, param_dtype=F32),
    GroupCase("fp16 activations, fp32 parameters, dropout 0.2, top-k = E", T=7, d_in=37, d_outs=[13], E=8, r=4,
              top_k=8, dtype=F16, param_dtype=F32, dropout_p=0.2),
]


def assert_matches_reference(case, values, grads, expected_values, expected_grads):
    for name, expected in expected_values.items():
        assert_close(values[name], expected, case.dtype, f"value {name}")
    assert values["y0"].dtype == case.dtype
    for name, expected in expected_grads.items():
        assert grads[name] is not None, f"no gradient reached {name}"
        assert_close(grads[name], expected, case.dtype, f"grad {name}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_routed_group_matches_reference(case):
    problem = make_problem(case)
    expected_values, expected_grads = run_group(case, problem, "reference", as_float64=True)
    values, grads = run_group(case, problem, "triton")
    assert_matches_reference(case, values, grads, expected_values, expected_grads)
    for name, leaf in problem.leaves().items():
        assert grads[name].dtype == leaf.dtype, f"grad {name}: {grads[name].dtype} for a {leaf.dtype} input"


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


# Deterministic mode sums every reduction in a fixed order: dB over one token split, dh and dgates over one slot
# of partials per d_out column block. d_out 150 spans 3 column blocks (64 wide), so member 0's partials are summed.
DETERMINISTIC_CASES = [
    GroupCase("per-expert A, hybrid top-2, dropout, member 0 over 3 column blocks", T=200, d_in=40, d_outs=[150, 24],
              E=8, r=4, kind="hybrid", top_k=2, n_seq=2, dropout_p=0.1),
    GroupCase("Hydra, token soft routing, q/k/v-like members over 3 + 1 + 1 column blocks", T=100, d_in=40,
              d_outs=[150, 16, 16], E=8, r=8, hydra=True, kind="token"),
]


@pytest.mark.parametrize("case", DETERMINISTIC_CASES, ids=str)
def test_deterministic_mode_is_bitwise_repeatable_and_matches_the_reference(case, deterministic):
    """torch.use_deterministic_algorithms(True): no float atomics, so two runs agree bit for bit; both equal the
    float64 reference as the atomic mode does."""
    problem = make_problem(case)
    runs = [run_group(case, problem, "triton") for _ in range(2)]
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), f"grad {name} differs between deterministic runs"
    assert_matches_reference(case, *runs[0], *run_group(case, problem, "reference", as_float64=True))


def test_deterministic_plain_lora_matches_reference(deterministic):
    """Plain LoRA in deterministic mode: its rank gradient is summed over the slots of 2 column blocks."""
    check_lora_against_reference("triton", F32, 70, 40, 100, 8)


def test_router_logits_from_a_deeper_router():
    """Given logits (T, E) instead of a router weight: the op returns them as they are and the gradient
    (through p_tok, the gates and the logits themselves) flows back into them."""
    torch.manual_seed(0)
    T, D, E, r = 33, 40, 8, 4
    x = torch.randn(T, D, dtype=torch.float64)
    logits = torch.randn(T, E, dtype=torch.float64)
    As, Bs = [torch.randn(E * r, D, dtype=torch.float64) / 7], [torch.randn(24, E * r, dtype=torch.float64)]
    w_out, w_logits = torch.randn(T, 24, dtype=torch.float64), torch.randn(T, E, dtype=torch.float64)

    def run(backend, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (x, logits, *As, *Bs)]
        out = hk.routed_group(leaves[0], leaves[2:3], leaves[3:4], 2.0, router_logits=leaves[1], top_k=2,
                              backend=backend)
        assert out.logits is leaves[1]
        loss = (out.outputs[0].double() * w_out).sum() + (out.p_tok.double() * w_logits).sum()
        (loss + (out.logits.double() ** 2).sum()).backward()
        return [t.grad for t in leaves]

    for got, want in zip(run("triton", F32), run("reference", torch.float64)):
        assert_close(got, want, F32, "grad")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("T,d_in,d_out,r", [(1, 40, 24, 4), (7, 37, 29, 1), (300, 64, 48, 64)],
                         ids=["T1", "odd-sizes-rank1", "T300-rank64"])
def test_lora_matches_reference(dtype, T, d_in, d_out, r):
    """Plain LoRA (o_proj / down_proj): the group machinery with one member, one expert and no router."""
    check_lora_against_reference("triton", dtype, T, d_in, d_out, r)


def test_route_delegates_to_the_torch_backend():
    logits = torch.randn(12, 8)
    got = hk.route(logits, top_k=2, backend="triton")
    want = hk.route(logits, top_k=2, backend="torch")
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _group(E, r, members, hydra=False):
    D = 16
    rows = r if hydra else E * r
    return dict(x=torch.randn(4, D), members_A=[torch.randn(rows, D)] * members,
                members_B=[torch.randn(8, E * r)] * members, scaling=1.0, router_weight=torch.randn(E, D))


@pytest.mark.parametrize("args,message", [
    (_group(E=16, r=16, members=1, hydra=True),
     r"E\*r = 16\*16, padded to powers of two 16\*16 = 256, exceeds the kernels' limit 128.*backend='torch'"),
    # 120 columns, but the register tile is an outer product of power-of-two expert and rank slots
    (_group(E=3, r=40, members=1, hydra=True),
     r"E\*r = 3\*40, padded to powers of two 4\*64 = 256, exceeds the kernels' limit 128.*backend='torch'"),
    (_group(E=32, r=2, members=1), r"E = 32 experts exceeds the kernels' limit 16.*backend='torch'"),
    (_group(E=2, r=4, members=5), r"5 members share one router, the kernels take at most 4.*backend='torch'"),
    (_group(E=8, r=16, members=3), r"3 members x rank width 128.*= 384 exceeds the kernels' limit 256"),
], ids=["E*r", "E*r padded", "E", "members", "group-rank"])
def test_inputs_beyond_the_kernels_limits_name_the_fix(args, message):
    with pytest.raises(ValueError, match=message):
        hk.routed_group(args.pop("x"), args.pop("members_A"), args.pop("members_B"), args.pop("scaling"),
                        backend="triton", **args)


def test_strided_inputs_match_the_reference():
    """A column-strided x, a transposed router weight and a stride-0 (expanded) bias: the kernels index with unit
    column strides, so the backend must make dense copies rather than read the wrong elements."""
    case = CASES[1]
    problem = make_problem(case)
    wide = torch.zeros(problem.x.shape[0], 2 * problem.x.shape[1])
    wide[:, ::2] = problem.x
    weight_t = problem.router_weight.T.contiguous().T
    bias = problem.router_bias[:1].expand(case.E)
    kwargs = dict(router_weight=weight_t, router_bias=bias, top_k=case.top_k, bases=problem.bases)
    got = hk.routed_group(wide[:, ::2], problem.members_A, problem.members_B, 2.0, backend="triton", **kwargs)
    want = hk.routed_group(problem.x, problem.members_A, problem.members_B, 2.0, backend="reference", **kwargs)
    for m, (y, y_ref) in enumerate(zip(got.outputs, want.outputs)):
        assert_close(y, y_ref, F32, f"y{m}")
    assert_close(got.gates, want.gates, F32, "gates")
