"""Argument checks shared by the ops: clear Python errors naming the argument, before any kernel runs."""
from __future__ import annotations

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, ndim: int | None = None, shape: tuple | None = None, why: str = "") -> None:
    """`t` is a floating tensor [of `ndim` dims] [of `shape`, where a str entry such as "B" matches any size];
    `why` ends the shape message (e.g. " for x with 12 channels")."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and not _matches(shape, t.shape):
        want = str(tuple(shape)).replace("'", "")
        raise ValueError(f"{name} must have shape {want}{why}, got {tuple(t.shape)}")


def _matches(shape: tuple, got: torch.Size) -> bool:
    # a loop, not any(<generator>): every op call checks several tensors, and this is on the per-call host path
    if len(shape) != len(got):
        return False
    for s, n in zip(shape, got):
        if s != n and not isinstance(s, str):
            return False
    return True


def check_positive_ints(owner: str, **values) -> None:
    for name, val in values.items():
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"{owner}: {name} must be a positive int, got {val!r}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def check_same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                            "cast them to one dtype (or run under torch.autocast)")


def check_tokens(x: torch.Tensor, h: int, w: int) -> None:
    """x (B, N, C) holds the N = h*w tokens of an h x w map."""
    check_tensor("x", x, ndim=3)
    if not (isinstance(h, int) and isinstance(w, int)) or h <= 0 or w <= 0:
        raise ValueError(f"H and W must be positive ints, got {h!r}, {w!r}")
    if x.shape[1] != h * w:
        raise ValueError(f"x has N={x.shape[1]} tokens but H*W = {h}*{w} = {h * w}")
    if x.shape[2] == 0:
        raise ValueError(f"x must have a non-empty channel dim, got shape {tuple(x.shape)}")


def empty_result(shape: tuple, x: torch.Tensor, *inputs) -> torch.Tensor:
    """An op's result for an empty batch (no kernel runs): a new empty tensor of `shape`, linked for autograd to
    x and the tensors among `inputs` so that backward through it works and gives them zero gradients, as the
    stock modules do."""
    y = x.new_empty(shape)
    linked = [t for t in (x, *inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    if linked and torch.is_grad_enabled():
        y = y + sum(t.sum() for t in linked).mul(0).to(y.dtype)
    return y


# Device types with autocast, read once: dynamo (torch 2.11) cannot trace torch.amp.is_autocast_available.
_AUTOCAST_DEVICES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia")
                              if torch.amp.is_autocast_available(d))


def autocast_enabled(device: str) -> bool:
    """torch.is_autocast_enabled(device), and False for device types without autocast (for which it raises: meta,
    in shape-only runs and torch.export)."""
    return device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device)


def autocast(*tensors):
    """Under torch.autocast, cast the matmul/conv operands to the autocast dtype (as autocast does for
    F.conv2d / F.linear): custom ops are not autocast by PyTorch itself. Non-tensors pass through."""
    ref = next(t for t in tensors if isinstance(t, torch.Tensor))
    device = ref.device.type
    if not (ref.is_floating_point() and autocast_enabled(device)):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
