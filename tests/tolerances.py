"""One tolerance table per activation dtype, for comparing a backend against the float64 reference.

The error measure is max|actual - expected| / max|expected| over the tensor (a normalised max error), so one number
per dtype serves values and gradients of every scale. The numbers come from the dtype's unit roundoff times the
length of the longest reduction in the tests (d_in or T up to ~1000), with headroom:
fp32 2^-24 * ~1000 -> 1e-5; fp16 2^-11 -> 5e-3; bf16 2^-8 -> 3e-2.
An expected tensor that is zero up to float64 round-off (a gradient that vanishes mathematically, e.g. into the
probabilities under top-1 softmax renormalisation, where every gate is exactly 1) has no scale of its own: it is
compared in absolute terms, the tests' inputs and upstream gradients being O(1).
"""
import torch

TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


FLOAT64_ROUNDOFF_ZERO = 1e-12


def normalised_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    if not expected.numel():
        return 0.0
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > FLOAT64_ROUNDOFF_ZERO else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = normalised_error(actual, expected)
    tol = TOLERANCES[dtype]
    assert err <= tol, f"{what}: normalised max error {err:.3g} > {tol:g} ({dtype})"
