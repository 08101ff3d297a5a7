"""fp32 means fp32: the fused kernels' default-precision dots (x A^T, dY B, dh A, dh^T x and the router's backward
dots) follow PyTorch's switch for fp32 matmuls. With full fp32 ("ieee", PyTorch's default) they equal the float64
reference to fp32 accuracy (every case of test_triton_backend.py runs so); with TF32 allowed their operands are
rounded to TF32 as cuBLAS does (to nearest, ties away from zero: PTX cvt.rna.tf32.f32), which the interpreter then
computes exactly, so they equal a float64 reference whose dot inputs are rounded the same way. fp16 / bf16
activations always take TF32 dots (exact for the 16-bit operands)."""
import contextlib

import pytest
import torch

import hmora_kernels as hk
from hmora_kernels.dropout import ROUTER_STREAM, keep_mask, member_stream
from hmora_kernels.triton_backend.plan import dot_precision

from group_cases import GroupCase, make_problem, run_group
from tolerances import assert_close, normalised_error

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


@contextlib.contextmanager
def fp32_matmul(precision: str):
    """PyTorch's fp32 matmul switch (the new API: the old allow_tf32 flag cannot be read once it is used)."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def test_the_dot_precision_follows_pytorchs_fp32_matmul_switch():
    assert dot_precision(F32) == "ieee"  # PyTorch's default: fp32 matmuls in full fp32
    with fp32_matmul("tf32"):
        assert dot_precision(F32) == "tf32"
        assert dot_precision(BF16) == dot_precision(F16) == "tf32"
    before = torch.get_float32_matmul_precision()
    try:
        for setting, expected in (("high", "tf32"), ("medium", "tf32"), ("highest", "ieee")):
            torch.set_float32_matmul_precision(setting)
            assert dot_precision(F32) == expected, setting
    finally:
        torch.set_float32_matmul_precision(before)
    assert dot_precision(BF16) == "tf32"  # 16-bit activations: TF32 dots are exact for them


def tf32_rounded(t: torch.Tensor) -> torch.Tensor:
    """t rounded to TF32 (10 fraction bits) to nearest, ties away from zero, computed from frexp (independently of
    the kernels' bit trick): t = m 2^e with 0.5 <= |m| < 1, so m 2^11 holds the 11 significant bits."""
    m, e = torch.frexp(t.double())
    scaled = m * 2.0 ** 11
    rounded = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return torch.ldexp(rounded / 2.0 ** 11, e)


def test_tf32_rounding_is_to_nearest_with_ties_away_from_zero():
    """One-element plain LoRA with A = B = 1 gives y = tf32(x) on the TF32 path (the up-projection's operand carries
    no gate here, but runs 3xTF32: exact). 1 + 2^-11 is a tie between 1 (even) and 1 + 2^-10: cvt.rna (what cuBLAS
    feeds its tensor cores) goes away from zero, round-to-nearest-even would give 1, a tensor core truncating raw
    fp32 also 1."""
    x = torch.tensor([[1 + 2.0 ** -11], [-(1 + 2.0 ** -11)], [1 + 3 * 2.0 ** -12], [1 + 2.0 ** -12]])
    one = torch.ones(1, 1)
    with fp32_matmul("tf32"):
        y = hk.lora(x, one, one, 1.0, backend="triton")
    expected = torch.tensor([[1 + 2.0 ** -10], [-(1 + 2.0 ** -10)], [1 + 2.0 ** -10], [1.0]])
    assert torch.equal(y, expected)
    assert torch.equal(tf32_rounded(x).float(), expected)
    with fp32_matmul("ieee"):
        assert torch.equal(hk.lora(x, one, one, 1.0, backend="triton"), x)


def tf32_reference(case: GroupCase, problem, seed: int = 7):
    """Values and gradients of run_group's loss in float64, every default-precision dot's inputs rounded to TF32 as
    the kernels round them; the gate-carrying dots and the router's forward dot exact (3xTF32 reaches fp32).
    Token routing, top-k softmax renorm or soft. Inputs the kernels form in fp32 (dropped x, dY) are formed in fp32
    here too, so both round the same numbers."""
    R = tf32_rounded
    E, r, p = case.E, case.r, case.dropout_p
    x = problem.x.double()
    W, b = problem.router_weight.double().requires_grad_(True), problem.router_bias.double()

    def dropped(stream):
        if p == 0:
            return problem.x.double()
        keep = keep_mask(tuple(problem.x.shape), p, seed, stream).float()
        return (problem.x * (keep / (1 - p))).double(), keep.double() / (1 - p)

    x_r, scale_r = dropped(ROUTER_STREAM) if p else (x, 1.0)
    logits = (x_r @ W.T + b).detach().requires_grad_(True)
    p_tok = torch.softmax(logits, -1)
    if case.top_k is None:
        gates = p_tok
    else:
        selected = torch.zeros_like(p_tok, dtype=torch.bool).scatter(-1, p_tok.detach().topk(case.top_k, -1)[1], True)
        gates = torch.where(selected, torch.softmax(torch.where(selected, p_tok, -torch.inf), -1), 0.0)
    w = problem.grad_weights
    values, grads = {"gates": gates.detach(), "p_tok": p_tok.detach(), "logits": logits.detach()}, {}
    dgates = w["gates"].clone()
    dx = torch.zeros_like(x)
    for m, (A, B) in enumerate(zip(problem.members_A, problem.members_B)):
        A, B = A.double(), B.double()
        x_m, scale_m = dropped(member_stream(m)) if p else (x, 1.0)
        h = R(x_m) @ R(A).T  # (T, E*r) or (T, r)
        h3 = h.view(-1, 1, r) if case.hydra else h.view(-1, E, r)
        gated = (gates.detach()[:, :, None] * h3).reshape(-1, E * r)
        values[f"y{m}"] = problem.bases[m].double() + problem.scaling * gated @ B.T
        dy = w["outputs"][m].float().double()  # the gradient reaches the kernels as an fp32 tensor
        grads[f"B{m}"] = problem.scaling * dy.T @ gated
        d_gated = (problem.scaling * R(dy) @ R(B)).view(-1, E, r)
        dgates = dgates + (d_gated * h3).sum(-1)
        dh = (gates.detach()[:, :, None] * d_gated)
        dh = dh.sum(1) if case.hydra else dh.reshape(-1, E * r)
        grads[f"A{m}"] = R(dh).T @ R(x_m)
        dx = dx + (R(dh) @ R(A)) * scale_m
    dlogits, = torch.autograd.grad((gates, p_tok), (logits,), (dgates, w["p_tok"]))
    grads["router_weight"] = R(dlogits).T @ R(x_r)
    grads["router_bias"] = dlogits.sum(0)
    grads["x"] = dx + (R(dlogits) @ R(W.detach())) * scale_r
    return values, grads


TF32_CASES = [
    GroupCase("per-expert A, top-2, q/k/v-like members", T=40, d_in=48, d_outs=[32, 16, 16], E=8, r=4, top_k=2),
    GroupCase("Hydra, soft routing, dropout 0.1", T=33, d_in=40, d_outs=[24], E=4, r=8, hydra=True, dropout_p=0.1),
]


@pytest.mark.parametrize("case", TF32_CASES, ids=str)
def test_tf32_path_equals_a_reference_with_tf32_rounded_dot_inputs(case):
    problem = make_problem(case)
    with fp32_matmul("tf32"):
        values, grads = run_group(case, problem, "triton")
    want_values, want_grads = tf32_reference(case, problem)
    exact_values, exact_grads = run_group(case, problem, "reference", as_float64=True)
    for name in ("y0", "gates", "p_tok"):
        assert_close(values[name], want_values[name], F32, f"value {name}")
    for name, want in want_grads.items():
        assert_close(grads[name], want, F32, f"grad {name}")
    # the test can tell: the same kernels are far from the unrounded reference, and full fp32 is close to it
    assert normalised_error(values["y0"], exact_values["y0"]) > 1e-4
    assert normalised_error(grads["x"], exact_grads["x"]) > 1e-4
    with fp32_matmul("ieee"):
        ieee_values, ieee_grads = run_group(case, problem, "triton")
    assert_close(ieee_values["y0"], exact_values["y0"], F32, "ieee y0")
    assert_close(ieee_grads["x"], exact_grads["x"], F32, "ieee grad x")
