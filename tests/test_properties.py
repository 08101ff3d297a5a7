"""Properties that hold for every shape and routing setting, checked on shapes hypothesis draws."""
import math

import torch
from hypothesis import given, settings, strategies as st

import hmora_kernels as hk

from group_cases import GroupCase, gradient_summand_scales, make_problem, run_group
from tolerances import assert_close

@st.composite
def group_cases(draw):
    """A routed-group problem of any size; drawn as a whole so a failure prints every field of the case."""
    T = draw(st.integers(1, 40))
    E = draw(st.integers(1, 12))
    return GroupCase(
        why="drawn", T=T, d_in=draw(st.integers(1, 40)),
        d_outs=draw(st.lists(st.integers(1, 24), min_size=1, max_size=4)), E=E, r=draw(st.integers(1, 6)),
        hydra=draw(st.booleans()), kind=draw(st.sampled_from(["token", "task", "hybrid"])),
        top_k=draw(st.one_of(st.none(), st.integers(1, E))), renorm=draw(st.sampled_from(["softmax", "sum"])),
        n_seq=draw(st.sampled_from([n for n in (1, 2, 4) if T % n == 0])),
        dropout_p=draw(st.sampled_from([0.0, 0.3])), with_bases=draw(st.booleans()),
    )


@settings(max_examples=40, deadline=None)
@given(case=group_cases())
def test_torch_backend_equals_reference_on_any_shape(case):
    """Gradients are judged against the scale of the per-token terms they sum, and may be as inaccurate as the
    reference computed in the same dtype (tests/tolerances.py)."""
    problem = make_problem(case, seed=case.T * 31 + case.d_in)
    expected_values, expected_grads = run_group(case, problem, "reference", as_float64=True)
    scales = gradient_summand_scales(case, problem)
    _, same_dtype_grads = run_group(case, problem, "reference")
    values, grads = run_group(case, problem, "torch")
    for name, expected in expected_values.items():
        assert_close(values[name], expected, case.dtype, f"value {name}")
    for name, expected in expected_grads.items():
        assert_close(grads[name], expected, case.dtype, f"grad {name}", summand_scale=scales[name],
                     same_dtype_reference=same_dtype_grads[name])


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 30), E=st.integers(1, 10), data=st.data(), scale=st.floats(0.1, 20))
def test_gates_are_a_distribution_over_exactly_k_experts(T, E, data, scale):
    k = data.draw(st.one_of(st.none(), st.integers(1, E)))
    renorm = data.draw(st.sampled_from(["softmax", "sum"]))
    logits = torch.randn(T, E, dtype=torch.float64) * scale
    for backend in ("reference", "torch"):
        p_tok, gates = hk.route(logits, top_k=k, renorm=renorm, backend=backend)
        torch.testing.assert_close(gates.sum(-1), torch.ones(T, dtype=torch.float64))
        if k is not None:
            assert ((gates > 0).sum(-1) <= k).all()
            # the selected experts are the k most probable ones: every selected p >= every unselected p
            chosen = gates > 0
            lowest_chosen = torch.where(chosen, p_tok, torch.inf).min(-1).values
            highest_other = torch.where(chosen, -torch.inf, p_tok).max(-1).values
            assert (lowest_chosen >= highest_other).all()


@settings(max_examples=60, deadline=None)
@given(N=st.integers(1, 30), E=st.integers(2, 10), sharpness=st.floats(0.0, 30.0),
       gamma_c=st.floats(0.0, 1.0), gamma_b=st.floats(0.0, 1.0))
def test_gjs_loss_lies_between_zero_and_its_ends(N, E, sharpness, gamma_c, gamma_b):
    """0 <= loss <= 1 + gamma_b - gamma_c, since H_m lies in [0, gamma_b lnE] and H_p in [gamma_c lnE, lnE]."""
    p = torch.softmax(torch.randn(N, E, dtype=torch.float64) * sharpness, -1)
    loss = hk.gjs_loss(p, gamma_c, gamma_b, backend="torch").item()
    upper = 1.0 + gamma_b - gamma_c  # ((gamma_b - gamma_c) lnE - (0 - lnE)) / lnE
    assert -1e-12 <= loss <= max(upper, 0.0) + 1e-9
    reference_loss = hk.gjs_loss(p, gamma_c, gamma_b, backend="reference").item()
    assert math.isclose(loss, reference_loss, rel_tol=1e-9, abs_tol=1e-12)
