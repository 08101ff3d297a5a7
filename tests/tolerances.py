"""One tolerance table per activation dtype, for comparing a backend against the float64 reference.

The error measure is max|actual - expected| / max|expected| over the tensor (a normalised max error), so one number
per dtype serves values and gradients of every scale. The numbers come from the dtype's unit roundoff times the
length of the longest reduction in the tests (d_in or T up to ~1000), with headroom:
fp32 2^-24 * ~1000 -> 1e-5; fp16 2^-11 -> 5e-3; bf16 2^-8 -> 3e-2.

Gradients of parameters shared by all tokens (router weight and bias, alpha, the A and B matrices, the task
probabilities of a sequence) are sums over tokens, g = sum_t g_t. The rounding error of a computed sum is bounded by
roundoff x sum_t |g_t|, not by |g|: where the terms cancel (alpha's gradient mixes p_task - p_tok of both signs), |g|
can be orders of magnitude below the terms, and its relative error has no bound at all. Such a gradient is judged
against the scale of what it sums, max over entries of sum_t |g_t| (`group_cases.gradient_summand_scales`, computed
in float64 on the reference), with the same per-dtype numbers: the tolerance is still roundoff x reduction length,
now applied to the quantity that the error analysis bounds. Without cancellation the two scales coincide.

Cancellation also happens inside one token's terms (the rank activation's gradient sums d_out products dy_j B_j; the
sum renormalisation's gradient g/s - sum(g v)/s^2 is exactly 0 under top-1). There the achievable accuracy is that
of the problem itself, which any implementation in that dtype meets: so a drawn problem may also pass by being no
less accurate than the reference run in the same dtype, within `SAME_DTYPE_FACTOR` (two summation orders of one
formula differ by a small factor in their rounding error, never by orders of magnitude).

An expected tensor that is zero up to float64 round-off (a gradient that vanishes mathematically, e.g. into the
probabilities under top-1 softmax renormalisation, where every gate is exactly 1) has no scale of its own: it is
compared in absolute terms, the tests' inputs and upstream gradients being O(1).
"""
from typing import Optional

import torch

TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


FLOAT64_ROUNDOFF_ZERO = 1e-12
SAME_DTYPE_FACTOR = 4


def normalised_error(actual: torch.Tensor, expected: torch.Tensor, scale: Optional[torch.Tensor] = None) -> float:
    """max|actual - expected| / max(scale), scale = |expected| unless the summands' scale is given."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not expected.numel():
        return 0.0
    scale = (expected.abs() if scale is None else scale.double()).max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > FLOAT64_ROUNDOFF_ZERO else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 summand_scale: Optional[torch.Tensor] = None, same_dtype_reference: Optional[torch.Tensor] = None,
                 ) -> None:
    """`summand_scale`: for a sum over tokens, sum_t |g_t| (elementwise, the shape of expected).
    `same_dtype_reference`: the reference's result in `dtype`; an error within SAME_DTYPE_FACTOR of its error passes."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = normalised_error(actual, expected, summand_scale)
    tol = TOLERANCES[dtype]
    if same_dtype_reference is not None:
        tol = max(tol, SAME_DTYPE_FACTOR * normalised_error(same_dtype_reference, expected, summand_scale))
    against = " of the summands' scale" if summand_scale is not None else ""
    assert err <= tol, f"{what}: normalised max error{against} {err:.3g} > {tol:.3g} ({dtype})"
