"""Dropout masks from a counter-based stream, identical in every backend.

keep[t, j] = uniform(stream_seed(seed, stream), t * d_in + j) >= p, where `uniform` is
Triton's `tl.rand` (Philox 4x32-10), re-implemented here bit-exactly in PyTorch so the
reference and torch backends draw the very masks the Triton kernels regenerate in registers.

Streams of a routed group: 0 = the router's input, m + 1 = member m's input.
A plain LoRA layer is a group with one member and no router, so its mask is stream 1.
"""
from __future__ import annotations

import torch

ROUTER_STREAM = 0

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
# tl.rand's int32 -> [0, 1) scale, applied as a float32 multiply.
_UNIFORM_SCALE = 4.6566127342e-10


def member_stream(member: int) -> int:
    """The dropout stream of member `member` of a routed group."""
    return member + 1


def stream_seed(seed: int, stream: int) -> int:
    """One 64-bit Philox key per (seed, stream): the stream in the high word, the seed in the low."""
    return (int(stream) << 32) | (int(seed) & _MASK32)


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for uint32 values held in int64, without overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    prod_hi = b * a_hi  # < 2**48
    prod_lo = b * a_lo  # < 2**48
    high = (prod_hi + (prod_lo >> 16)) >> 16
    low = (((prod_hi & 0xFFFF) << 16) + prod_lo) & _MASK32
    return high, low


def philox_uniform(key: int, offsets: torch.Tensor) -> torch.Tensor:
    """Float32 uniforms in [0, 1) equal to Triton's `tl.rand(key, offsets)`, for int64 offsets >= 0."""
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = offsets >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    as_int32 = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    as_int32 = torch.where(as_int32 < 0, -as_int32 - 1, as_int32).to(torch.int32)
    return as_int32.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def keep_mask(shape: tuple[int, int], p: float, seed: int, stream: int, device=None) -> torch.Tensor:
    """Boolean (T, d) keep-mask of one stream: element (t, j) uses Philox counter t * d + j."""
    rows, cols = shape
    offsets = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    return philox_uniform(stream_seed(seed, stream), offsets) >= p


def apply_dropout(x: torch.Tensor, p: float, seed: int, stream: int) -> torch.Tensor:
    """Inverted dropout of a 2-D tensor with the stream's mask (identity when p == 0)."""
    if p == 0.0:
        return x
    keep = keep_mask(tuple(x.shape), p, seed, stream, device=x.device)
    return x * keep.to(x.dtype) / (1.0 - p)
