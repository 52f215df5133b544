"""ONNX export of models holding shvit_kernels modules.

By default every fused module runs its stock-PyTorch math while the exporter traces (`reference_math`), so the
file holds standard ONNX operators only and runs in onnxruntime or any other ONNX runtime. `custom_ops=True`
keeps the fused ops as nodes of an `shvit` domain (version 1) instead: a runtime needs kernels for them.
"""
from __future__ import annotations

import contextlib
import os
import types
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .nn import SHSA, SRA, FusedPatchMerging, ResidualDWConvBN, ResidualFFN, ResidualSHSA
from .reference import SHSA as StockSHSA
from .reference import SRA as StockSRA
from .reference import Residual

DOMAIN = "shvit"


def _patch_merging_reference(self: FusedPatchMerging, x: torch.Tensor) -> torch.Tensor:
    act = getattr(self, self._act1)  # official: one shared `act`; timm: act1 / act2, both plain ReLUs
    return self.conv3(self.se(act(self.conv2(act(self.conv1(x))))))


# The stock math of the training-capable fused modules (the folded ones carry theirs as `reference_forward`).
_REFERENCE = ((ResidualSHSA, Residual.forward), (ResidualDWConvBN, Residual.forward), (SHSA, StockSHSA.forward),
              (FusedPatchMerging, _patch_merging_reference), (SRA, StockSRA.forward), (ResidualFFN, Residual.forward))


def _reference_forward(m: nn.Module):
    fn = getattr(type(m), "reference_forward", None)
    if fn is None:
        fn = next((f for cls, f in _REFERENCE if isinstance(m, cls)), None)
    return fn


@contextlib.contextmanager
def reference_math(model: nn.Module, only: tuple[type, ...] = (nn.Module,)) -> Iterator[nn.Module]:
    """Within the block, every fused module of `model` (of the types `only`) runs the same math in stock
    PyTorch ops (no `shvit::*` custom op is called), so tracers and exporters see only standard ops.

    Swaps the instances' `forward`; the originals come back on exit, also on error.
    """
    swapped = []
    try:
        for m in model.modules():
            fn = _reference_forward(m)
            if fn is not None and isinstance(m, only):
                swapped.append((m, m.__dict__.get("forward")))
                m.forward = types.MethodType(fn, m)
        yield model
    finally:
        for m, old in swapped:
            if old is None:
                del m.forward
            else:
                m.forward = old


def _register_schemas() -> None:
    """ONNX schemas of the `shvit` domain's nodes, so the exporter (onnxscript) can build them."""
    import onnx
    from onnx.defs import OpSchema

    a = OpSchema.AttrType
    nodes = {
        "dwconv_bn": (["x", "weight", "bias"], [("stride", a.INT), ("relu", a.INT)],
                      "[relu](depthwise conv2d(x, weight, padding k//2, stride) + bias); BN folded"),
        "shsa": (["x", "gn_weight", "gn_bias", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias"],
                 [("gn_eps", a.FLOAT), ("qk_dim", a.INT), ("residual", a.INT)],
                 "SHViT single-head attention, BNs folded (shvit_kernels.ops.shsa)"),
        "ffn": (["x", "pw1_weight", "pw1_bias", "pw2_weight", "pw2_bias"], [],
                "x + pw2_weight relu(pw1_weight x + pw1_bias) + pw2_bias over tokens; BNs folded (ops.ffn)"),
        "pw_conv_bn": (["x", "weight", "bias", "gate?"], [("relu", a.INT)],
                       "[relu](weight (gate * x) + bias) over tokens, gate (B, C) optional; BN folded "
                       "(ops.pw_conv_bn: PatchMerging's conv3 with its SqueezeExcite gate)"),
    }
    optional = OpSchema.FormalParameterOption.Optional

    def param(n: str) -> OpSchema.FormalParameter:
        if n.endswith("?"):
            return OpSchema.FormalParameter(n[:-1], "T", param_option=optional)
        return OpSchema.FormalParameter(n, "T")

    for name, (inputs, attrs, doc) in nodes.items():
        if onnx.defs.has(name, DOMAIN):
            continue
        onnx.defs.register_schema(OpSchema(
            name, DOMAIN, 1, doc=doc, inputs=[param(n) for n in inputs],
            outputs=[OpSchema.FormalParameter("y", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"],
                               "float tensors")],
            attributes=[OpSchema.Attribute(n, t, "") for n, t in attrs]))


def _translation_table() -> dict:
    """torch op -> onnxscript function emitting the `shvit` domain node (ONNX has no bool attributes: ints)."""
    import onnxscript

    _register_schemas()
    shvit = onnxscript.values.Opset(DOMAIN, 1)

    def dwconv_bn(x, weight, bias, stride: int, relu: bool):
        return shvit.dwconv_bn(x, weight, bias, stride=stride, relu=int(relu))

    def shsa(x, gn_w, gn_b, gn_eps: float, qkv_w, qkv_b, proj_w, proj_b, qk_dim: int, residual: bool):
        return shvit.shsa(x, gn_w, gn_b, qkv_w, qkv_b, proj_w, proj_b, gn_eps=gn_eps, qk_dim=qk_dim,
                          residual=int(residual))

    def ffn(x, w1, b1, w2, b2):
        return shvit.ffn(x, w1, b1, w2, b2)

    def pw_conv_bn(x, weight, bias, gate, relu: bool):
        if gate is None:
            return shvit.pw_conv_bn(x, weight, bias, relu=int(relu))
        return shvit.pw_conv_bn(x, weight, bias, gate, relu=int(relu))

    return {torch.ops.shvit.dwconv_bn.default: dwconv_bn, torch.ops.shvit.shsa.default: shsa,
            torch.ops.shvit.ffn.default: ffn, torch.ops.shvit.pw_conv_bn.default: pw_conv_bn}


def export_onnx(model: nn.Module, example: torch.Tensor | tuple, path: str | os.PathLike, *,
                custom_ops: bool = False, dynamic_batch: bool = False, **kwargs):
    """Export an eval-mode model (best: `convert(model, inference=True)`) to an ONNX file at `path`.

    custom_ops=False (default): standard ONNX operators only (runs in onnxruntime). custom_ops=True: the fused
    eval ops become `shvit.dwconv_bn` / `shvit.shsa` / `shvit.ffn` / `shvit.pw_conv_bn` nodes (domain "shvit",
    version 1; SRA is always decomposed). dynamic_batch makes dim 0 of every input symbolic. Other keyword arguments go to
    `torch.onnx.export` (dynamo exporter); weights are stored inside the file unless `external_data=True`.
    Needs the `onnx` and `onnxscript` packages. Returns torch's ONNXProgram.
    """
    if any(m.training for m in model.modules()):
        raise ValueError("export_onnx exports inference graphs: call model.eval() (or convert(model, "
                         "inference=True)) first; training-mode BatchNorm has no ONNX form here")
    args = example if isinstance(example, tuple) else (example,)
    if dynamic_batch:
        kwargs.setdefault("dynamic_shapes", tuple({0: torch.export.Dim.DYNAMIC} for _ in args))
    kwargs.setdefault("external_data", False)
    kwargs.setdefault("verbose", False)
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own pytree use in the exporter warns about a deprecated LeafSpec check: noise for users
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        if custom_ops:  # the SRA ops have no `shvit` node schema: decomposed either way
            with reference_math(model, only=(SRA,)):
                return torch.onnx.export(model, args, path, custom_translation_table=_translation_table(),
                                         **kwargs)
        with reference_math(model):
            return torch.onnx.export(model, args, path, **kwargs)
