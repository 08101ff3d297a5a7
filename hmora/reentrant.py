"""Gradient bridges for reentrant activation checkpointing.

Reentrant checkpointing runs the decoder layers under no_grad and recomputes each one in its own inner
backward, which only reaches the layer's explicit inputs. Two kinds of things of ours cross that boundary:

* the task representations (computed once per forward by the task encoder, read by every task router inside its
  layer): a recomputed layer reads a detached leaf whose gradient `TaskGradSink` adds to the context;
  `TaskGradBridge`, placed on the input embeddings (upstream of every layer, so its backward runs after all
  recomputations), hands the sums to the task encoder's graph;
* the auxiliary losses computed from router values the layers recorded (the token routers' loss, the task
  routers' loss): the forward adds each value through `LossGradTap`, whose backward records d(loss)/d(value)
  (with any outer scaling, e.g. gradient accumulation); each recomputed group adds its own term's gradient at its
  output with `LossGradInject`. The taps run first: they are the newest nodes of the loss.
"""
from __future__ import annotations

import torch


class TaskGradSink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, task_repr, context, name):
        ctx.context, ctx.name = context, name
        return task_repr.view_as(task_repr)

    @staticmethod
    def backward(ctx, grad):
        sums = ctx.context.task_grads
        sums[ctx.name] = grad if ctx.name not in sums else sums[ctx.name] + grad
        return None, None, None


def sink(task_repr: torch.Tensor, context, name: str) -> torch.Tensor:
    """A recomputed layer's view of task representation `name`: a leaf whose gradient goes to the context."""
    return TaskGradSink.apply(task_repr.detach().requires_grad_(), context, name)


class TaskGradBridge(torch.autograd.Function):
    """Identity on the embeddings; backward gives each task representation its summed recompute gradient."""

    @staticmethod
    def forward(ctx, embeds, context, names, *task_reprs):
        ctx.context, ctx.names = context, names
        return embeds.view_as(embeds)

    @staticmethod
    def backward(ctx, grad):
        sums = ctx.context.task_grads
        return (grad, None, None) + tuple(sums.pop(name, None) for name in ctx.names)


class LossGradTap(torch.autograd.Function):
    """Identity on a (detached) auxiliary-loss value; backward records the gradient the loss gives it.

    Use `tap(value, context, name)`: a fresh leaf that requires grad makes autograd keep this node.
    """

    @staticmethod
    def forward(ctx, value, context, name, anchor):
        ctx.context, ctx.name = context, name
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.context.loss_grad_scales[ctx.name] = grad
        return None, None, None, None


def tap(value: torch.Tensor, context, name: str) -> torch.Tensor:
    return LossGradTap.apply(value, context, name, torch.zeros((), device=value.device, requires_grad=True))


class LossGradInject(torch.autograd.Function):
    """Identity on a recomputed group output; backward also gives the group's term of loss `name` its recorded
    gradient."""

    @staticmethod
    def forward(ctx, output, term, context, name):
        ctx.context, ctx.name = context, name
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        scale = ctx.context.loss_grad_scales.get(ctx.name)  # None: the backpropagated quantity lacks this loss
        return grad, None if scale is None else scale.expand(()), None, None


def inject(output: torch.Tensor, term: torch.Tensor, context, name: str) -> torch.Tensor:
    return LossGradInject.apply(output, term, context, name)
