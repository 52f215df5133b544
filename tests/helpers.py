"""Shared test utilities."""
from __future__ import annotations

import torch
from torch import nn

from shvit_kernels.bench import randomize_bn  # noqa: F401  (re-exported for the tests)


def rand_bn_(bn: nn.modules.batchnorm._BatchNorm) -> nn.modules.batchnorm._BatchNorm:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.5)
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def bn_states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def assert_close_to_oracle(out: torch.Tensor, stock: torch.Tensor, oracle: torch.Tensor, atol: float = 1e-6):
    """DESIGN.md's rule: error of the fused result vs the float64 oracle <= 2x stock's error in the same dtype + atol."""
    err = (out.double() - oracle).abs().max().item()
    stock_err = (stock.double() - oracle).abs().max().item()
    assert err <= 2 * stock_err + atol, f"fused error {err:.3e} > 2 x stock error {stock_err:.3e} + {atol:.0e}"


def takes(op: str, backend: str, device: str, dtype: torch.dtype) -> bool:
    """Whether `backend` runs `op` on `device` tensors of `dtype` here: it is available and has such a kernel (Triton
    takes CPU tensors only under the interpreter; the CUDA SHSA has no float64)."""
    from shvit_kernels import backends

    return backends._supports(op, backend, torch.device(device), dtype) is None


def cpu_backends(op: str) -> list[str]:
    """Backends that run `op` on CPU tensors here: reference always, cpu when built, triton under the interpreter."""
    return [b for b in ("reference", "cpu", "triton") if takes(op, b, "cpu", torch.float32)]


def triton_kernels() -> list[tuple]:
    """(module, attribute name, kernel) of every Triton kernel of `shvit_kernels.triton`: the module attributes
    named `*_kernel` that are JIT (or, under the interpreter, interpreted) functions."""
    import importlib
    import pkgutil

    import shvit_kernels.triton as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        mod = importlib.import_module(f"{package.__name__}.{info.name}")
        found += [(mod, name, obj) for name, obj in vars(mod).items()
                  if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "__getitem__")]
    return found


def replace_triton_kernels(monkeypatch, record) -> None:
    """Replace every Triton kernel (triton_kernels()) by a recorder: the launchers run as usual, but
    `kernel[grid](*args, **kwargs)` calls `record(name, kernel, grid, args, kwargs)` (kernel: the original JIT /
    interpreted function) instead of launching. The launchers' outputs are then left unwritten, so inputs may be
    `meta` tensors of any size."""

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: record(self.name, self.kernel, tuple(grid), args, kwargs)

    for mod, name, obj in triton_kernels():
        monkeypatch.setattr(mod, name, Recorder(name, obj))


def triton_compile_key(binders: dict, kernel, args: tuple, kwargs: dict) -> tuple:
    """What Triton's JIT keys its compiled-kernel cache on for this launch (triton.runtime.jit.JITFunction.run):
    the binder's specialisation of every argument (a tl.constexpr: its value; an int: ("constexpr", 1) when it is 1,
    else its type and "D" when divisible by 16; a tensor: its element type and "D" when 16-byte aligned) and the
    launch options (num_warps, ...). Computed by Triton's own binder, with the CUDA backend's rules (BaseBackend's:
    the NVIDIA backend does not override them)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    binder = binders.get(kernel)
    if binder is None:
        jit = JITFunction(kernel.fn)
        binder = binders[kernel] = (create_function_from_signature(jit.signature, jit.params, BaseBackend),
                                    tuple(p.is_constexpr for p in jit.params))
    _, spec, options = binder[0](*args, **kwargs)
    return tuple(spec), tuple(sorted(options.items())), binder[1]


def size_launchers_for_gpu(monkeypatch) -> None:
    """Make the SHSA / FFN / conv Triton launchers (whose tiles depend on `_common._Shape.gpu`) pick what they pick
    for a CUDA tensor, whatever the inputs' device (CPU or meta); outputs stay on the inputs' device. SRA's launchers
    already take a meta tensor as a GPU's."""
    import types

    from shvit_kernels.triton import _common

    shape_init = _common._Shape.__init__

    def as_on_gpu(self, x):
        shape_init(self, types.SimpleNamespace(shape=x.shape, dtype=x.dtype, device=torch.device("cuda")))
        assert self.gpu, "the SHSA / FFN launchers no longer decide the GPU configuration in _Shape"
        self.dev = x.device

    monkeypatch.setattr(_common._Shape, "__init__", as_on_gpu)
