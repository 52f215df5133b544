"""Bad-input matrix (issue #10): every public entry point x every bad input x every backend that runs here.

A bad input raises a Python exception (ValueError / TypeError) whose message starts with the argument's name,
before any kernel runs. Two inputs have a documented result instead of an error:
- an empty batch (0 x ...) returns an empty result of the shape a full batch would have, and backward through it
  works: zero gradients for the parameters, as through the stock modules (BatchNorm running stats untouched,
  num_batches_tracked counted, as nn.BatchNorm2d);
- NaN / Inf in the input make exactly the outputs non-finite that stock PyTorch makes non-finite (the others
  equal stock's), without hanging or crashing.
The entry points run on float64 and tiny shapes (the Triton interpreter costs ~8 ms per program instance).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import signal
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

import shvit_kernels as sk
from shvit_kernels import ops, use_backend
from shvit_kernels import reference as R
from shvit_kernels.nn import ConvBN, FusedPatchMerging, ResidualDWConvBN, ResidualFFN, ResidualSHSA
from tests.helpers import cpu_backends, randomize_bn

D = torch.float64
B = 2


@dataclasses.dataclass
class Setup:
    """One entry point, ready to call: `call(args)` returns its (first) output, `stock(args)` the same output
    computed by stock PyTorch (modules) or the reference backend (functional ops)."""
    call: Callable[[dict], Tensor]
    args: dict  # "x" and every other argument of the entry point
    stock: Callable[[dict], Tensor]
    module: nn.Module | None = None  # the fused module called, if any
    stock_module: nn.Module | None = None
    param: str = ""  # ops: the argument moved to the other device in the "params on meta" case
    batched: tuple = ("x",)  # arguments with a batch dim (emptied together)
    stock_takes_empty: bool = True  # PVT's own Attention fails on an empty batch

    @property
    def cdim(self) -> int:  # x's channel dim: (B, C, H, W) maps, (B, N, C) tokens
        return 1 if self.args["x"].dim() == 4 else 2


# ---- the entry points -------------------------------------------------------------------------------------

def _op(fn, param: str, batched=("x",), **args) -> Setup:
    def call(a):
        out = fn(**a)
        return out[0] if isinstance(out, tuple) else out

    def stock(a):
        with use_backend("reference"):
            return call(a)

    return Setup(call, args, stock, param=param, batched=batched)


def _p(*shape, scale: float = 0.5) -> Tensor:  # an op parameter (a leaf: gradients are checked)
    return (torch.randn(shape, dtype=D) * scale + (0.5 if len(shape) == 1 else 0.0)).requires_grad_()


def op_dwconv_bn(stride=2):
    return _op(ops.dwconv_bn, "weight", x=torch.randn(B, 4, 5, 5, dtype=D), weight=_p(4, 1, 3, 3), bias=_p(4),
               stride=stride, relu=True)


def op_dwconv_bn_train(stride=1):
    return _op(ops.dwconv_bn_train, "bn_weight", x=torch.randn(B, 4, 5, 5, dtype=D), weight=_p(4, 1, 3, 3),
               bn_weight=_p(4), bn_bias=_p(4), stride=stride, residual=True, relu=True)


def _shsa_args(dim, pdim, qk_dim, train):
    o = 2 * max(qk_dim, 0) + pdim
    vectors = dict(qkv_bn_weight=_p(o), qkv_bn_bias=_p(o), proj_bn_weight=_p(dim), proj_bn_bias=_p(dim)) if train \
        else dict(qkv_bias=_p(o), proj_bias=_p(dim))
    return dict(x=torch.randn(B, dim, 3, 3, dtype=D), gn_weight=_p(pdim), gn_bias=_p(pdim), qkv_weight=_p(o, pdim),
                proj_weight=_p(dim, dim, scale=dim ** -0.5), qk_dim=qk_dim, **vectors)


def op_shsa(dim=6, pdim=3, qk_dim=2):
    return _op(ops.shsa, "proj_bias", residual=True, **_shsa_args(dim, pdim, qk_dim, False))


def op_shsa_train(dim=6, pdim=3, qk_dim=2):
    return _op(ops.shsa_train, "qkv_bn_weight", **_shsa_args(dim, pdim, qk_dim, True))


def op_ffn():
    return _op(ops.ffn, "pw2_bias", x=torch.randn(B, 4, 3, 3, dtype=D), pw1_weight=_p(8, 4), pw1_bias=_p(8),
               pw2_weight=_p(4, 8), pw2_bias=_p(4))


def op_ffn_train():
    return _op(ops.ffn_train, "bn1_weight", x=torch.randn(B, 4, 3, 3, dtype=D), pw1_weight=_p(8, 4),
               bn1_weight=_p(8), bn1_bias=_p(8), pw2_weight=_p(4, 8), bn2_weight=_p(4), bn2_bias=_p(4))


def op_sra_reduce(W=4, sr_ratio=2):
    return _op(ops.sra_reduce, "ln_bias", x=torch.randn(B, 16, 8, dtype=D), h=4, w=W, sr_weight=_p(8, 8, 2, 2),
               sr_bias=_p(8), ln_weight=_p(8), ln_bias=_p(8), sr_ratio=sr_ratio)


def op_sra_attention(num_heads=2):
    return _op(ops.sra_attention, "kv_weight", batched=("x", "red"), x=torch.randn(B, 16, 8, dtype=D),
               red=torch.randn(B, 4, 8, dtype=D), q_weight=_p(8, 8), q_bias=_p(8), kv_weight=_p(16, 8),
               kv_bias=_p(16), num_heads=num_heads, scale=0.5)


def _module(fused: nn.Module, stock: nn.Module, train: bool, x: Tensor, **args) -> Setup:
    fused = randomize_bn(fused).to(D).train(train)
    stock.to(D).train(train).load_state_dict(fused.state_dict())
    return Setup(lambda a: fused(*a.values()), dict(x=x, **args), lambda a: stock(*a.values()), fused, stock,
                 stock_takes_empty=not isinstance(stock, R.SRA))


def mod_shsa(train, dim=6, pdim=3, qk_dim=2):
    # (the fused constructor raises first on a bad config)
    return _module(sk.SHSA(dim, qk_dim, pdim), R.SHSA(dim, qk_dim, pdim), train, torch.randn(B, dim, 3, 3, dtype=D))


def mod_residual_shsa(train, dim=6, pdim=3, qk_dim=2, m=None):
    fused = ResidualSHSA(m if m is not None else sk.SHSA(dim, qk_dim, pdim))
    return _module(fused, R.Residual(R.SHSA(dim, qk_dim, pdim)), train, torch.randn(B, dim, 3, 3, dtype=D))


def mod_residual_dwconv(train, dim=4, ks=3):
    fused = ResidualDWConvBN(dim, ks)
    return _module(fused, R.Residual(R.Conv2d_BN(dim, dim, ks, 1, ks // 2, groups=dim)), train,
                   torch.randn(B, dim, 5, 5, dtype=D))


def mod_patch_merging(train, dim=4, out_dim=8):
    return _module(FusedPatchMerging(dim, out_dim), R.PatchMerging(dim, out_dim), train,
                   torch.randn(B, dim, 4, 4, dtype=D))


def mod_conv_bn(train, dim=4):
    return _module(ConvBN(dim, 8, 3, 2, 1), R.Conv2d_BN(dim, 8, 3, 2, 1), train, torch.randn(B, dim, 5, 5, dtype=D))


def mod_residual_ffn(train, dim=4):
    return _module(ResidualFFN(dim), R.Residual(R.FFN(dim, 2 * dim)), train, torch.randn(B, dim, 3, 3, dtype=D))


def mod_sra(W=4, num_heads=2, sr_ratio=2, linear=False):
    cfg = dict(dim=8, num_heads=num_heads, qkv_bias=True, sr_ratio=sr_ratio, linear=linear)
    return _module(sk.SRA(**cfg), R.SRA(**cfg), False, torch.randn(B, 16, 8, dtype=D), H=4, W=W)


def mod_convert(train, model="shvit blocks"):
    """convert() of a model holding every fusable block; the converted model is the entry point."""
    stock = nn.Sequential(R.residual_dwconv(6), R.Residual(R.SHSA(6, 2, 3)), R.PatchMerging(6, 8),
                          R.Residual(R.FFN(8, 16)))
    if model != "shvit blocks":
        sk.convert(stock[1] if model == "a block" else model)
    fused = sk.convert(randomize_bn(copy.deepcopy(stock)))
    assert [type(m) for m in fused] == [ResidualDWConvBN, ResidualSHSA, FusedPatchMerging, ResidualFFN]
    return _module(fused, stock, train, torch.randn(B, 6, 4, 4, dtype=D))


def _mode(make, train):
    return lambda **cfg: make(train, **cfg)


# name -> (factory(**config) -> Setup, the ops it runs (on their common CPU backends),
#         expected message for one channel too many)
_MAPS = ("dwconv_bn", "shsa", "ffn")
ENTRIES = {
    "ops.dwconv_bn": (op_dwconv_bn, ("dwconv_bn",), r"^weight must have shape \(5, 1, k, k\) for x with 5 channels"),
    "ops.dwconv_bn_train": (op_dwconv_bn_train, ("dwconv_bn",),
                            r"^weight must have shape \(5, 1, k, k\) for x with 5 channels"),
    "ops.shsa": (op_shsa, ("shsa",), r"^proj_weight must have shape \(7, 7\) for x with 7 channels"),
    "ops.shsa_train": (op_shsa_train, ("shsa",), r"^proj_weight must have shape \(7, 7\) for x with 7 channels"),
    "ops.ffn": (op_ffn, ("ffn",), r"^pw1_weight must have shape \(h, 5\) for x with 5 channels"),
    "ops.ffn_train": (op_ffn_train, ("ffn",), r"^pw1_weight must have shape \(h, 5\) for x with 5 channels"),
    "ops.sra_reduce": (op_sra_reduce, ("sra",), r"^sr_weight must have shape \(9, 9, 2, 2\) for x with 9 channels"),
    "ops.sra_attention": (op_sra_attention, ("sra",),
                          r"^red must have shape \(2, M >= 1, 9\) for x of shape \(2, 16, 9\)"),
    **{f"SHSA.{m}": (_mode(mod_shsa, m == "train"), ("shsa",), r"^x must have shape \(B, 6, H, W\), got \(2, 7,")
       for m in ("eval", "train")},
    **{f"ResidualSHSA.{m}": (_mode(mod_residual_shsa, m == "train"), ("shsa",),
                             r"^x must have shape \(B, 6, H, W\), got \(2, 7,") for m in ("eval", "train")},
    **{f"ResidualDWConvBN.{m}": (_mode(mod_residual_dwconv, m == "train"), ("dwconv_bn",),
                                 r"^x must have shape \(B, 4, H, W\), got \(2, 5,") for m in ("eval", "train")},
    **{f"FusedPatchMerging.{m}": (_mode(mod_patch_merging, m == "train"), ("dwconv_bn",),
                                  r"^x must have shape \(B, 4, H, W\), got \(2, 5,") for m in ("eval", "train")},
    **{f"ConvBN.{m}": (_mode(mod_conv_bn, m == "train"), (), r"^x must have shape \(B, 4, H, W\), got \(2, 5,")
       for m in ("eval", "train")},
    **{f"ResidualFFN.{m}": (_mode(mod_residual_ffn, m == "train"), ("ffn",),
                            r"^x must have shape \(B, 4, H, W\), got \(2, 5,") for m in ("eval", "train")},
    "SRA.sr2": (mod_sra, ("sra",), r"^x must have shape \(B, N, 8\), got \(2, 16, 9\)"),
    "SRA.sr1": (lambda **c: mod_sra(**{"sr_ratio": 1, **c}), ("sra",), r"^x must have shape \(B, N, 8\), got"),
    "SRA.linear": (lambda **c: mod_sra(linear=True, **c), ("sra",), r"^x must have shape \(B, N, 8\), got"),
    **{f"convert.{m}": (_mode(mod_convert, m == "train"), _MAPS, r"^x must have shape \(B, 6, H, W\), got \(2, 7,")
       for m in ("eval", "train")},
}


def _backends(entry: str) -> list[str]:
    lists = [cpu_backends(op) for op in ENTRIES[entry][1]] or [["reference"]]  # () runs no op: stock ATen only
    return [b for b in lists[0] if all(b in other for other in lists)]


# ---- the bad inputs -----------------------------------------------------------------------------------------

def _set(**changes):
    def mutate(s: Setup):
        s.args.update({k: v(s.args[k]) if callable(v) else v for k, v in changes.items()})
    return mutate


def _params_to_meta(s: Setup):
    if s.module is not None:
        s.module.to("meta")
    else:
        s.args[s.param] = s.args[s.param].detach().to("meta")


# case -> (config for the entry's factory, mutation of the built Setup)
CASES = {
    "rank-1": ({}, _set(x=lambda x: x[0])),
    "rank+1": ({}, _set(x=lambda x: x[None])),
    "channels+1": ({}, lambda s: _set(x=lambda x: torch.cat([x, x.narrow(s.cdim, 0, 1)], s.cdim))(s)),
    "int32": ({}, _set(x=lambda x: x.to(torch.int32))),
    "bool": ({}, _set(x=lambda x: x > 0)),
    "complex": ({}, _set(x=lambda x: x.to(torch.complex128))),
    "x on meta": ({}, _set(x=lambda x: x.to("meta"))),
    "params on meta": ({}, _params_to_meta),
    "not a tensor": ({}, _set(x=lambda x: x.tolist())),
    "pdim > dim": (dict(pdim=7), None),
    "qk_dim = 0": (dict(qk_dim=0), None),
    "qk_dim < 0": (dict(qk_dim=-1), None),
    "H*W != N": (dict(W=5), None),
    "num_heads = 0": (dict(num_heads=0), None),
    "sr_ratio = 0": (dict(sr_ratio=0), None),
    "stride = 3": (dict(stride=3), None),
    "ks even": (dict(ks=4), None),
    "dim = 0": (dict(dim=0), None),
    "out_dim < 0": (dict(out_dim=-1), None),
    "m not an SHSA": (dict(m=nn.Conv2d(6, 6, 1)), None),
    "model not a Module": (dict(model="model"), None),
    "model is a block": (dict(model="a block"), None),
}

_RANK = {4: r"^x must have 4 dims, got shape", 3: r"^x must have 3 dims, got shape"}
_FLOAT = r"^x must be a floating tensor \(float16, bfloat16, float32, float64\), got torch\."


def _common_rows(entry: str, rank: int, param: str) -> list[tuple]:
    return [(entry, "rank-1", ValueError, _RANK[rank]), (entry, "rank+1", ValueError, _RANK[rank]),
            (entry, "channels+1", ValueError, ENTRIES[entry][2]),
            (entry, "int32", TypeError, _FLOAT + "int32"), (entry, "bool", TypeError, _FLOAT + "bool"),
            (entry, "complex", TypeError, _FLOAT + "complex128"),
            (entry, "x on meta", ValueError, r"^[\w.]+ is on cpu but x is on meta; move them to one device"),
            (entry, "params on meta", ValueError, rf"^{param} is on meta but x is on cpu"),
            (entry, "not a tensor", TypeError, r"^x must be a torch\.Tensor, got list")]


_SHSA_CONFIG = [("pdim > dim", ValueError, r"pdim \(7\)"),  # names pdim (modules) / gn_weight: pdim (ops)
                ("qk_dim = 0", ValueError, r"qk_dim must be a positive int, got 0"),
                ("qk_dim < 0", ValueError, r"qk_dim must be a positive int, got -1")]
_ANY_PARAM = r"[\w.]+"
# (entry point, case, expected exception, message pattern)
TABLE = [
    *_common_rows("ops.dwconv_bn", 4, "weight"), *_common_rows("ops.dwconv_bn_train", 4, "bn_weight"),
    *_common_rows("ops.shsa", 4, "proj_bias"), *_common_rows("ops.shsa_train", 4, "qkv_bn_weight"),
    *_common_rows("ops.ffn", 4, "pw2_bias"), *_common_rows("ops.ffn_train", 4, "bn1_weight"),
    *_common_rows("ops.sra_reduce", 3, "ln_bias"), *_common_rows("ops.sra_attention", 3, "kv_weight"),
    *(row for e in ENTRIES if not e.startswith("ops.")
      for row in _common_rows(e, 3 if e.startswith("SRA") else 4, _ANY_PARAM)),
    ("ops.dwconv_bn", "stride = 3", ValueError, r"^stride must be 1 or 2, got 3"),
    ("ops.dwconv_bn_train", "stride = 3", ValueError, r"^stride must be 1 or 2, got 3"),
    *((e, *row) for e in ("ops.shsa", "ops.shsa_train", "SHSA.eval", "SHSA.train", "ResidualSHSA.eval")
      for row in _SHSA_CONFIG),
    ("ResidualSHSA.eval", "m not an SHSA", TypeError, r"^ResidualSHSA: m must be an SHSA .*, got Conv2d"),
    ("ResidualDWConvBN.eval", "ks even", ValueError, r"^ResidualDWConvBN: ks must be odd and at most 7, got 4"),
    ("ResidualDWConvBN.eval", "dim = 0", ValueError, r"^ResidualDWConvBN: dim must be a positive int, got 0"),
    ("ResidualFFN.eval", "dim = 0", ValueError, r"^ResidualFFN: dim must be a positive int, got 0"),
    ("FusedPatchMerging.eval", "dim = 0", ValueError, r"^FusedPatchMerging: dim must be a positive int, got 0"),
    ("FusedPatchMerging.eval", "out_dim < 0", ValueError,
     r"^FusedPatchMerging: out_dim must be a positive int, got -1"),
    *((e, "H*W != N", ValueError, r"^x has N=16 tokens but H\*W = 4\*5 = 20")
      for e in ("ops.sra_reduce", "SRA.sr2", "SRA.sr1", "SRA.linear")),
    ("ops.sra_reduce", "sr_ratio = 0", ValueError, r"^sr_ratio must be an int in 2\.\.min\(H, W\) = 4, got 0"),
    ("ops.sra_attention", "num_heads = 0", ValueError, r"^num_heads must be a positive divisor of C=8, got 0"),
    ("SRA.sr2", "num_heads = 0", ValueError, r"^SRA: num_heads must be a positive int, got 0"),
    ("SRA.sr2", "sr_ratio = 0", ValueError, r"^SRA: sr_ratio must be a positive int, got 0"),
    ("convert.eval", "model not a Module", TypeError, r"^convert: model must be a torch\.nn\.Module, got str"),
    ("convert.eval", "model is a block", TypeError, r"^convert: pass the model that holds the block"),
]


def _with_backends(rows):
    return [pytest.param(*row, backend, id=f"{row[0]}-{row[1]}-{backend}") for row in rows
            for backend in _backends(row[0])]


@pytest.mark.parametrize("entry,case,exc,match,backend", _with_backends(TABLE))
def test_bad_input_raises_naming_the_argument(entry, case, exc, match, backend):
    config, mutate = CASES[case]
    make = ENTRIES[entry][0]
    s = None if config else make()
    with use_backend(backend), pytest.raises(exc, match=match):
        s = s or make(**config)
        if mutate is not None:
            mutate(s)
        s.call(s.args)


def test_table_covers_every_entry_point_and_case():
    assert {e for e, *_ in TABLE} == set(ENTRIES)
    assert {c for _, c, *_ in TABLE} == set(CASES)
    for entry in ENTRIES:
        assert {"rank-1", "channels+1", "int32", "bool", "complex", "x on meta"} <= {c for e, c, *_ in TABLE
                                                                                      if e == entry}


# ---- documented results: empty batch, NaN / Inf -------------------------------------------------------------

def _assert_same_buffers(s: Setup):
    if s.module is not None:
        stock = s.stock_module.state_dict()
        for k, v in s.module.state_dict().items():
            torch.testing.assert_close(v, stock[k], equal_nan=True, msg=k)


@pytest.mark.parametrize("entry,backend", [(e, b) for e in ENTRIES for b in _backends(e)])
def test_empty_batch_gives_empty_result_and_backward_works(entry, backend):
    s = ENTRIES[entry][0]()
    state = copy.deepcopy(s.stock_module.state_dict()) if s.stock_module is not None else None
    full = s.stock(s.args).shape  # (the stock module then forgets this batch)
    if state is not None:
        s.stock_module.load_state_dict(state)
    for k in s.batched:
        s.args[k] = s.args[k][:0].detach().requires_grad_()
    with use_backend(backend):
        y = s.call(s.args)
        assert y.shape == (0, *full[1:]) and y.dtype == D
        y.sum().backward()
    for k in s.batched:
        assert s.args[k].grad is not None and s.args[k].grad.shape == s.args[k].shape, k
    params = dict(s.module.named_parameters()) if s.module is not None else \
        {k: t for k, t in s.args.items() if isinstance(t, Tensor) and k not in s.batched}
    assert params
    for name, p in params.items():
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any(), name
    if s.stock_takes_empty:  # running stats and num_batches_tracked as the stock module's
        assert s.stock(s.args).shape == y.shape
        _assert_same_buffers(s)


@contextlib.contextmanager
def _deadline(seconds: float):
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""
    def expire(*_):
        raise TimeoutError(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy warns on NaN arithmetic
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("entry,backend", [(e, b) for e in ENTRIES for b in _backends(e)])
def test_nan_and_inf_propagate_as_in_stock(entry, backend, value):
    s = ENTRIES[entry][0]()
    x = s.args["x"].clone()
    # NaN in the last channel (SHSA: outside the attention's pdim), Inf in the first, of sample 0 only
    channel = -1 if value != value else 0
    x[(0, channel, 1, 1) if x.dim() == 4 else (0, 5, channel)] = value
    s.args["x"] = x
    with use_backend(backend), _deadline(120), torch.no_grad():
        y = s.call(s.args)
    with torch.no_grad():
        ref = s.stock(s.args)
    bad = ~torch.isfinite(ref)
    assert bad.any() or value == float("inf"), "stock keeps a NaN"  # (ReLU(-inf) may leave no Inf)
    assert torch.equal(~torch.isfinite(y), bad), \
        f"{(~torch.isfinite(y)).sum()} non-finite outputs, stock has {bad.sum()}"
    torch.testing.assert_close(y[~bad], ref[~bad])
    _assert_same_buffers(s)


@pytest.mark.parametrize("entry", ["SHSA.eval", "ResidualSHSA.eval", "ResidualDWConvBN.eval", "ResidualFFN.eval"])
def test_eval_fold_follows_the_input_dtype(entry):
    """The eval modules fold BN into weights of the input's dtype and cache them: an input of another dtype
    must re-fold, not reuse the cached weights (which failed with "qkv_weight has dtype torch.float32 ...")."""
    s = ENTRIES[entry][0]()
    x = s.args["x"]
    with torch.no_grad():
        assert s.call({"x": x.float()}).dtype == torch.float32
        torch.testing.assert_close(s.call({"x": x}), s.stock({"x": x}))


# ---- a real second device --------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("x_on_cuda", [False, True], ids=["cpu-x-cuda-params", "cuda-x-cpu-params"])
@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_device_mix_with_cuda(entry, x_on_cuda):
    s = ENTRIES[entry][0]()
    if x_on_cuda:
        s.args["x"] = s.args["x"].cuda()
    elif s.module is not None:
        s.module.cuda()
    else:
        s.args.update({k: t.detach().cuda() for k, t in s.args.items() if isinstance(t, Tensor) and k != "x"})
    where = r"^[\w.]+ is on cpu but x is on cuda:0" if x_on_cuda else r"^[\w.]+ is on cuda:0 but x is on cpu"
    with pytest.raises(ValueError, match=where):
        s.call(s.args)
