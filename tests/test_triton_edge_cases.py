"""Edge cases of the fused Triton backend, run by the interpreter against the reference (and the torch backend):
an empty batch, bases of mixed dtypes, NaN rows, exact ties in top-k routing, and a dropout seed held in a tensor."""
import math

import pytest
import torch

import hmora_kernels as hk
from hmora_kernels import triton_backend
from hmora_kernels.checks import GroupShape

from group_cases import GroupCase, make_problem, run_group
from tolerances import assert_close

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
BACKENDS = ("reference", "torch", "triton")


def call(problem, case, backend, **overrides):
    kwargs = dict(router_weight=problem.router_weight, router_bias=problem.router_bias,
                  task_probs=problem.task_probs, alpha=problem.alpha, kind=case.kind, top_k=case.top_k,
                  renorm=case.renorm, dropout_p=case.dropout_p, seed=7, bases=problem.bases, backend=backend)
    kwargs.update(overrides)
    return hk.routed_group(problem.x, problem.members_A, problem.members_B, problem.scaling, **kwargs)


# An empty batch (a fully padded micro-batch after packing): every backend returns empty outputs and zero gradients.
EMPTY = GroupCase("T = 0, hybrid top-2, per-expert A, dropout", T=0, d_in=40, d_outs=[24, 8], E=8, r=4,
                  kind="hybrid", top_k=2, n_seq=2, dropout_p=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_gives_empty_outputs_and_zero_gradients(backend):
    problem = make_problem(EMPTY)
    values, grads = run_group(EMPTY, problem, backend)
    for m, d in enumerate(EMPTY.d_outs):
        assert values[f"y{m}"].shape == (0, d) and values[f"y{m}"].dtype == F32
    assert values["gates"].shape == (0, EMPTY.E) and values["p_tok"].shape == (0, EMPTY.E)
    assert grads["x"].shape == (0, EMPTY.d_in)
    for name, grad in grads.items():  # None: the reference's indexing by an empty token list reaches nothing
        assert grad is None or torch.count_nonzero(grad) == 0, f"grad {name} of an empty batch is not zero"
    assert backend == "reference" or all(grads[name] is not None for name in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_lora_on_an_empty_batch(backend):
    x, A, B = torch.randn(0, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True), torch.randn(8, 4)
    B.requires_grad_(True)
    y = hk.lora(x, A, B, 2.0, dropout_p=0.1, base=torch.randn(0, 8), backend=backend)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.count_nonzero(A.grad) == 0 and torch.count_nonzero(B.grad) == 0


# Each output keeps its own base's dtype. The kernels write x's dtype or fp32 natively (fp32 bases under bf16
# activations: the mixed-precision layout); any other base dtype is written in fp32 and cast.
MIXED = [
    (BF16, [F32, BF16], "bf16 x, an fp32 base beside a bf16 one"),
    (F16, [BF16, F16, F32], "fp16 x, bases bf16 / fp16 / fp32 (bf16: written in fp32, then cast)"),
    (F32, [F16, F32], "fp32 x, an fp16 base"),
]


@pytest.mark.parametrize("x_dtype,base_dtypes,why", MIXED, ids=[m[2] for m in MIXED])
def test_each_output_has_its_base_dtype(x_dtype, base_dtypes, why):
    case = GroupCase(why, T=33, d_in=40, d_outs=[24, 16, 8][:len(base_dtypes)], E=4, r=4, top_k=2, dtype=x_dtype,
                     param_dtype=F32)
    problem = make_problem(case)
    problem.bases = [b.to(dt) for b, dt in zip(problem.bases, base_dtypes)]
    expected_values, expected_grads = run_group(case, problem, "reference", as_float64=True)
    coarseness = {F32: 0, F16: 1, BF16: 2}
    for backend in ("reference", "torch", "triton"):
        values, grads = run_group(case, problem, backend)
        for m, dt in enumerate(base_dtypes):
            assert values[f"y{m}"].dtype == dt, f"{backend}: output {m} is {values[f'y{m}'].dtype}, its base {dt}"
            assert_close(values[f"y{m}"], expected_values[f"y{m}"], max((x_dtype, dt), key=coarseness.get),
                         f"{backend} y{m}")
        if backend == "triton":  # each output's gradient arrives in its dtype: the coarsest one bounds the gradients
            for name, expected in expected_grads.items():
                assert_close(grads[name], expected, max([x_dtype, *base_dtypes], key=coarseness.get), f"grad {name}")


def selection_rule(p: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k rule every backend follows, written out independently: order the experts by p descending with NaN
    above every number, equal values (NaN and NaN too) by the lowest index; the first k are selected."""
    selected = torch.zeros_like(p, dtype=torch.bool)
    for t, row in enumerate(p.tolist()):
        order = sorted(range(len(row)), key=lambda e: (0, 0.0, e) if math.isnan(row[e]) else (1, -row[e], e))
        selected[t, order[:k]] = True
    return selected


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN is the input here
@pytest.mark.parametrize("top_k,renorm", [(2, "softmax"), (3, "sum"), (None, "softmax")],
                         ids=["top-2 softmax", "top-3 sum", "soft"])
def test_nan_rows_have_nan_gates_at_the_rules_experts_and_leave_other_rows_alone(top_k, renorm):
    """A NaN in x makes its token's logits and probabilities NaN: the token's gates are NaN on the experts the rule
    selects (NaN counts as the largest, ties by the lowest index: experts 0 .. k-1 of an all-NaN row) and 0
    elsewhere, as in the reference; every other token equals the reference. (The issue: triton made the whole
    row NaN.)"""
    case = GroupCase("NaN rows", T=20, d_in=32, d_outs=[16], E=8, r=4, top_k=top_k, renorm=renorm)
    problem = make_problem(case)
    problem.x[3, 5] = float("nan")
    problem.x[11] = float("nan")
    want = call(problem, case, "reference")
    got = call(problem, case, "triton")
    nan_rows = torch.isnan(got.p_tok).any(-1)
    assert nan_rows.tolist() == [t in (3, 11) for t in range(case.T)]
    rule = selection_rule(got.p_tok, top_k or case.E) & nan_rows[:, None]
    assert torch.equal(torch.isnan(got.gates), rule), "NaN gates off the experts the rule selects"
    assert torch.all(got.gates[nan_rows][~rule[nan_rows]] == 0)
    clean = ~nan_rows
    assert_close(got.gates[clean], want.gates[clean], F32, "gates of clean rows")
    assert_close(got.outputs[0][clean], want.outputs[0][clean], F32, "y of clean rows")
    assert torch.isnan(got.outputs[0][nan_rows]).all()


def tie_problem(case, logits_row):
    """Router weight 0 and a bias of logits_row: every token's logits are exactly logits_row."""
    problem = make_problem(case)
    problem.router_weight = torch.zeros_like(problem.router_weight)
    problem.router_bias = torch.tensor(logits_row, dtype=F32)
    return problem


def expected_outputs(problem, case, gates):
    """base + s sum_e g_e (x A_e^T) B_e^T in float64 with the given gates."""
    x = problem.x.double()
    ys = []
    for A, B, base in zip(problem.members_A, problem.members_B, problem.bases):
        h = x @ A.double().T
        delta = sum(gates[:, e:e + 1].double() * (h[:, e * case.r:(e + 1) * case.r]
                                                  @ B.double()[:, e * case.r:(e + 1) * case.r].T)
                    for e in range(case.E))
        ys.append(base.double() + problem.scaling * delta)
    return ys


TIES = [
    ([0.0] * 8, 2, "softmax", [0.5, 0.5] + [0.0] * 6, "all logits equal: the two lowest experts"),
    ([0.0] * 8, 3, "sum", [1 / 3] * 3 + [0.0] * 5, "all logits equal, top-3 sum renorm"),
    ([200.0] + [0.0] * 7, 2, "softmax", [math.e / (math.e + 1), 1 / (math.e + 1)] + [0.0] * 6,
     "saturated router: p = (1, 0, ..): expert 0 and the lowest of the exact zeros"),
    ([0.0] * 6 + [200.0, 0.0], 2, "sum", [0.0] * 6 + [1.0, 0.0],
     "saturated at expert 6, sum renorm: expert 6 and expert 0 (gate 0: its p is 0)"),
]


@pytest.mark.parametrize("logits_row,top_k,renorm,gates_row,why", TIES, ids=[t[-1] for t in TIES])
def test_exact_ties_select_the_lowest_expert_index(logits_row, top_k, renorm, gates_row, why):
    case = GroupCase(why, T=17, d_in=24, d_outs=[16, 8], E=8, r=4, top_k=top_k, renorm=renorm)
    problem = tie_problem(case, logits_row)
    gates = torch.tensor([gates_row] * case.T, dtype=F64)
    got = call(problem, case, "triton")
    assert_close(got.gates, gates, F32, "gates")
    for m, want in enumerate(expected_outputs(problem, case, gates)):
        assert_close(got.outputs[m], want, F32, f"y{m}")


def test_gradients_at_exact_ties_match_the_rule():
    """Backward through a saturated router with sum renorm: the selected expert whose gate is 0 still passes a
    gradient to the task probabilities (hybrid routing); triton equals autograd through the rule in float64."""
    case = GroupCase("saturated hybrid", T=12, d_in=24, d_outs=[16], E=8, r=4, kind="hybrid", top_k=2, renorm="sum",
                     n_seq=2)
    problem = tie_problem(case, [200.0] + [0.0] * 7)
    p_task = torch.zeros(2, 8)
    p_task[:, 0] = 1.0  # hybrid p = (1, 0, ...) as well: expert 1 is selected with gate 0
    problem.task_probs = p_task
    _, grads = run_group(case, problem, "triton")

    leaves = {k: v.detach().double().requires_grad_(True) for k, v in problem.leaves().items()}
    logits = leaves["x"] @ leaves["router_weight"].T + leaves["router_bias"]
    a = torch.sigmoid(leaves["alpha"])
    p = (1 - a) * torch.softmax(logits, -1) + a * leaves["task_probs"].repeat_interleave(case.T // 2, 0)
    selected = selection_rule(p.detach(), 2)
    kept = torch.where(selected, p, 0.0)
    gates = kept / kept.sum(-1, keepdim=True)
    y = problem.bases[0].double() + problem.scaling * sum(
        gates[:, e:e + 1] * ((leaves["x"] @ leaves["A0"][e * 4:(e + 1) * 4].T) @ leaves["B0"][:, e * 4:(e + 1) * 4].T)
        for e in range(case.E))
    w = problem.grad_weights
    loss = (y * w["outputs"][0]).sum() + (gates * w["gates"]).sum() + (torch.softmax(logits, -1) * w["p_tok"]).sum()
    loss.backward()
    assert leaves["task_probs"].grad[:, 1].abs().max() > 0.1, "the zero-gate selected expert has no task gradient"
    for name, leaf in leaves.items():
        assert_close(grads[name], leaf.grad, F32, f"grad {name}")


def test_a_seed_tensor_on_the_device_draws_the_masks_of_the_same_int_seed():
    """seed as a 1-element int64 tensor (read by the kernels: no host sync) gives bit-identical values and gradients
    to the same Python seed, including a seed above 2^31 (the low 32 bits are the Philox key's low word)."""
    case = GroupCase("dropout 0.1, seed tensor", T=40, d_in=32, d_outs=[16, 8], E=4, r=4, top_k=2, dropout_p=0.1,
                     kind="hybrid", n_seq=2)
    problem = make_problem(case)
    for seed in (7, 2**32 + 5, 3_000_000_000):
        shape = GroupShape(case.E, case.r, False)
        runs = []
        for seed_arg in (seed, torch.tensor([seed], dtype=torch.int64)):
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in problem.leaves().items()}
            out = triton_backend.routed_group(
                leaves["x"], [leaves["A0"], leaves["A1"]], [leaves["B0"], leaves["B1"]], 2.0, shape=shape,
                router_weight=leaves["router_weight"], router_bias=leaves["router_bias"],
                task_probs=leaves["task_probs"], alpha=leaves["alpha"], kind="hybrid", top_k=2, dropout_p=0.1,
                seed=seed_arg, bases=problem.bases)
            sum((y * y).sum() for y in out.outputs).backward()
            runs.append(([y.detach() for y in out.outputs], {k: v.grad for k, v in leaves.items()}))
        for a, b in zip(runs[0][0], runs[1][0]):
            assert torch.equal(a, b)
        for name in runs[0][1]:
            assert torch.equal(runs[0][1][name], runs[1][1][name]), f"grad {name} differs with a seed tensor"
    want = call(problem, case, "reference", seed=3_000_000_000)
    got = call(problem, case, "triton", seed=3_000_000_000)
    assert_close(got.outputs[0], want.outputs[0], F32, "y0 against the reference with the same seed")


def test_a_seed_tensor_of_the_wrong_kind_is_refused():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="1-element int64 tensor"):
        triton_backend.lora(x, torch.randn(2, 16), torch.randn(3, 2), 1.0, dropout_p=0.1,
                               seed=torch.tensor([1, 2]))
