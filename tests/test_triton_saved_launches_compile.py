"""What the fused op keeps for backward, how many kernels it launches, that torch.compile traces through it,
and that it refuses CPU tensors outside the interpreter with an error naming the fix."""
import os
import subprocess
import sys

import pytest
import torch

import hmora_kernels as hk
from hmora_kernels.triton_backend.launch import observe_launches

# The paper's q/k/v group in miniature: Hydra E = 8, r = 8, hybrid top-2 routing, dropout, bf16 activations.
T, D, E, R, D_OUTS, N_SEQ = 64, 48, 8, 8, (32, 16, 16), 2


def paper_group(dtype=torch.bfloat16, requires_grad=True, hydra=True):
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).requires_grad_(requires_grad)

    return dict(
        x=leaf(T, D), members_A=[leaf(R if hydra else E * R, D, scale=D ** -0.5) for _ in D_OUTS],
        members_B=[leaf(d, E * R, scale=0.5) for d in D_OUTS], scaling=2.0,
        router_weight=leaf(E, D, scale=D ** -0.5, dt=torch.float32), router_bias=leaf(E, dt=torch.float32),
        task_probs=torch.softmax(torch.randn(N_SEQ, E, generator=g), -1).requires_grad_(requires_grad),
        alpha=torch.tensor([0.3], requires_grad=requires_grad), kind="hybrid", top_k=2, dropout_p=0.1, seed=5,
        bases=[torch.randn(T, d, generator=g).to(dtype) for d in D_OUTS],
    )


def call(args, backend):
    args = dict(args)
    return hk.routed_group(args.pop("x"), args.pop("members_A"), args.pop("members_B"), args.pop("scaling"),
                           backend=backend, **args)


def saved_for_backward(args, backend):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = call(args, backend)
    return out, saved


def test_saved_for_backward_is_x_rank_activations_and_routing_only():
    """Saved: a reference to x, h (T, M*r) in x's dtype, gates and p_tok (T, E) fp32, each token's selected experts
    as one int64 bit mask (top-k), and references to the parameters. Nothing of size (T, d_in) beyond x itself,
    nothing (T, d_out), no dropout mask."""
    args = paper_group()
    _, saved = saved_for_backward(args, "triton")
    params = [*args["members_A"], *args["members_B"], args["router_weight"], args["router_bias"],
              args["task_probs"], args["alpha"]]
    param_ptrs = {p.data_ptr() for p in params}
    x = args["x"]
    activations = [t for t in saved if t.data_ptr() not in param_ptrs]
    assert any(t.data_ptr() == x.data_ptr() and t.shape == x.shape for t in activations), "x is not saved by reference"
    others = [t for t in activations if t.data_ptr() != x.data_ptr()]
    for t in others:
        assert t.dtype != torch.bool and t.shape != x.shape, "a dropout mask was saved"
        assert t.shape[-1] not in D_OUTS and tuple(t.shape) != (T, D), f"saved a (T, d) tensor {tuple(t.shape)}"
    other_bytes = sum(t.numel() * t.element_size() for t in others)
    h_bytes = T * len(D_OUTS) * R * x.element_size()  # Hydra: h_m is (T, r)
    routing_bytes = 2 * T * E * 4 + T * 8  # gates and p_tok, fp32; the selection masks, int64
    assert other_bytes == h_bytes + routing_bytes
    _, torch_saved = saved_for_backward(paper_group(), "torch")
    torch_bytes = sum(t.numel() * t.element_size() for t in torch_saved if t.data_ptr() not in param_ptrs)
    print(f"saved besides x and parameters: triton {other_bytes} B, torch backend {torch_bytes} B (incl. its x copies)")


def test_per_expert_top_k_saves_only_the_selected_experts_rank_activations():
    """With one A per expert and top-2 routing, each member's h keeps the 2 selected experts' rank blocks of each
    token (T, 2r), not all E of them (T, E*r)."""
    args = paper_group(hydra=False)
    _, saved = saved_for_backward(args, "triton")
    params = [*args["members_A"], *args["members_B"], args["router_weight"], args["router_bias"],
              args["task_probs"], args["alpha"]]
    param_ptrs = {p.data_ptr() for p in params} | {args["x"].data_ptr()}
    others = [t for t in saved if t.data_ptr() not in param_ptrs]
    h_bytes = T * len(D_OUTS) * 2 * R * args["x"].element_size()
    assert sum(t.numel() * t.element_size() for t in others) == h_bytes + 2 * T * E * 4 + T * 8


def test_launches_per_group_forward_and_backward():
    """2 kernels per routed group forward and 3 per backward, any number of members (plus, outside the kernels,
    2 memsets of the buffers the backward adds into); plain LoRA: 2 and 2 (no routing to take back)."""
    args = paper_group()
    with observe_launches() as forward:
        out = call(args, "triton")
    loss = sum((y.float() ** 2).sum() for y in out.outputs) + (out.p_tok ** 2).sum() + out.gates.sum()
    with observe_launches() as backward:
        loss.backward()
    assert [name for name, *_ in forward] == ["shrink_route_kernel", "expand_kernel"]
    assert [name for name, *_ in backward] == ["output_grad_kernel", "route_grad_kernel", "input_grad_kernel"]
    with observe_launches() as lora_forward:
        y = hk.lora(args["x"], args["members_A"][0], args["members_B"][0][:, :R], 1.0, backend="triton")
    with observe_launches() as lora_backward:
        y.float().sum().backward()
    assert [name for name, *_ in lora_forward] == ["shrink_route_kernel", "expand_kernel"]
    assert [name for name, *_ in lora_backward] == ["output_grad_kernel", "input_grad_kernel"]


@pytest.mark.parametrize("hydra", [True, False], ids=["Hydra", "per-expert A (compact h)"])
def test_torch_compile_fullgraph_traces_the_custom_ops(hydra):
    """torch.compile(fullgraph=True, backend='aot_eager') of a step using the op gives the eager values and
    gradients: the custom ops' fake implementations describe every output."""
    def step(args):
        out = call(args, "triton")
        return sum((y.float() * y.float()).sum() for y in out.outputs) + (out.p_tok * out.gates).sum()

    eager_args, compiled_args = paper_group(torch.float32, hydra=hydra), paper_group(torch.float32, hydra=hydra)
    eager = step(eager_args)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled_args)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for name in ("x", "router_weight", "router_bias", "task_probs", "alpha"):
        torch.testing.assert_close(compiled_args[name].grad, eager_args[name].grad, msg=name)
    for m in range(len(D_OUTS)):
        torch.testing.assert_close(compiled_args["members_A"][m].grad, eager_args["members_A"][m].grad)
        torch.testing.assert_close(compiled_args["members_B"][m].grad, eager_args["members_B"][m].grad)


def with_rule(args, rule):
    """The group under a routing rule (two sequences, every token real)."""
    return dict(args, top_k=None, rule=rule, token_mask=torch.ones(N_SEQ, T // N_SEQ))


def test_switch_takes_the_same_launches_and_saves_the_top_1_block():
    """Switch with a capacity: still 2 + 3 launches (the capacity is an integer pass on the device between the two
    forward launches); with one A per expert each member's h keeps the chosen expert's block only (T, r)."""
    args = with_rule(paper_group(hydra=False), hk.Switch(capacity=4))
    with observe_launches() as forward:
        out, saved = saved_for_backward(args, "triton")
    with observe_launches() as backward:
        (sum((y.float() ** 2).sum() for y in out.outputs) + out.gates.sum()).backward()
    assert [name for name, *_ in forward] == ["shrink_route_kernel", "expand_kernel"]
    assert [name for name, *_ in backward] == ["output_grad_kernel", "route_grad_kernel", "input_grad_kernel"]
    assert (out.routed_counts > out.kept_counts).any()  # the capacity drops tokens here
    params = [*args["members_A"], *args["members_B"], args["router_weight"], args["router_bias"],
              args["task_probs"], args["alpha"]]
    param_ptrs = {p.data_ptr() for p in params} | {args["x"].data_ptr()}
    others = [t for t in saved if t.data_ptr() not in param_ptrs]
    h_bytes = T * len(D_OUTS) * R * args["x"].element_size()
    assert sum(t.numel() * t.element_size() for t in others) == h_bytes + 2 * T * E * 4 + T * 8


def test_torch_compile_fullgraph_traces_a_routing_rule():
    """The fake implementation describes a rule's outputs too (the routed and kept counts; one rule suffices: they
    are described alike, and every rule runs in the same custom op)."""
    rule, hydra = hk.Switch(capacity=4), False
    def step(args):
        out = call(args, "triton")
        loss = sum((y.float() * y.float()).sum() for y in out.outputs) + (out.p_tok * out.gates).sum()
        return loss, out.routed_counts, out.kept_counts

    eager_args = with_rule(paper_group(torch.float32, hydra=hydra), rule)
    compiled_args = with_rule(paper_group(torch.float32, hydra=hydra), rule)
    eager = step(eager_args)
    eager[0].backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled_args)
    compiled[0].backward()
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want)
    for name in ("x", "router_weight", "router_bias", "task_probs", "alpha"):
        torch.testing.assert_close(compiled_args[name].grad, eager_args[name].grad, msg=name)


def test_cpu_tensors_without_the_interpreter_name_the_fix():
    code = (
        "import torch, hmora_kernels as hk\n"
        "hk.lora(torch.randn(4, 8), torch.randn(2, 8), torch.randn(3, 2), 1.0, backend='triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "needs CUDA tensors, or set TRITON_INTERPRET=1 before importing triton" in done.stderr
