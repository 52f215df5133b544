"""The C++ kernels' scratch comes from a per-thread arena that outlives the call (csrc/cpu/scratch_arena.h), so
that a call does not page-fault fresh temporaries in every time (glibc returns large freed blocks to the kernel).

- A warm call allocates nothing through PyTorch's allocator beyond the tensors it returns (the profiler sees every
  CPU tensor allocation), for SHSA's four kernels and SRA's attention pair; this fails if the scratch goes back to
  per-call tensors or the arena never grows to serve a call.
- Reused scratch is never read before it is written: every kernel, after the arenas of both threads were filled
  with NaN by a larger call (which also makes the next calls take pieces that do not fit and fall back), still
  gives the reference backend's results, for shapes smaller, equal and larger than the poisoning one.
"""
import pytest
import torch

from shvit_kernels import backends, use_backend

pytestmark = pytest.mark.skipif("cpu" not in backends.available_backends(), reason="C++ extension not built")


def _allocated_bytes(fn):
    """(fn(), bytes allocated through PyTorch's CPU allocator while it ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def _nbytes(out):
    ts = out if isinstance(out, (tuple, list)) else (out,)
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _shsa_args(b, c, p, q, h, w, fill=None):
    """Eval and training argument lists of the SHSA kernels (x first), random or all `fill`."""
    def t(*shape, scale=1.0, offset=0.0):
        v = torch.randn(*shape, dtype=torch.float64) * scale + offset
        return (v.fill_(fill) if fill is not None else v).float()

    x = t(b, c, h, w)
    gn = [t(p, scale=0.2, offset=1.0), t(p, scale=0.2)]
    qkv_w, proj_w = t(2 * q + p, p, scale=p ** -0.5), t(c, c, scale=c ** -0.5)
    qkv_bn, proj_bn = [t(2 * q + p, scale=0.2, offset=1.0), t(2 * q + p, scale=0.2)], [t(c, scale=0.2, offset=1.0),
                                                                                           t(c, scale=0.2)]
    eval_args = [x, *gn, 1e-5, qkv_w, qkv_bn[1], proj_w, proj_bn[1], q, True]
    train_args = [x, *gn, 1e-5, qkv_w, *qkv_bn, 1e-5, proj_w, *proj_bn, 1e-5, q, True]
    return eval_args, train_args


def _shsa_calls(k, eval_args, train_args):
    """name -> call of each SHSA kernel of backend object k."""
    gy = torch.randn_like(eval_args[0])
    y, qm, qv, pm, pv, *kept = k.train_fwd(*train_args)
    stats = [qm, qv, pm, pv]
    kw = {"kept": kept[0]} if getattr(k, "takes_kept", False) else {}
    return {"fwd": lambda: k.fwd(*eval_args), "bwd": lambda: k.bwd(gy, *eval_args),
            "train_fwd": lambda: k.train_fwd(*train_args),
            "train_bwd": lambda: k.train_bwd(gy, *train_args[:-2], *stats, *train_args[-2:], **kw)}


def _sra_args(b, n, m, c, heads, fill=None):
    def t(*shape, scale=1.0):
        v = torch.randn(*shape, dtype=torch.float64) * scale
        return (v.fill_(fill) if fill is not None else v).float()

    return [t(b, n, c), t(b, m, c), t(c, c, scale=c ** -0.5), t(c, scale=0.1), t(2 * c, c, scale=c ** -0.5),
            t(2 * c, scale=0.1), heads, (c // heads) ** -0.5]


def _sra_calls(k, args):
    o, lse = k.attn_fwd(*args)
    g_o = torch.randn_like(o)
    return {"attn_fwd": lambda: k.attn_fwd(*args),
            "attn_bwd": lambda: k.attn_bwd(g_o, *args[:6], o, lse, *args[6:])}


def _kernel(op, x, backend):
    with use_backend(backend):
        return backends.kernel(op, x)


SHAPES = {"shsa": (16, 48, 16, 16, 8, 8), "sra": (4, 196, 49, 32, 2)}


def _calls(op, shape, fill=None, backend="cpu"):
    if op == "shsa":
        eval_args, train_args = _shsa_args(*shape, fill=fill)
        return _shsa_calls(_kernel(op, eval_args[0], backend), eval_args, train_args)
    args = _sra_args(*shape, fill=fill)
    return _sra_calls(_kernel(op, args[0], backend), args)


@pytest.mark.parametrize("op", ["shsa", "sra"])
def test_warm_call_allocates_only_its_outputs(op):
    for name, call in _calls(op, SHAPES[op]).items():
        call()  # grows this thread's and the workers' arenas to what the call needs
        out, allocated = _allocated_bytes(call)
        assert allocated == _nbytes(out), f"{op} {name}: allocated {allocated} bytes, returned {_nbytes(out)}"


def _scaled(shape, f):
    return tuple(max(1, round(s * f)) if i in (0,) else s for i, s in enumerate(shape))


@pytest.mark.parametrize("op", ["shsa", "sra"])
def test_reused_scratch_is_written_before_it_is_read(op):
    big = _scaled(SHAPES[op], 2)
    torch.manual_seed(0)
    for call in _calls(op, big, fill=float("nan")).values():
        call()  # every arena piece these kernels use now holds NaN (or garbage from the NaN arithmetic)
    for shape in (SHAPES[op], big, _scaled(SHAPES[op], 3)):
        seed = torch.randint(0, 2**31, ()).item()
        torch.manual_seed(seed)
        got = {n: c() for n, c in _calls(op, shape).items()}
        torch.manual_seed(seed)
        for name, ref in _calls(op, shape, backend="reference").items():
            want = _flat(ref())  # (the C++ training forward also returns the pre-BN projection it keeps: not compared)
            for i, (a, b) in enumerate(zip(_flat(got[name])[:len(want)], want, strict=True)):
                assert torch.isfinite(a).all(), f"{op} {name} output {i} at {shape}: non-finite values"
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{op} {name} output {i} at {shape}")


def _flat(out):
    return out if isinstance(out, (tuple, list)) else (out,)
