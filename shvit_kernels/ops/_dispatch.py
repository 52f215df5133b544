"""The ops' custom-op registration and their eager fast path.

Every op is a `torch.library.custom_op` (schema, fake impl, autograd, torch.compile / export / ONNX). Going through
the dispatcher costs a Python custom op tens of µs per call (autograd wrapper, redispatch, alias checks):
`benchmarks/host_overhead.py` on the 2-core CPU VM timed ops.shsa at 44-49 µs with this fast path against 82-116 µs
without it, and the H100 bench measured 19 µs of registry + dispatch per call, more than a fused kernel takes on the
GPU. When the dispatcher would do nothing but call the implementation (eager, plain tensors, no autograd edge,
nothing tracing, profiling or intercepting, no forward-mode AD level), `call` runs the implementation directly: the
same function, the same kernels, the same result. What the fast path does not see: kernels registered later for these ops through
torch.library (the project registers none), and the custom op's check that no output aliases an input (the opcheck
tests run it).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

_IMPLS: dict[object, Callable] = {}
_DEVICES = frozenset(("cpu", "cuda"))  # the backends' devices; meta and others take the fake / dispatcher path
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def custom_op(name: str):
    """`torch.library.custom_op(name, mutates_args=())`, remembering the undecorated implementation for `call`."""
    def register(fn: Callable):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        _IMPLS[op] = fn
        return op
    return register


def direct(args: tuple) -> bool:
    """Whether the dispatcher would do nothing for op(*args) but run its implementation."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.autograd._profiler_enabled()
            or torch._C._are_functorch_transforms_active() or torch._C._is_torch_function_mode_enabled()
            or _get_current_dispatch_mode() is not None or forward_ad._current_level >= 0):
        return False
    if args[0].device.type not in _DEVICES:  # every op's first argument is its activation tensor
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or (grad and a.requires_grad)):
            return False
    return True


def call(op, *args):
    """op(*args), or its implementation run directly when `direct(args)`."""
    return _IMPLS[op](*args) if direct(args) else op(*args)
