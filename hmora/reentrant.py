"""Gradient bridges for reentrant activation checkpointing.

Reentrant checkpointing runs the decoder layers under no_grad and recomputes each one in its own inner
backward, which only reaches the layer's explicit inputs. Two things of ours cross that boundary:

* the task probabilities (computed once per forward, read by every task router's layer): a recomputed layer
  reads a detached leaf whose gradient `TaskGradSink` adds to the context; `TaskGradBridge`, placed on the
  input embeddings (upstream of every layer, so its backward runs after all recomputations), hands the sums
  to the task encoder's graph;
* the token-router auxiliary loss: the forward adds its value through `AuxGradTap`, whose backward records
  d(loss)/d(aux) (with any outer scaling, e.g. gradient accumulation); each recomputed group adds its own loss
  term's gradient at its output with `AuxGradInject`. The tap runs first: it is the newest node of the loss.
"""
from __future__ import annotations

import torch


class TaskGradSink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, probs, context, name):
        ctx.context, ctx.name = context, name
        return probs.view_as(probs)

    @staticmethod
    def backward(ctx, grad):
        sums = ctx.context.task_grads
        sums[ctx.name] = grad if ctx.name not in sums else sums[ctx.name] + grad
        return None, None, None


class TaskGradBridge(torch.autograd.Function):
    """Identity on the embeddings; backward gives each task-probability tensor its summed recompute gradient."""

    @staticmethod
    def forward(ctx, embeds, context, names, *probs):
        ctx.context, ctx.names = context, names
        return embeds.view_as(embeds)

    @staticmethod
    def backward(ctx, grad):
        sums = ctx.context.task_grads
        return (grad, None, None) + tuple(sums.pop(name, None) for name in ctx.names)


class AuxGradTap(torch.autograd.Function):
    """Identity on the (detached) auxiliary-loss value; backward records the gradient the loss gives it.

    Use `tap(value, context)`: a fresh leaf that requires grad makes autograd keep this node.
    """

    @staticmethod
    def forward(ctx, value, context, anchor):
        ctx.context = context
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.context.aux_grad_scale = grad
        return None, None, None


def tap(value: torch.Tensor, context) -> torch.Tensor:
    return AuxGradTap.apply(value, context, torch.zeros((), device=value.device, requires_grad=True))


class AuxGradInject(torch.autograd.Function):
    """Identity on a recomputed group output; backward also gives the group's loss term its recorded gradient."""

    @staticmethod
    def forward(ctx, output, loss, context):
        ctx.context = context
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        scale = ctx.context.aux_grad_scale  # None: the backpropagated quantity does not contain the aux loss
        return grad, None if scale is None else scale.expand(()), None
