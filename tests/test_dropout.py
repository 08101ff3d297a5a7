"""The dropout stream: bit-identical to Triton's tl.rand, the right keep rate, independent streams, reproducible."""
import pytest
import torch
import triton
import triton.language as tl

import hmora_kernels as hk
from hmora_kernels.dropout import keep_mask, philox_uniform, stream_seed


@triton.jit
def _rand_kernel(out_ptr, key, first_offset, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.rand(key, offsets.to(tl.int64) + first_offset), mask=offsets < n)


@pytest.mark.parametrize("seed,stream,first_offset", [
    (0, 0, 0),                   # router stream of seed 0
    (123456789, 3, 0),           # a member stream
    (2**32 + 5, 1, 2**32 - 100), # a seed wider than 32 bits keeps its low word; offsets crossing 2^32 (int64 path)
])
def test_philox_stream_equals_triton_rand(seed, stream, first_offset):
    n = 1024
    out = torch.empty(n)
    key = stream_seed(seed, stream)
    _rand_kernel[(n // 256,)](out, key, first_offset, n, BLOCK=256)
    expected = philox_uniform(key, torch.arange(n, dtype=torch.int64) + first_offset)
    assert torch.equal(out, expected)


def test_keep_rate_and_independence():
    p, shape = 0.1, (400, 250)
    masks = [keep_mask(shape, p, seed=5, stream=s).double() for s in range(3)]
    n = masks[0].numel()
    tol = 5 * (p * (1 - p) / n) ** 0.5  # five binomial standard deviations
    for m in masks:
        assert abs(m.mean().item() - (1 - p)) < tol
    joint = (masks[0] * masks[1]).mean().item()  # independent streams: P(both kept) = (1-p)^2
    assert abs(joint - (1 - p) ** 2) < 2 * tol
    assert not torch.equal(masks[0], masks[1])


def test_same_seed_same_mask_different_seed_different_mask():
    a = keep_mask((64, 48), 0.3, seed=9, stream=1)
    assert torch.equal(a, keep_mask((64, 48), 0.3, seed=9, stream=1))
    assert not torch.equal(a, keep_mask((64, 48), 0.3, seed=10, stream=1))


def test_lora_dropout_uses_member_stream_and_inverted_scaling():
    x, A, B = torch.randn(16, 24, dtype=torch.float64), torch.eye(24, dtype=torch.float64), torch.eye(24, dtype=torch.float64)
    y = hk.lora(x, A, B, 1.0, dropout_p=0.25, seed=2, backend="torch")
    keep = keep_mask((16, 24), 0.25, seed=2, stream=1)
    torch.testing.assert_close(y, x * keep / 0.75)
