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


def test_native_masks_keep_rate_independence_and_generator_state():
    """"native": 32 random bits per element from torch's generator; reproducible from its state, fresh otherwise."""
    p, shape = 0.1, (400, 251)  # odd element count: the last int64 draw is half used
    torch.manual_seed(3)
    masks = [keep_mask(shape, p, seed=0, stream=s, rng="native").double() for s in range(3)]
    n = masks[0].numel()
    tol = 5 * (p * (1 - p) / n) ** 0.5  # five binomial standard deviations
    for m in masks:
        assert abs(m.mean().item() - (1 - p)) < tol
    assert abs((masks[0] * masks[1]).mean().item() - (1 - p) ** 2) < 2 * tol  # consecutive draws are independent
    torch.manual_seed(3)
    assert torch.equal(keep_mask(shape, p, seed=99, stream=0, rng="native").double(), masks[0])  # seed not used


def test_tensor_seed_draws_the_int_seeds_stream():
    seed = 2**32 + 77  # only the low 32 bits count, in both forms
    for stream in (0, 2):
        want = keep_mask((33, 65), 0.2, seed=seed, stream=stream)
        assert torch.equal(keep_mask((33, 65), 0.2, seed=torch.tensor([seed]), stream=stream), want)
        assert torch.equal(stream_seed(torch.tensor([seed]), stream), torch.tensor([stream_seed(seed, stream)]))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_tensor_seed_equals_int_seed_in_the_ops(backend):
    g = torch.Generator().manual_seed(0)
    x, A, B, W = (torch.randn(*s, generator=g) for s in [(20, 24), (4, 24), (16, 8), (2, 24)])
    outs = [hk.routed_group(x, [A], [B], 1.0, router_weight=W, top_k=1, dropout_p=0.3, seed=s, backend=backend)
            for s in (5, torch.tensor([5]))]
    torch.testing.assert_close(outs[0].outputs[0], outs[1].outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=0, atol=0)


def test_native_masks_are_the_same_in_reference_and_torch():
    """Both draw the router's mask, then each member's, from torch's generator: same state, same masks (the torch
    backend zeroes the drawn positions itself, forward and backward); values and gradients agree."""
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
              for s in [(50, 24), (8, 24), (8, 24), (16, 8), (12, 8), (2, 24)]]
    x, A0, A1, B0, B1, W = leaves
    outs, grads = {}, {}
    for backend in ("reference", "torch"):
        torch.manual_seed(11)
        outs[backend] = hk.routed_group(x, [A0, A1], [B0, B1], 1.0, router_weight=W, top_k=1, dropout_p=0.4,
                                        dropout_rng="native", backend=backend)
        loss = sum((y * y).sum() for y in outs[backend].outputs) + outs[backend].logits.square().sum()
        grads[backend] = torch.autograd.grad(loss, leaves)
    for got, want in zip([*outs["torch"].outputs, outs["torch"].logits, *grads["torch"]],
                         [*outs["reference"].outputs, outs["reference"].logits, *grads["reference"]]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.manual_seed(12)  # another state: other masks
    other = hk.routed_group(x, [A0, A1], [B0, B1], 1.0, router_weight=W, top_k=1, dropout_p=0.4,
                            dropout_rng="native", backend="torch")
    assert not torch.allclose(other.outputs[0], outs["torch"].outputs[0])


def test_unknown_generator_and_bad_seed_are_refused():
    x, A, B = torch.randn(4, 8), torch.randn(2, 8), torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"dropout_rng: expected one of \('philox', 'native'\), got 'mt'"):
        hk.lora(x, A, B, 1.0, dropout_p=0.1, dropout_rng="mt")
    with pytest.raises(ValueError, match=r"seed: expected a Python int or a 1-element int64 tensor on cpu"):
        hk.lora(x, A, B, 1.0, dropout_p=0.1, seed=torch.tensor([1.5]))
