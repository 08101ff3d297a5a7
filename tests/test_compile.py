"""torch.compile(fullgraph=True) with inductor computes what eager computes, dropout on.

With `torch._inductor.config.fallback_random`, inductor draws random numbers with the same aten operators, in the
same order, as eager (without it, it draws its own Philox numbers: other masks, the same distribution), so the
compiled loss equals eager's and the gradients agree to the order of fp32 sums. `fullgraph=True` fails on any graph
break, e.g. reading the dropout seed on the host. Cost: inductor compiles each fused kernel with the C++ compiler
(2-4 s each on 2 busy cores, precompiled headers included), so these are the suite's slowest tests: the model test
builds about 55 kernels (2-4 minutes), the op test about 15 (under a minute).
"""
import torch

import hmora_kernels as hk

from test_hmora_model import batch, tiny_model
from tolerances import assert_close


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


def test_compiled_model_equals_eager_with_dropout():
    """One hybrid decoder layer (token and task router), dropout 0.1 from the default ("native") generator."""
    import torch._inductor.config as inductor_config

    # one layer, made hybrid by alpha_shift: sigmoid(-eps_alpha + 2) = 0.5
    model = tiny_model("qwen2", layers=1, alpha_shift=2.0, dropout=0.1).train()
    assert set(model.layer_kinds().values()) == {"hybrid"} and model.hmora_config.dropout_rng == "native"
    ids, mask, labels = batch()

    def step(module):
        torch.manual_seed(123)  # this step's masks
        out = module(input_ids=ids, attention_mask=mask, labels=labels, task_input_ids=ids[:, :5],
                     task_attention_mask=mask[:, :5], use_cache=False)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out.loss.detach(), grads

    loss, grads = step(model)
    with inductor_config.patch(fallback_random=True):
        compiled_loss, compiled_grads = step(_compiled(model))
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        diff = (compiled_grads[name] - grad).abs().max().item()
        assert diff <= 1e-4 * grad.abs().max().item() + 1e-7, f"{name}: compiled gradient off by {diff:.3g}"


def test_compiled_philox_dropout_equals_eager():
    """The bit-exact Philox masks are one opaque op to inductor (tracing their ~240 integer operations did not finish
    compiling in 600 s): a routed group with a device seed tensor, values and gradients as eager, no fallback needed
    (the seed is an input)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 32, generator=g, requires_grad=True)
    A = [torch.randn(4, 32, generator=g, requires_grad=True) for _ in range(2)]
    B = [torch.randn(d, 16, generator=g, requires_grad=True) for d in (8, 12)]
    W = torch.randn(4, 32, generator=g, requires_grad=True)
    seed = torch.tensor([1234])

    def loss(x, A, B, W, seed):
        out = hk.routed_group(x, A, B, 2.0, router_weight=W, kind="token", top_k=2, dropout_p=0.3, seed=seed,
                              dropout_rng="philox", backend="torch")
        return sum((y * y).sum() for y in out.outputs) + out.p_tok.square().sum()

    leaves = [x, *A, *B, W]
    expected = loss(x, A, B, W, seed)
    expected_grads = torch.autograd.grad(expected, leaves)
    got = _compiled(loss)(x, A, B, W, seed)
    got_grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    for name, got_grad, expected_grad in zip(["x", "A0", "A1", "B0", "B1", "W"], got_grads, expected_grads):
        assert_close(got_grad, expected_grad, torch.float32, f"grad {name}")
