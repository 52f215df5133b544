"""Backend registry: which implementation of each op runs, chosen per call from device and dtype.

Backends: "reference" (pure PyTorch, everywhere), "cpu" (C++ kernels of the extension), "triton"
(CUDA tensors; CPU tensors too under TRITON_INTERPRET=1), "cuda" (hand-written CUDA kernels), and
"auto" (the default: the backend measured fastest for the op and input size where `autotable` has a
measurement, else the first available in a fixed order per device). `SHVIT_KERNELS_BACKEND` sets the default;
`use_backend(name)` overrides it for the current thread / task (a ContextVar, so threads don't race).

Thread safety: the per-call fast path is one dict lookup; a miss (first use of an (op, setting, device, dtype))
resolves under a lock, so concurrent first calls choose and import once and all get the same implementation.
Triton kernels on CPU tensors run under Triton's interpreter, which keeps global state (the current program id,
its patches of triton.language), so those calls are serialised.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
import os
import threading
from typing import Iterator

import torch

from . import _ext, autotable

NAMES = ("reference", "cpu", "triton", "cuda")
_CHOICES = NAMES + ("auto",)
ENV_VAR = "SHVIT_KERNELS_BACKEND"

# "auto" tries these in order. "cuda" joins the CUDA list only once it has run on a GPU (issue 6);
# "triton" on CPU tensors is the interpreter: correct but slow, so never chosen automatically.
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for that cannot run here (the message says why)."""


@dataclasses.dataclass
class Kernel:
    impl: object  # the backend's implementation, or "module.path" imported on first use
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]

    def resolve(self) -> object:
        impl = self.impl  # read once: another thread may replace the name by the module meanwhile
        if isinstance(impl, str):  # lazy: e.g. Triton modules are imported only when first called
            impl = self.impl = importlib.import_module(impl)
        return impl


class _Serialized:
    """`impl`'s functions, called one thread at a time (for Triton's interpreter: see the module docstring)."""

    _lock = threading.RLock()  # one for all ops: the interpreter's state is global

    def __init__(self, impl: object):
        self._impl = impl

    def __getattr__(self, name: str):
        fn = getattr(self._impl, name)  # looked up per call: tests may patch the module's attributes

        def call(*args, **kwargs):
            with self._lock:
                return fn(*args, **kwargs)
        return call


_kernels: dict[tuple[str, str], Kernel] = {}
# (op, asked, device type, dtype) -> the implementation to call: availability is fixed per process, so a choice
# never changes unless a kernel is registered (which clears it). Keeps the per-call cost of dispatch to a dict
# lookup; misses fill it under _lock.
_chosen: dict[tuple, object] = {}
_lock = threading.RLock()
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("shvit_backend", default=None)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def availability() -> dict[str, tuple[bool, str]]:
    """Every backend name -> (available, reason it is not, or what it runs on). Fixed per process."""
    has_triton = importlib.util.find_spec("triton") is not None
    cuda = torch.cuda.is_available()
    out = {"reference": (True, "pure PyTorch, any device and dtype")}
    out["cpu"] = (True, "C++ kernels on CPU tensors") if _ext.load() else (False, _ext.error())
    if not has_triton:
        out["triton"] = (False, "triton is not installed")
    elif cuda:
        out["triton"] = (True, "Triton kernels on CUDA tensors")
    elif _interpreting():
        out["triton"] = (True, "TRITON_INTERPRET=1: Triton kernels interpreted on CPU tensors")
    else:
        out["triton"] = (False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on the CPU)")
    if not cuda:
        out["cuda"] = (False, "no CUDA device (torch.cuda.is_available() is False)")
    elif not _ext.has_cuda_kernels():
        out["cuda"] = (False, "extension built without CUDA sources (torch had no CUDA at build time)")
    else:
        out["cuda"] = (True, "CUDA C++ kernels on CUDA tensors")
    return out


def available_backends() -> list[str]:
    return [name for name, (ok, _) in availability().items() if ok]


def _check_name(name: str, what: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{what}: unknown backend {name!r}; choose one of {', '.join(_CHOICES)}")
    if name != "auto":
        ok, why = availability()[name]
        if not ok:
            raise BackendUnavailableError(f"{what}: backend {name!r} is unavailable: {why}")
    return name


def default_backend() -> str:
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")


def current_backend() -> str:
    """The backend asked for now: the innermost `use_backend`, else the env var, else "auto"."""
    return _override.get() or default_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the ops inside the block on backend `name` (raises at entry if it is unavailable)."""
    token = _override.set(_check_name(name, "use_backend"))
    try:
        yield name
    finally:
        _override.reset(token)


def register(op: str, backend: str, impl: object, devices: tuple[str, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    """`impl` (an object with the op's functions, or a module path) runs `op` on `backend` for tensors
    on `devices` with `dtypes`."""
    assert backend in NAMES, backend
    with _lock:
        _kernels[(op, backend)] = Kernel(impl, frozenset(devices), frozenset(dtypes))
        _chosen.clear()


def _supports(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when `backend` can run `op` here, else the reason it cannot."""
    kernel = _kernels.get((op, backend))
    if kernel is None:
        return f"op {op!r} has no {backend!r} kernel"
    if backend == "triton" and device.type == "cpu" and not _interpreting():
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    if device.type not in kernel.devices:
        return f"the {backend!r} kernel of {op!r} runs on {sorted(kernel.devices)} tensors, got {device.type}"
    if dtype not in kernel.dtypes:
        names = sorted(str(d).removeprefix("torch.") for d in kernel.dtypes)
        return f"the {backend!r} kernel of {op!r} supports {names}, got {str(dtype).removeprefix('torch.')}"
    if not availability()[backend][0]:
        return f"backend {backend!r} is unavailable: {availability()[backend][1]}"
    return None


def choose(op: str, device: torch.device, dtype: torch.dtype, numel: int | None = None) -> tuple[str, str]:
    """(backend, why) that runs `op` for tensors of `device`/`dtype` (inputs of `numel` elements, when given)
    under the current setting."""
    asked = current_backend()
    if asked != "auto":
        why_not = _supports(op, asked, device, dtype)
        if why_not:
            raise BackendUnavailableError(f"use_backend({asked!r}): {why_not}")
        return asked, "asked for explicitly"
    measured = _measured_choice(op, device, dtype, numel)
    if measured is not None:
        return measured
    skipped = []
    for name in _AUTO_ORDER.get(device.type, ("reference",)):
        why_not = _supports(op, name, device, dtype)
        if why_not is None:
            reason = "first available in auto order" + (f" (skipped: {'; '.join(skipped)})" if skipped else "")
            return name, reason
        skipped.append(why_not)
    raise BackendUnavailableError(f"no backend can run {op!r} on {device.type}/{dtype}: {'; '.join(skipped)}")


def _measured_choice(op: str, device: torch.device, dtype: torch.dtype, numel: int | None) -> tuple[str, str] | None:
    """The fastest backend the auto table measured for `op` near this size that can run here, with the evidence."""
    found = autotable.lookup(op, device, dtype, numel) if numel is not None else None
    if found is None:
        return None
    ms, b = found
    here = runnable(op, device, dtype)
    fastest = sorted((t, name) for name, t in ms.items() if name in here)
    if not fastest:
        return None
    times = ", ".join(f"{name} {t:.3g} ms" for t, name in sorted((t, n) for n, t in ms.items()))
    return fastest[0][1], f"measured fastest at ~2^{b} elements ({times}; {autotable.path()})"


def runnable(op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends that can run `op` here at full speed (Triton's CPU interpreter excluded)."""
    return [name for name in NAMES if _supports(op, name, device, dtype) is None
            and not (name == "triton" and device.type == "cpu")]


def reset_choices() -> None:
    """Forget the cached choices (after the auto table changed)."""
    with _lock:
        _chosen.clear()


def kernel(op: str, x: torch.Tensor):
    """The implementation of `op` to call for input `x`."""
    numel = x.numel()
    key = (op, _override.get() or os.environ.get(ENV_VAR), x.device.type, x.dtype, numel.bit_length())
    found = _chosen.get(key)
    if found is None:
        with _lock:  # first use: choose and import once, even when threads race here
            found = _chosen.get(key)
            if found is None:
                name = choose(op, x.device, x.dtype, numel)[0]
                found = _kernels[(op, name)].resolve()
                if name == "triton" and x.device.type == "cpu":  # the interpreter
                    found = _Serialized(found)
                _chosen[key] = found
    return found


def implementations(op: str) -> list[str]:
    """Backends that have a kernel for `op` (available here or not)."""
    return [name for name in NAMES if (op, name) in _kernels]


def registered_ops() -> list[str]:
    return sorted({op for op, _ in _kernels})
