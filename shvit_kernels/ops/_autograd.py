"""Autograd plumbing shared by the training ops, whose extra outputs (batch statistics, tensors kept for the
backward, SRA's log-sum-exp) feed the running-stat update or the backward, never a loss."""
from __future__ import annotations

import functools


def mark_extra_outputs(ctx, *outputs) -> None:
    """The outputs are non-differentiable, and autograd passes the backward None for gradients nobody computed
    instead of zero-filling them first (a memset the size of each kept tensor on every backward)."""
    ctx.mark_non_differentiable(*outputs)
    ctx.set_materialize_grads(False)


def none_without_grad(backward):
    """Wraps a backward(ctx, grad_y, *extra_grads): with no gradient for y nothing flows back (every input's
    gradient is linear in grad_y), so it returns None for all inputs."""
    @functools.wraps(backward)
    def wrapped(ctx, grad_y, *extra_grads):
        if grad_y is None:
            return (None,) * len(ctx.needs_input_grad)
        return backward(ctx, grad_y, *extra_grads)
    return wrapped
