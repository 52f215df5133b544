"""The training ops return extra outputs besides y (batch statistics; the pre-BN activations the C++ kernels keep
for the backward; SRA's log-sum-exp). They are non-differentiable, and autograd must not zero-fill gradients for
them before calling the backward (for the FFN at 16x224x16x16, z1 and z2: an 11 MB memset per training step).
Checked on every bench case's fused module in training: outside the shvit:: ops, the backward zero-fills no tensor
shaped like an extra output of a `shvit::` op of the forward (ops/_autograd.py: mark_extra_outputs). A backward
called with no gradient for y at all returns none (gradcheck's undefined-gradient check, in each op's tests)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shvit_kernels import backends, use_backend
from shvit_kernels.bench import cases, randomize_bn

BACKENDS = [b for b in ("reference", "cpu") if b in backends.available_backends()]
CASES = {c.op: c for c in cases(2)}  # one case per op, its last (FFN: stage 3's; SHSA: detection's; SRA: stage 2's)


class _ExtraOutputs(TorchDispatchMode):
    """Records the shapes of every output but the first of the shvit:: ops that run under it."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "shvit" and isinstance(out, (tuple, list)):
            self.shapes.update(tuple(t.shape) for t in out[1:] if isinstance(t, torch.Tensor) and t.numel() > 1)
        return out


def _inside_shvit_op(event) -> bool:
    """Whether a profiler event ran inside a shvit:: op (a kernel may zero its own buffers; autograd's
    materialized gradients are made outside, before the backward op runs)."""
    while event is not None:
        if event.name.startswith("shvit::"):
            return True
        event = event.cpu_parent
    return False


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(CASES))
def test_backward_zero_fills_no_extra_output(op, backend):
    case = CASES[op]
    fused = case.make_fused(randomize_bn(case.make_stock())).train()
    x = torch.randn(case.input_shape, requires_grad=True)
    with use_backend(backend):
        with _ExtraOutputs() as extras:
            y = fused(x, *case.args)
        assert extras.shapes, "no shvit:: op with extra outputs ran"
        with torch.profiler.profile(record_shapes=True) as prof:
            y.backward(torch.randn_like(y))
    filled = [tuple(e.input_shapes[0]) for e in prof.events()
              if e.name in ("aten::zero_", "aten::fill_") and e.input_shapes and not _inside_shvit_op(e)]
    assert not extras.shapes & set(filled), (extras.shapes, filled)
    assert x.grad is not None and x.grad.abs().sum() > 0

