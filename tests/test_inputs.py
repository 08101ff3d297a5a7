"""Bad input gets a ValueError that names the problem; awkward but valid input gets the right answer."""
import pytest
import torch

import hmora_kernels as hk

T, D, E, R = 6, 10, 4, 2


def group_args(**overrides):
    args = dict(
        x=torch.randn(T, D), members_A=[torch.randn(E * R, D)], members_B=[torch.randn(8, E * R)], scaling=1.0,
        router_weight=torch.randn(E, D), router_bias=torch.randn(E), top_k=2,
    )
    args.update(overrides)
    return args


def call_group(**overrides):
    args = group_args(**overrides)
    return hk.routed_group(args.pop("x"), args.pop("members_A"), args.pop("members_B"), args.pop("scaling"),
                           backend="torch", **args)


@pytest.mark.parametrize("overrides,message", [
    (dict(x=torch.randn(T, D, 1)), r"x: expected a 2-D tensor, got shape \(6, 10, 1\)"),
    (dict(members_A=[torch.randn(E * R)]), r"members_A\[0\]: expected a 2-D tensor"),
    (dict(members_A=[torch.randn(E * R, D + 1)]), r"members_A\[0\] \(8, 11\).*x \(6, 10\)"),
    (dict(members_A=[torch.randn(E * R + 1, D)]), r"members_A\[0\] \(9, 10\).*E\*r = 8 rows.*members_B\[0\] \(8, 8\)"),
    (dict(router_weight=torch.randn(E, D + 2)), r"router_weight \(4, 12\).*x \(6, 10\)"),
    (dict(router_bias=torch.randn(E + 1)), r"router_bias \(5\).*E = 4"),
    (dict(members_B=[torch.randn(8, 0)], members_A=[torch.randn(0, D)]), r"r >= 1"),
    (dict(router_weight=torch.randn(0, D), router_bias=None), r"E must be >= 1, got E = 0"),
    (dict(top_k=E + 1), r"top_k: expected an integer in \[1, E = 4\].*got 5"),
    (dict(top_k=0), r"top_k: expected an integer in \[1, E = 4\].*got 0"),
    (dict(dropout_p=1.0), r"dropout_p: expected a probability in \[0, 1\), got 1.0"),
    (dict(dropout_p=-0.1), r"dropout_p: expected a probability in \[0, 1\), got -0.1"),
    (dict(x=torch.randint(0, 3, (T, D))), r"x: unsupported dtype torch.int64"),
    (dict(members_B=[torch.randn(8, E * R, device="meta")]), r"one device.*members_B\[0\] on meta"),
    (dict(kind="tokens"), r"kind: expected one of"),
    (dict(kind="hybrid", task_probs=torch.rand(4, E), alpha=torch.tensor(0.0)), r"4 sequences but there are 6 tokens"),
    (dict(kind="hybrid", task_probs=torch.rand(2, E)), r"kind='hybrid' needs alpha"),
    (dict(kind="task", task_probs=None), r"kind='task' needs task_probs"),
    (dict(members_A=[torch.randn(E * R, D), torch.randn(E * R, D)]), r"same number \(>= 1\) of A and B"),
    (dict(bases=[torch.randn(T, 9)]), r"bases\[0\]: expected shape \(6, 8\).*got \(6, 9\)"),
    (dict(renorm="l1"), r"renorm: expected one of"),
])
def test_routed_group_rejects(overrides, message):
    with pytest.raises(ValueError, match=message):
        call_group(**overrides)


@pytest.mark.parametrize("args,message", [
    ((torch.randn(T, D), torch.randn(R, D + 1), torch.randn(8, R)), r"A \(2, 11\) must have d_in = .*10"),
    ((torch.randn(T, D), torch.randn(R, D), torch.randn(8, R + 1)), r"B \(8, 3\) must have r = 2 columns.*A \(2, 10\)"),
    ((torch.randn(T, D), torch.randn(0, D), torch.randn(8, 0)), r"rank r must be >= 1"),
    ((torch.randn(D), torch.randn(R, D), torch.randn(8, R)), r"x: expected a 2-D tensor"),
])
def test_lora_rejects(args, message):
    with pytest.raises(ValueError, match=message):
        hk.lora(*args, 1.0, backend="torch")


def test_lora_rejects_bad_dropout_and_mixed_devices():
    x, A, B = torch.randn(T, D), torch.randn(R, D), torch.randn(8, R)
    with pytest.raises(ValueError, match=r"dropout_p: expected a probability in \[0, 1\), got 1.5"):
        hk.lora(x, A, B, 1.0, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"one device.*A on meta"):
        hk.lora(x, A.to("meta"), B, 1.0)


def test_losses_and_route_reject():
    p = torch.softmax(torch.randn(2, 5, E), -1)
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 5\).*got \(2, 4\)"):
        hk.gjs_loss(p, 0.5, 0.98, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"gamma_c and gamma_b must lie in \[0, 1\]"):
        hk.gjs_loss(p, 0.5, 1.5)
    with pytest.raises(ValueError, match=r"top_k: expected an integer in \[1, E = 4\]"):
        hk.route(torch.randn(T, E), top_k=5)
    with pytest.raises(ValueError, match=r"gates \(2, 5, 3\) must have the shape of p \(2, 5, 4\)"):
        hk.load_balancing_loss(p, torch.rand(2, 5, 3))


def test_backend_selection(monkeypatch):
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        hk.lora(torch.randn(T, D), torch.randn(R, D), torch.randn(8, R), 1.0, backend="cuda")
    monkeypatch.setenv("HMORA_BACKEND", "reference")
    assert hk.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert hk.resolve_backend("torch", torch.device("cpu")) == "torch"  # an explicit argument wins
    monkeypatch.setenv("HMORA_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"HMORA_BACKEND: expected one of"):
        hk.resolve_backend("auto", torch.device("cpu"))
    monkeypatch.delenv("HMORA_BACKEND")
    assert hk.resolve_backend("auto", torch.device("cpu")) == "torch"
