"""Model-level workflows on a converted SHViT (issue #9): autocast, channels_last, gradient checkpointing, CUDA-graph
capture, variable input resolution, and the Triton kernel specialisations that a range of resolutions compiles.

Every test compares the converted model with the stock one built from the same weights (a small 3-stage SHViT with
non-power-of-two pdims, BatchNorms randomised so that no block is an identity)."""
from __future__ import annotations

import contextlib
import copy
from unittest import mock

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import shvit_kernels as sk
from shvit_kernels import backends
from shvit_kernels.models.shvit import SHViT
from shvit_kernels.nn import ConvBN
from shvit_kernels.nn._match import is_pointwise
from tests.helpers import (bn_states, cpu_backends, randomize_bn, replace_triton_kernels, size_launchers_for_gpu,
                           triton_compile_key)

try:
    import triton
except ImportError:
    triton = None

# The CPU models below run Triton only under the interpreter (tests/conftest.py sets it where there is no GPU); with
# a GPU, Triton takes CUDA tensors only, and the `gpu` tests further down run it.
CPU_BACKENDS = [b for b in cpu_backends("ffn") if b != "reference"]
TRITON = "triton" in CPU_BACKENDS
RESOLUTIONS = [(224, 224), (256, 256), (384, 384), (512, 512), (800, 1333)]  # (H, W); 1333x800 is detection's


def _stock(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = SHViT(num_classes=5, embed_dim=(16, 24, 32), partial_dim=(8, 10, 12), qk_dim=(4, 4, 4), depth=(1, 1, 1),
                  types=("i", "s", "s"))
    return randomize_bn(model).to(dtype)


def _pair(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    stock = _stock(dtype)
    return stock, sk.convert(copy.deepcopy(stock))


@contextlib.contextmanager
def _backend(name: str):
    """Run every op that `name` implements on `name`, the others (say, an op without a Triton kernel) on "auto"."""
    if name == "auto":
        yield
        return
    kernel = backends.kernel

    def choose(op, x):
        if name not in backends.implementations(op):
            return kernel(op, x)
        with backends.use_backend(name):
            return kernel(op, x)

    with mock.patch.object(backends, "kernel", choose):
        yield


@pytest.fixture(autouse=True)
def _one_thread():
    """The CPU runs here are tiny: one thread is faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(model: nn.Module, x: torch.Tensor, proj: torch.Tensor, train: bool, backend: str = "auto",
         autocast: torch.dtype | None = None) -> dict:
    """Forward + backward of a random projection of the logits; outputs, input / parameter grads, BN buffers."""
    model.train(train)
    x = x.clone().requires_grad_()
    with _backend(backend), torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = model(x)
    with _backend(backend):
        (y.to(proj.dtype) * proj).sum().backward()
    return {"y": y.detach(), "x.grad": x.grad, **{f"{n}.grad": p.grad for n, p in model.named_parameters()},
            **{k: v.clone() for k, v in bn_states(model).items()}}


# ---- 1. autocast -----------------------------------------------------------------------------------------------

def _rel_err(a: torch.Tensor, oracle: torch.Tensor) -> float:
    return ((a.double() - oracle).abs().max() / oracle.abs().max().clamp_min(1e-30)).item()


def _flat_grads(r: dict) -> torch.Tensor:
    return torch.cat([v.double().flatten() for k, v in r.items() if k.endswith(".grad") and k != "x.grad"])


# The converted model under autocast runs its ops in the autocast dtype (the ops cast their GEMM / conv operands as
# autocast casts F.conv2d's); on this CPU "auto" picks the reference kernels for bf16 / fp16 (the C++ ones are
# fp32 / fp64), Triton runs fp16 under the interpreter (its bf16 dot is broken there: DESIGN.md), eval only (cost).
AUTOCAST_CASES = [("auto", torch.bfloat16, False), ("auto", torch.bfloat16, True), ("auto", torch.float16, False),
                  ("auto", torch.float16, True)] + ([("triton", torch.float16, False)] if TRITON else [])
NOISE_SAMPLES = 11


def _perturbed(model: nn.Module, dtype: torch.dtype, gen: torch.Generator) -> nn.Module:
    """A copy with every parameter moved by a random relative step of at most half an ulp of `dtype`: the error
    that rounding the parameters to `dtype` (as the fused ops do to their folded weights) may introduce."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + (torch.rand(p.shape, generator=gen, dtype=p.dtype) * 2 - 1) * torch.finfo(dtype).eps / 2)
    return model


@pytest.mark.parametrize("backend,dtype,train", AUTOCAST_CASES,
                         ids=[f"{b}-{str(d)[6:]}-{'train' if t else 'eval'}" for b, d, t in AUTOCAST_CASES])
def test_autocast_matches_stock_under_autocast(backend, dtype, train):
    """Under torch.autocast("cpu", dtype) the converted model runs (eval and training, forward and backward), every
    module's output has the stock module's dtype, and the logits, the input and parameter gradients and (training)
    the BN running statistics are as close to the float64 stock model as stock's own under the same autocast.

    Tolerance: DESIGN.md's rule, error vs the float64 oracle <= 2x stock's error in the same dtype + a tiny atol
    (1% of the dtype's eps), errors taken relative to the oracle's max |value| over all elements (all parameter
    grads as one vector, all running means as one, all running vars as one). As in the property tests, stock's
    error is the worst of several samples of its rounding noise: the stock model and NOISE_SAMPLES copies with
    parameters moved by up to half an ulp of the dtype. One stock run is not enough at model level: a random
    network's deep features are nearly the same for every sample, which makes some gradients ill-conditioned, so the
    rounding pattern alone decides their error (one measured case, an SHSA input gradient in bf16: 0.07% with the
    conv weight rounded as stock rounds it, 30% with the BN-folded weight rounded as the fused op does, 0.05% to 8%
    under random half-ulp moves). Some of these errors are bimodal across rounding samples (one seed: stock's
    parameter-grad error 2.4e-3 or 5.0e-3, about half of the samples each), so the fused run lands in the high mode
    while every stock sample lands in the low one with probability ~2^-(samples): with one stock run the ratio fused /
    stock reached 10 over 40 seeds; with the worst of 4 it passed 2 in 5 of 800 seeded runs (the four "auto" cases,
    200 seeds each; max 3.5, one such failure in CI); with the worst of 12 in none (max 1.64). A cast in the wrong place, a stale fold of another dtype, or an op that ignores
    autocast shows as an O(1) error or a dtype mismatch."""
    batch, size = (8, 128) if backend == "auto" else (2, 64)
    stock, fused = _pair()
    oracle = copy.deepcopy(stock).double()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    noisy = [_perturbed(stock, dtype, gen) for _ in range(NOISE_SAMPLES)]
    x, proj = torch.randn(batch, 3, size, size), torch.randn(batch, 5)
    dtypes = {}

    def record(prefix):
        def hook(mod, inp, out):
            dtypes.setdefault(prefix, {}).setdefault(mod._name, out.dtype)
        return hook

    for prefix, model in (("stock", stock), ("fused", fused)):
        for name, mod in model.named_modules():
            mod._name = name
            mod.register_forward_hook(record(prefix))
    ref = _run(oracle, x.double(), proj.double(), train)
    res_f = _run(fused, x, proj, train, backend, autocast=dtype)
    res_s = [_run(m, x, proj, train, autocast=dtype) for m in [stock, *noisy]]
    assert res_f["y"].dtype == res_s[0]["y"].dtype == dtype
    shared = dtypes["fused"].keys() & dtypes["stock"].keys()  # the fused blocks' inner modules do not run
    assert len(shared) > 20 and {n: dtypes["fused"][n] for n in shared} == {n: dtypes["stock"][n] for n in shared}
    atol = 0.01 * torch.finfo(dtype).eps
    checks = {"logits": lambda r: r["y"], "x.grad": lambda r: r["x.grad"], "parameter grads": _flat_grads}
    if train:  # all running means / all running vars as one vector each, like the parameter grads
        for stat in ("running_mean", "running_var"):
            checks[stat] = lambda r, stat=stat: torch.cat([v.double() for k, v in r.items() if k.endswith(stat)])
    for what, get in checks.items():
        assert torch.isfinite(get(res_f)).all(), what
        e_f = _rel_err(get(res_f), get(ref))
        e_s = max(_rel_err(get(r), get(ref)) for r in res_s)
        assert e_f <= 2 * e_s + atol, f"{what}: fused error {e_f:.3e} > 2 x stock error {e_s:.3e} + {atol:.1e}"
    if train:
        for k in ref:
            if "num_batches" in k:
                assert torch.equal(res_f[k], res_s[0][k]), k


# ---- 2. channels_last -------------------------------------------------------------------------------------------

def _assert_float64_equal(fused: dict, stock: dict, what: str = "") -> None:
    """float64: the oracle is the stock model itself, so DESIGN.md's rule leaves only rounding: each tensor within
    1e-8 of its largest |value| (rounding through a whole network in training, where the BatchNorms' batch statistics
    amplify it, reaches ~1e-10 of it; one float32 rounding anywhere would show as ~1e-7) plus 1e-13 of the largest
    |gradient| (a gradient that is mathematically zero, as the bias gradient of a BatchNorm feeding a training-mode
    BatchNorm, holds only rounding residue, ~1e-14 of it); integers exactly."""
    assert fused.keys() == stock.keys()
    grads = [v for k, v in stock.items() if k.endswith(".grad") and v.numel()]
    scale = max((v.abs().max().item() for v in grads), default=0.0)
    for k, want in stock.items():
        atol = 1e-8 * want.abs().max().item() + 1e-13 * scale + 1e-14 if want.is_floating_point() else 0
        torch.testing.assert_close(fused[k], want, rtol=0, atol=atol, msg=lambda m, k=k: f"{what}{k}: {m}")


CL_CASES = [(b, t) for b in CPU_BACKENDS for t in (False, True) if not (b == "triton" and t)]  # interpreter: eval


@pytest.mark.parametrize("backend,train", CL_CASES, ids=[f"{b}-{'train' if t else 'eval'}" for b, t in CL_CASES])
def test_channels_last_model_and_input(backend, train):
    """model.to(memory_format=channels_last) with a channels_last input: logits, input and parameter gradients and
    BN buffers equal the stock model's (float64), and every gradient has the stock gradient's memory format."""
    stock, fused = (m.to(memory_format=torch.channels_last) for m in _pair(torch.float64))
    # 4 images: on 2 the head's BatchNorm1d is near-degenerate and amplifies rounding in the input gradient to ~1e-7
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    proj = torch.randn(4, 5, dtype=torch.float64)
    res_s, res_f = _run(stock, x, proj, train), _run(fused, x, proj, train, backend)
    _assert_float64_equal(res_f, res_s)
    for k, v in res_s.items():
        if v.dim() == 4:
            cl = v.is_contiguous(memory_format=torch.channels_last)
            assert res_f[k].is_contiguous(memory_format=torch.channels_last) == cl, k


# ---- 3. gradient checkpointing ----------------------------------------------------------------------------------

class _Checkpointed(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


def _checkpoint(model: nn.Module, paths: list[str]) -> nn.Module:
    for path in paths:
        parent, _, name = path.rpartition(".")
        parent = model.get_submodule(parent)
        setattr(parent, name, _Checkpointed(getattr(parent, name)))
    return model


def _regions(fused: nn.Module, granularity: str) -> list[str]:
    """The checkpointed regions. granularity "blocks": every block of the three stages (the stem and the head run
    normally); "fused": every outermost fused module on its own, so that each region ends with a fused op (the case
    that the default early stop of the recomputation trips on)."""
    if granularity == "blocks":
        return [f"{stage}.{i}" for stage in ("blocks1", "blocks2", "blocks3") for i in range(len(getattr(fused, stage)))]
    paths = []
    for name, m in fused.named_modules():
        if type(m).__module__.startswith("shvit_kernels.nn.") and not any(name.startswith(p + ".") for p in paths):
            paths.append(name)
    return paths


@pytest.mark.parametrize("granularity", ["blocks", "fused"])
def test_gradient_checkpointing(granularity):
    """torch.utils.checkpoint (non-reentrant, default early stop) over the fused blocks in training mode: logits and
    gradients equal the un-checkpointed fused model's and the checkpointed stock model's (float64). Recomputation
    re-runs each region's forward, so its training-mode BatchNorms update their running statistics twice with the
    same batch statistics, exactly as stock nn.BatchNorm2d does under checkpointing: r2 = (1-m) r1 + m s with
    r1 = (1-m) r0 + m s the single update, and num_batches_tracked = 2 inside the regions, 1 outside."""
    backend = "cpu" if "cpu" in CPU_BACKENDS else "auto"
    stock, fused = _pair(torch.float64)
    r0 = {k: v.clone() for k, v in bn_states(stock).items()}
    paths = _regions(fused, granularity)
    assert len(paths) >= 8, paths
    plain = copy.deepcopy(fused)
    ckpt_f, ckpt_s = _checkpoint(fused, paths), _checkpoint(stock, paths)
    x, proj = torch.randn(4, 3, 64, 64, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    res_p = _run(plain, x, proj, True, backend)
    res_f = _run(ckpt_f, x, proj, True, backend)
    res_s = _run(ckpt_s, x, proj, True)
    _assert_float64_equal(res_f, res_s, "checkpointed fused vs checkpointed stock: ")
    rename = {k.replace(".block.", "."): k for k in res_f}  # _Checkpointed adds a `block.` level to the names
    assert rename.keys() == res_p.keys()
    grads = {k: v for k, v in res_p.items() if "running" not in k and "num_batches" not in k}
    _assert_float64_equal({k: res_f[rename[k]] for k in grads}, grads, "checkpointed vs plain fused: ")
    twice = 0
    for k, r1 in bn_states(plain).items():
        inside = rename[k] != k
        if "num_batches" in k:
            assert res_f[rename[k]].item() == (2 if inside else 1), k
            twice += inside
        elif inside:
            bn = plain.get_submodule(k.rsplit(".", 1)[0])
            expect = (1 - bn.momentum) * r1 + (r1 - (1 - bn.momentum) * r0[k])  # one more update with the same s
            torch.testing.assert_close(res_f[rename[k]], expect, rtol=1e-12, atol=1e-14, msg=k)
        else:
            torch.testing.assert_close(res_f[rename[k]], r1, rtol=0, atol=0, msg=k)
    assert twice >= 8, "expected BatchNorms inside the checkpointed regions"


# ---- 4. CUDA graphs (GPU only) ------------------------------------------------------------------------------------

def _cuda_model() -> nn.Module:
    # channels_last=False: no forward pre-hook, which make_graphed_callables refuses (CUDA inputs skip it anyway)
    return sk.convert(_pair()[1], channels_last=False).cuda().eval()


@pytest.mark.gpu
def test_make_graphed_callables():
    """torch.cuda.make_graphed_callables on the converted model in eval mode (forward and backward captured):
    replays on new inputs give eager's outputs and gradients."""
    model = _cuda_model()
    eager = copy.deepcopy(model)
    sample = torch.randn(2, 3, 224, 224, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(model, (sample,), allow_unused_input=True)
    for _ in range(2):  # two different inputs through the same graph
        x, proj = torch.randn(2, 3, 224, 224, device="cuda"), torch.randn(2, 5, device="cuda")
        res = {}
        for name, m in (("graph", graphed), ("eager", eager)):
            m.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            y = m(xi)
            (y * proj).sum().backward()
            res[name] = {"y": y.detach().clone(), "x.grad": xi.grad.clone(),
                         **{n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}}
        assert res["graph"].keys() == res["eager"].keys()
        for k, v in res["eager"].items():
            torch.testing.assert_close(res["graph"][k], v, rtol=1e-4, atol=1e-5, msg=k)  # same kernels, fp32


@pytest.mark.gpu
def test_compile_reduce_overhead():
    """torch.compile(mode="reduce-overhead") (CUDA graphs through cudagraph trees) of the converted eval model:
    after warm-up and recording, replays on new inputs equal eager."""
    torch._dynamo.reset()
    model = _cuda_model()
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for step in range(4):  # warm-up, record, then replays
            x = torch.randn(2, 3, 224, 224, device="cuda")
            y = compiled(x).clone()  # replay outputs are overwritten by the next replay
            torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-5, msg=f"step {step}")


# ---- 5. variable input resolution --------------------------------------------------------------------------------

RES_CASES = [("auto", hw) for hw in RESOLUTIONS] + ([("triton", (224, 224))] if TRITON else [])


@pytest.mark.parametrize("backend,hw", RES_CASES, ids=[f"{b}-{h}x{w}" for b, (h, w) in RES_CASES])
def test_resolutions_match_stock(backend, hw):
    """The converted model runs at 224, 256, 384, 512 and 1333x800 (eval, batch 1; odd and non-square feature
    maps: 1333x800 gives 84x50, 42x25, 21x13) with features and logits equal to stock's (float64). The Triton
    interpreter runs 224 only (1333x800 takes ~25 s there); the launch configurations of all five are checked
    without running the kernels in test_triton_specialisations_are_bounded."""
    stock, fused = (m.eval() for m in _pair(torch.float64))
    x = torch.randn(1, 3, *hw, dtype=torch.float64)
    with torch.no_grad(), _backend(backend):
        got = {"features": fused.forward_features(x), "logits": fused(x)}
    with torch.no_grad():
        want = {"features": stock.forward_features(x), "logits": stock(x)}
    _assert_float64_equal(got, want)


# ---- Triton specialisations over resolutions ----------------------------------------------------------------------

SWEEP = range(7, 65)  # stage-1 feature maps H = W = 7..64, i.e. inputs 112..1024 px (stages 2, 3: /2, /4)
SATURATED = 48  # past this stage-1 size no compute kernel gets a new meta-parameter tuple (every tile at its cap)
REDUCTIONS = {"_welford_kernel", "_sum_kernel"}  # fixed-order sums of per-tile partials


@pytest.fixture(scope="module")
def launch_keys():
    """{input (H, W): {kernel: set of compile keys}}: the converted model (float32) in eval (batch 1) and training
    (batch 2, forward + backward) on the Triton launchers, at RESOLUTIONS and at every stage-1 size in SWEEP, with
    the kernels replaced by recorders (nothing is computed: the activations are garbage, the launch arguments exact).
    The SHSA and FFN launchers pick their GPU configuration (they size some tiles differently for the interpreter)."""
    if not TRITON:
        pytest.skip("Triton does not take CPU tensors here (no interpreter)")
    binders, seen = {}, {}

    def record(name, kernel, grid, args, kwargs):
        key = f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{name}"
        seen.setdefault(key, set()).add(triton_compile_key(binders, kernel, args, kwargs))

    model = sk.convert(_stock(), channels_last=False)  # as on a GPU: the CPU-only channels_last entry stays off
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # garbage activations: keep denormals from slowing the CPU parts down
    try:
        with pytest.MonkeyPatch.context() as mp, _backend("triton"):
            replace_triton_kernels(mp, record)
            size_launchers_for_gpu(mp)
            mp.setattr(ConvBN, "_runs_op", lambda self, x, train, gated: is_pointwise(self))  # as on CUDA
            for hw in RESOLUTIONS + [(16 * h, 16 * h) for h in SWEEP]:
                seen = {}
                with torch.no_grad():
                    model.eval()(torch.zeros(1, 3, *hw))
                model.train()(torch.zeros(2, 3, *hw)).sum().backward()
                out[hw] = seen
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    return out


def _meta(key: tuple) -> tuple:
    spec, options, is_constexpr = key
    return tuple(s for s, c in zip(spec, is_constexpr) if c), options


def _union(keys: dict, sizes, of=lambda k: k) -> dict:
    union = {}
    for hw in sizes:
        for kernel, ks in keys[hw].items():
            union.setdefault(kernel, set()).update(of(k) for k in ks)
    return union


@pytest.mark.skipif(triton is None, reason="triton is not installed")
def test_triton_kernels_are_plain_jit():
    """The compile key above is the whole story: no kernel is wrapped in @triton.autotune or @triton.heuristics
    (whose configs / keys would add variants)."""
    from shvit_kernels.triton import _common, _token_gemm, ffn, pw_conv_bn, shsa
    from shvit_kernels.triton import dwconv_bn as tdw
    from shvit_kernels.triton import sra as tsra

    kernels = {f"{mod.__name__}.{n}": o for mod in (tdw, shsa, ffn, _common, tsra, _token_gemm, pw_conv_bn)
               for n, o in vars(mod).items() if n.endswith("_kernel")}
    assert len(kernels) >= 28
    for name, obj in kernels.items():
        assert type(obj).__name__ in ("JITFunction", "InterpretedFunction"), f"{name} is a {type(obj).__name__}"


def test_triton_specialisations_are_bounded(launch_keys):
    """Every launch is keyed by its tl.constexpr values, the class of each int argument (1 / divisible by 16 /
    other), pointer dtypes and alignment, and num_warps. Over the five resolutions and every stage-1 size 7..64:
    - the only launch option is num_warps, itself a function of the meta-parameters;
    - pointers are always 16-byte aligned and every int argument stays an i32 (no i64 variants at these sizes): a
      size reaches the key only through its tiles (meta-parameters) and its ints' three-valued classes;
    - the meta-parameters (constexprs + num_warps) of the compute kernels saturate: no stage-1 size above
      SATURATED adds a tuple, nor does any of the five resolutions (1333x800 included). The partial-sum reductions
      size their block over the partials as the next power of two up to a cap (2048 / rows): one more tuple per
      doubling of the partial count (e.g. 1333x800's 17 token tiles at stage 2 against 64x64's 16);
    - no kernel has more than 48 meta-parameter tuples (_token_gemm._gemm_kernel has the most, 45: its prologue /
      epilogue pairs in both token tilings, flattened where N % 16 == 0 and per sample otherwise)."""
    five = _union(launch_keys, RESOLUTIONS)
    sweep = _union(launch_keys, [(16 * h, 16 * h) for h in SWEEP])
    assert five.keys() == sweep.keys() and len(sweep) >= 15, sorted(sweep)
    for kernel, ks in sweep.items():
        for spec, options, is_constexpr in ks | five[kernel]:
            assert [k for k, _ in options] == ["num_warps"], (kernel, options)
            for s, c in zip(spec, is_constexpr):
                if not c:
                    assert s in (("constexpr", 1), ("i32", "D"), ("i32", "")) or (s[0][0] == "*" and s[1] == "D") \
                        or s[0] == "fp64", (kernel, s)  # floats: tl.float64 (test_eps_fp64)
    meta_all = _union(launch_keys, [(16 * h, 16 * h) for h in SWEEP], _meta)
    meta_low = _union(launch_keys, [(16 * h, 16 * h) for h in SWEEP if h <= SATURATED], _meta)
    meta_five = _union(launch_keys, RESOLUTIONS, _meta)
    reductions = {k for k in meta_all if k.split(".")[1] in REDUCTIONS}
    assert len(reductions) == 2, reductions  # _common's, which every op uses
    for kernel in meta_all:
        both = meta_all[kernel] | meta_five[kernel]
        assert len(both) <= 48, (kernel, len(both))
        if kernel in reductions:
            blocks = {v for spec, options in both for _, v in spec if isinstance(v, int) and not isinstance(v, bool)}
            assert all(v & (v - 1) == 0 for v in blocks), (kernel, sorted(blocks))  # powers of two (and 0-free)
            continue
        assert meta_all[kernel] == meta_low[kernel], f"{kernel}: new meta-parameters past stage-1 size {SATURATED}"
        assert meta_five[kernel] <= meta_all[kernel], f"{kernel}: the five resolutions add meta-parameters"


@pytest.mark.xfail(strict=True, reason="ints are specialised on divisibility by 16 (Triton's default), so new sizes "
                                       "keep adding dwconv variants; see the README (Triton specialisation)")
def test_triton_full_keys_saturate(launch_keys):
    """The full compile keys (meta-parameters and int classes) would saturate like the meta-parameters if the
    size-derived ints were not specialised (triton.jit(do_not_specialize=...)). Strict: when that changes, this
    passes and fails the run, so that the README's counts are updated."""
    full_all = _union(launch_keys, [(16 * h, 16 * h) for h in SWEEP])
    full_low = _union(launch_keys, [(16 * h, 16 * h) for h in SWEEP if h <= SATURATED])
    assert all(full_all[k] == full_low[k] for k in full_all)
