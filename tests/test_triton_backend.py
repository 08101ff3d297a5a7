"""The fused Triton backend, run by the Triton interpreter on CPU, equals the float64 reference:
values and every gradient (x, each A and B, router weight and bias, alpha, task probabilities, and the
gradients that reach p_tok and the gates), with the per-dtype tolerances of tests/tolerances.py.

Dropout: the reference draws the kernels' very masks (hmora_kernels.dropout is bit-identical to tl.rand),
so dropout cases compare against the reference directly, same seed, same masks.
"""
import pytest
import torch

import hmora_kernels as hk

from hmora_kernels.triton_backend.launch import observe_launches

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


# The configurations the rank tiling opens (beyond E 16, E*r 128, 4 members): each exercises a planner tier or a
# launch path of its own, at interpreter-sized T and d.
LARGE_CASES = [
    GroupCase("E = 64 (the expert limit), r = 2, top-2: routing tile 64, chunks of 8 experts mostly unselected",
              T=40, d_in=40, d_outs=[24], E=64, r=2, top_k=2, kind="hybrid", n_seq=2),
    GroupCase("E = 8, r = 128 (the rank limit, E*r = 1024), Hydra, top-2, bf16: rank blocks of 64", T=33, d_in=32,
              d_outs=[16, 24], E=8, r=128, hydra=True, top_k=2, dtype=BF16),
    GroupCase("E = 16, r = 64 (E*r = 1024), per-expert A, top-2, fp16: 16 chunks of h and of the operand", T=33,
              d_in=32, d_outs=[16], E=16, r=64, top_k=2, dtype=F16, param_dtype=F32),
    GroupCase("12 members (two launch groups: 8 + 4), dropout on: member streams past 8", T=21, d_in=24,
              d_outs=[8, 16, 8, 24, 8, 16, 8, 8, 16, 8, 24, 8], E=4, r=4, top_k=2, dropout_p=0.1),
    GroupCase("per-expert E*r = 512, soft routing, task-only: no expert skipped, 8 chunks", T=30, d_in=24,
              d_outs=[16, 16], E=8, r=64, kind="task", n_seq=3),
    GroupCase("E = 64, r = 1 (rank-wise experts), soft routing, fp32", T=25, d_in=24, d_outs=[16], E=64, r=1),
    GroupCase("E = 33, r = 31 (neither a power of two: padded expert and rank blocks), top-3 sum renorm", T=20,
              d_in=24, d_outs=[16], E=33, r=31, top_k=3, renorm="sum"),
    GroupCase("fp32 (full-fp32 dots), 3 members, per-expert E 5 r 8 (h 40 wide): input_grad takes 2 members a work "
              "item, so 2 items sum dx", T=30, d_in=24, d_outs=[16, 24, 8], E=5, r=8, top_k=2),
]


def triton_matches_reference(case):
    """Runs the case on the float64 reference and on triton, asserts they agree; (problem, triton's gradients)."""
    problem = make_problem(case)
    expected_values, expected_grads = run_group(case, problem, "reference", as_float64=True)
    values, grads = run_group(case, problem, "triton")
    assert_matches_reference(case, values, grads, expected_values, expected_grads)
    return problem, grads


@pytest.mark.parametrize("case", LARGE_CASES, ids=str)
def test_large_groups_match_reference(case):
    triton_matches_reference(case)


def test_members_of_different_dtypes_take_one_launch_group_each():
    """Members whose parameters differ in dtype (fp32, bf16, fp32 under bf16 activations) are served by three launch
    groups; the result is the reference's, and the launches are the paper's 2 + 3 per group (route_grad once)."""
    case = GroupCase("mixed member dtypes", T=30, d_in=32, d_outs=[16, 24, 8], E=8, r=4, top_k=2, dtype=BF16)
    problem = make_problem(case)
    problem.members_A[1], problem.members_B[1] = problem.members_A[1].to(BF16), problem.members_B[1].to(BF16)
    problem.members_A[0], problem.members_B[0] = problem.members_A[0].float(), problem.members_B[0].float()
    problem.members_A[2], problem.members_B[2] = problem.members_A[2].float(), problem.members_B[2].float()
    expected_values, expected_grads = run_group(case, problem, "reference", as_float64=True)
    with observe_launches() as launches:
        values, grads = run_group(case, problem, "triton")
    assert_matches_reference(case, values, grads, expected_values, expected_grads)
    names = [name for name, *_ in launches]
    assert names.count("shrink_route_kernel") == names.count("expand_kernel") == 3
    assert names.count("output_grad_kernel") == names.count("input_grad_kernel") == 3
    assert names.count("route_grad_kernel") == 1


def assert_matches_reference(case, values, grads, expected_values, expected_grads):
    for name, expected in expected_values.items():
        assert_close(values[name], expected, case.dtype, f"value {name}")
    assert values["y0"].dtype == case.dtype
    for name, expected in expected_grads.items():
        assert grads[name] is not None, f"no gradient reached {name}"
        assert_close(grads[name], expected, case.dtype, f"grad {name}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_routed_group_matches_reference(case):
    problem, grads = triton_matches_reference(case)
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
    GroupCase("E = 32, r = 32 Hydra top-3: dh summed over 16 expert blocks in order; 9 members (2 launch groups)",
              T=40, d_in=24, d_outs=[16] * 9, E=32, r=32, hydra=True, top_k=3),
    GroupCase("E = 64, r = 4 per-expert top-2: skipped chunks leave dh unwritten, never read", T=50, d_in=24,
              d_outs=[40], E=64, r=4, top_k=2, kind="hybrid", n_seq=2),
    GroupCase("bf16 (TF32 dots), per-expert A, r = 40: chunks of 1 expert x 64 ranks, 16 tokens a block", T=50,
              d_in=24, d_outs=[40, 16], E=3, r=40, top_k=2, dtype=BF16),
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


def _group(E, r, members=1, hydra=False, dtype=F32, d_out=8):
    D = 16
    rows = r if hydra else E * r
    return dict(x=torch.randn(4, D, dtype=dtype), members_A=[torch.randn(rows, D)] * members,
                members_B=[torch.zeros(1, E * r).expand(d_out, E * r)] * members, scaling=1.0,
                router_weight=torch.randn(E, D))


@pytest.mark.parametrize("args,message", [
    (_group(E=65, r=1), r"E = 65 experts exceeds the kernels' limit 64.*backend='torch'"),
    (_group(E=1, r=129), r"rank r = 129 exceeds the kernels' limit 128.*backend='torch'"),
    (_group(E=16, r=65, hydra=True), r"E\*r = 16\*65 = 1040 exceeds the kernels' limit 1024.*backend='torch'"),
    (_group(E=2, r=4, dtype=torch.float64), r"x is torch.float64; the kernels take float32, float16 or bfloat16"),
    # a stride-0 B: the limit is checked before anything reads it
    (_group(E=2, r=4, members=2, d_out=2 ** 24), r"d_out = 16777216 exceeds the kernels' limit 16777215.*backend='torch'"),
], ids=["E", "r", "E*r", "float64", "d_out"])
def test_inputs_beyond_the_kernels_limits_name_the_limit_and_the_fix(args, message):
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
