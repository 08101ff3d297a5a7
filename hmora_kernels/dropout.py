"""Dropout masks, from one of two generators named by the ops' `dropout_rng` argument.

"philox" (bit-identical in every backend): keep[t, j] = uniform(stream_seed(seed, stream), t * d_in + j) >= p,
    where `uniform` is Triton's `tl.rand` (Philox 4x32-10), re-implemented here bit-exactly in PyTorch, so the
    reference and torch backends draw the very masks the Triton kernels regenerate in registers. It costs about
    240 integer tensor operations per mask on CPU.
"native" (each backend's fastest generator): the reference and torch backends draw the positions of the dropped
    elements from torch's default generator, as geometric gaps between drops (`native_drop_positions`): i.i.d.
    Bernoulli(p) drops to float64 rounding, at about p float64 draws per element. `seed` is not used:
    torch.manual_seed and the generator's state decide, and activation checkpointing restores that state before it
    recomputes. The triton backend draws its Philox stream of `seed` in registers, as for "philox". The masks are
    independent Bernoulli draws in every backend, but the triton backend's differ from the other two.

The seed is a Python int or a 1-element int64 tensor (drawn on the device, so that no layer waits for the host);
both give the same stream. Streams of a routed group: 0 = the router's input, m + 1 = member m's input. A plain
LoRA layer is a group with one member and no router, so its mask is stream 1. "native" draws the masks of an op's
streams together, as one mask over (streams, T, d) (`group_dropped`); the reference and torch backends draw alike.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

DROPOUT_RNGS = ("philox", "native")
ROUTER_STREAM = 0

Seed = Union[int, torch.Tensor]

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
# tl.rand's int32 -> [0, 1) scale, applied as a float32 multiply.
_UNIFORM_SCALE = 4.6566127342e-10


def member_stream(member: int) -> int:
    """The dropout stream of member `member` of a routed group."""
    return member + 1


def stream_seed(seed: Seed, stream: int) -> Seed:
    """One 64-bit Philox key per (seed, stream): the stream in the high word, the seed's low 32 bits in the low.

    An int seed gives an int, a tensor seed a tensor of the same value (no host round trip)."""
    if isinstance(seed, torch.Tensor):
        return (seed.to(torch.int64) & _MASK32) | (int(stream) << 32)
    return (int(stream) << 32) | (int(seed) & _MASK32)


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for uint32 values held in int64, without overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    prod_hi = b * a_hi  # < 2**48
    prod_lo = b * a_lo  # < 2**48
    high = (prod_hi + (prod_lo >> 16)) >> 16
    low = (((prod_hi & 0xFFFF) << 16) + prod_lo) & _MASK32
    return high, low


def philox_uniform(key: Seed, offsets: torch.Tensor) -> torch.Tensor:
    """Float32 uniforms in [0, 1) equal to Triton's `tl.rand(key, offsets)`, for int64 offsets >= 0.

    `key` is an int or a 1-element int64 tensor (a `stream_seed`)."""
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = offsets >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    if isinstance(key, torch.Tensor):
        key = key.reshape(())
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    as_int32 = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    as_int32 = torch.where(as_int32 < 0, -as_int32 - 1, as_int32).to(torch.int32)
    return as_int32.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


# An opaque op to torch.compile: inductor would otherwise trace and try to fuse the ~240 integer operations of the
# stream (it did not finish compiling one 16 x 64 mask in 600 s); as an extern call it compiles at once, and its
# masks stay bit-identical to eager. Pure: the same key and shape give the same mask.
@torch.library.custom_op("hmora::philox_keep_mask", mutates_args=())
def _philox_keep_mask(key: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    offsets = torch.arange(rows * cols, dtype=torch.int64, device=key.device).view(rows, cols)
    return philox_uniform(key, offsets) >= p


@_philox_keep_mask.register_fake
def _(key, rows, cols, p):
    return key.new_empty((rows, cols), dtype=torch.bool)


def native_drop_positions(n: int, p: float, device=None) -> torch.Tensor:
    """Positions of the dropped elements of an n-element mask, from torch's default generator, counted from 1:
    element i of the mask is position i + 1, and n + 1 marks an unused slot (callers give their flat tensor a
    spare element at each end).

    The gaps between the drops of i.i.d. Bernoulli(p) trials are geometric: floor(ln(1 - u) / ln(1 - p)) kept
    elements, u uniform in [0, 1). So p n float64 uniforms (plus a margin) draw the whole mask instead of one per
    element: a tenth of the generator's work at p = 0.1, which is most of a mask's cost on a CPU. The count of gaps
    is fixed, p n + 10 standard deviations + 16, so that shapes do not depend on the draw (no host sync, one
    torch.compile graph); the gaps cover all n elements but with a probability below 1e-23 (then the last ones
    would be kept)."""
    spread = math.sqrt(n * p * (1.0 - p))
    count = int(math.ceil(n * p + 10.0 * spread)) + 16
    u = torch.rand(count, dtype=torch.float64, device=device)
    kept_before = u.neg_().log1p_().mul_(1.0 / math.log1p(-p)).to(torch.int64)  # >= 0, so truncation is floor
    return kept_before.add_(1).cumsum_(0).clamp_(max=n + 1)


def group_dropped(shape: tuple[int, int], p: float, seed: Seed, streams: Sequence[int], device=None,
                  rng: str = "philox") -> torch.Tensor:
    """The dropout of the S = len(streams) inputs of one op (a group's router and members, in that order), as
    drawn: "philox", a bool keep mask (S, T, d) of the streams' own keys; "native", the positions of the dropped
    elements of one (S, T, d) mask, drawn at once (`native_drop_positions`: counted from 1, S T d + 1 unused)."""
    rows, cols = shape
    if rng == "native":
        return native_drop_positions(len(streams) * rows * cols, p, device)
    if rng != "philox":
        raise ValueError(f"dropout_rng: expected one of {DROPOUT_RNGS}, got {rng!r}")
    return torch.stack([_philox_mask(shape, p, seed, stream, device) for stream in streams])


def group_keep_masks(shape: tuple[int, int], p: float, seed: Seed, streams: Sequence[int], device=None,
                     rng: str = "philox") -> torch.Tensor:
    """Boolean keep masks (S, T, d) of `group_dropped`'s draw."""
    dropped = group_dropped(shape, p, seed, streams, device, rng)
    if dropped.dtype == torch.bool:
        return dropped
    keep = torch.ones(len(streams) * shape[0] * shape[1] + 2, dtype=torch.bool, device=device)
    return keep.index_fill_(0, dropped, False)[1:-1].view(len(streams), *shape)


def keep_mask(shape: tuple[int, int], p: float, seed: Seed, stream: int, device=None,
              rng: str = "philox") -> torch.Tensor:
    """Boolean (T, d) keep-mask of one stream drawn on its own (see the module docstring for the two generators).

    philox: element (t, j) uses counter t * d + j of key `stream_seed(seed, stream)`."""
    return group_keep_masks(shape, p, seed, [stream], device, rng)[0]


def _philox_mask(shape, p, seed, stream, device):
    key = stream_seed(seed, stream)
    if not isinstance(key, torch.Tensor):
        key = torch.tensor(key, dtype=torch.int64, device=device)
    return _philox_keep_mask(key.reshape(()), shape[0], shape[1], float(p))


def apply_dropout(x: torch.Tensor, p: float, seed: Seed, stream: int, rng: str = "philox") -> torch.Tensor:
    """Inverted dropout of a 2-D tensor with the stream's mask drawn on its own (identity when p == 0)."""
    if p == 0.0:
        return x
    keep = keep_mask(tuple(x.shape), p, seed, stream, device=x.device, rng=rng)
    return x * keep.to(x.dtype) / (1.0 - p)
