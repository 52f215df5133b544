"""BatchNorm bookkeeping shared by the fused modules: running-stat updates exactly as nn.BatchNorm2d, and
an eval-time fold cache keyed on the tensors' version counters."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """nn.BatchNorm's rule: batch statistics in training, or whenever no running stats are tracked."""
    batch = bn.training or bn.running_mean is None
    if batch and isinstance(bn, nn.SyncBatchNorm) and _distributed_world() > 1:
        # the fused ops reduce statistics over the local batch only: refuse rather than silently differ
        raise NotImplementedError("fused blocks compute BatchNorm statistics per process; SyncBatchNorm across "
                                  "ranks is not supported: use the stock model (fused=False) for it")
    return batch


def fold_inputs(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> list[torch.Tensor]:
    """What a conv-BN fold reads, for FoldCache: conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var."""
    return [_state(conv, "weight"), _state(bn, "weight"), _state(bn, "bias"), _state(bn, "running_mean"),
            _state(bn, "running_var")]


def _state(m: nn.Module, name: str) -> torch.Tensor | None:
    # From the module's own dicts (nn.Module.__getattr__ costs about 1 µs a name on the CPU VM, on every call);
    # a pruned or parametrized weight (weight_orig + mask, or a property) is not there: getattr computes it
    t = m._parameters.get(name)
    if t is None:
        t = m._buffers.get(name)
    return t if t is not None else getattr(m, name)


def _distributed_world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                         count: int) -> None:
    """Fold one batch's mean and biased var (over `count` values per channel) into bn's running stats."""
    _update(bn, mean, var, count)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and _saved_tensor_hooks_active():
        _SavesOne.apply(_ANCHOR)


class _SavesOne(torch.autograd.Function):
    """A graph node that saves one tensor and is never reached by a backward pass.

    Non-reentrant torch.utils.checkpoint recomputes a region's forward during the backward and, by default (early
    stop), stops it as soon as it has re-saved as many tensors as the first forward saved. The fused ops update the
    running statistics after they return, i.e. after their saved tensors: without this node a fused block ending the
    region would update them once instead of twice (stock nn.BatchNorm2d updates inside the op that saves).
    """

    @staticmethod
    def forward(t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


_ANCHOR = torch.zeros((), requires_grad=True)


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (checkpointing, offloading) are in effect; True where torch cannot say."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


@torch.no_grad()
def _update(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    if not (bn.training and bn.track_running_stats):
        return
    bn.num_batches_tracked.add_(1)
    if count == 0:  # as nn.BatchNorm2d: an empty batch is counted but leaves the running stats alone
        return
    # momentum=None: cumulative average; kept a tensor so torch.compile does not break the graph on it
    momentum = 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype) if bn.momentum is None else bn.momentum
    unbiased = var * (count / (count - 1))
    for stat, new in ((bn.running_mean, mean), (bn.running_var, unbiased)):
        stat.mul_(1 - momentum).add_(new.to(stat.dtype) * momentum)


class FoldCache:
    """Caches `fold()` of a module's parameters and buffers until one of them changes.

    Re-folds when any tensor's version counter, storage, dtype or device changes (optimizer steps,
    load_state_dict, .to()), or any of `key` changes (the dtype the fold casts to: the input's). Autograd
    through the fold (parameters requiring grad with grad enabled) and tracing under torch.compile always
    re-fold: the fold is a few tiny per-channel ops.
    """

    def __init__(self) -> None:
        # (key, value), replaced whole: threads sharing a module never pair a value with another fold's key
        self._entry: tuple[tuple, object] | None = None

    @property
    def _key(self) -> tuple | None:
        entry = self._entry
        return entry[0] if entry is not None else None

    def get(self, tensors: list[torch.Tensor], fold: Callable[[], object], *key):
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if differentiable or torch.compiler.is_compiling():
            return fold()
        key = (*key, *((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors))
        entry = self._entry  # read once
        if entry is None or entry[0] != key:
            entry = self._entry = (key, fold())
        return entry[1]
