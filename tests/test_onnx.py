"""ONNX export: by default standard ONNX operators only, run by onnxruntime with PyTorch's outputs; custom_ops=True
keeps the fused ops as `shvit` domain nodes."""
import copy

import pytest
import torch

import shvit_kernels as sk
from shvit_kernels.models import shvit_s1
from shvit_kernels.models.shvit import SHViT
from tests.helpers import randomize_bn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


def _tiny(fused: bool = True) -> torch.nn.Module:
    model = SHViT(num_classes=5, embed_dim=(16, 24, 32), partial_dim=(8, 8, 12), qk_dim=(4, 4, 4), depth=(1, 1, 1),
                  types=("i", "s", "s"))
    randomize_bn(model)
    return sk.convert(model) if fused else model


def _run_ort(path, x: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _domains(path) -> set[str]:
    return {n.domain or "ai.onnx" for n in onnx.load(str(path)).graph.node}


def test_folded_shvit_s1_runs_in_onnxruntime(tmp_path):
    model = sk.convert(randomize_bn(shvit_s1(num_classes=10, fused=False)), inference=True)
    path = tmp_path / "s1.onnx"
    sk.export_onnx(model, torch.randn(2, 3, 64, 64), path, dynamic_batch=True)
    assert _domains(path) == {"ai.onnx"} and not (tmp_path / "s1.onnx.data").exists()
    x = torch.randn(3, 3, 64, 64)  # another batch size than the example's: the batch dim is dynamic
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(_run_ort(path, x), expected, rtol=1e-4, atol=1e-4)
    # the fused ops are back after export
    assert "forward" not in model.blocks2[3].mixer.m.__dict__


def test_fused_eval_model_runs_in_onnxruntime(tmp_path):
    model = _tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    sk.export_onnx(model, x, tmp_path / "m.onnx")
    assert _domains(tmp_path / "m.onnx") == {"ai.onnx"}
    with torch.no_grad():
        torch.testing.assert_close(_run_ort(tmp_path / "m.onnx", x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("inference", [False, True])
def test_custom_ops_keep_the_shvit_domain(tmp_path, inference):
    model = _tiny()
    model = sk.convert(model, inference=True) if inference else model.eval()
    path = tmp_path / "c.onnx"
    sk.export_onnx(model, torch.randn(2, 3, 64, 64), path, custom_ops=True)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)  # the shvit schemas are registered by the exporter
    ours = sorted(n.op_type for n in proto.graph.node if n.domain == "shvit")
    # 7 residual depthwise, 2 PatchMerging (+ their gated conv3), 7 residual FFN, 2 SHSA
    assert ours == ["dwconv_bn"] * (7 + 2) + ["ffn"] * 7 + ["pw_conv_bn"] * 2 + ["shsa"] * 2
    assert {o.domain: o.version for o in proto.opset_import}["shvit"] == 1


def test_training_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="eval"):
        sk.export_onnx(_tiny().train(), torch.randn(2, 3, 64, 64), tmp_path / "t.onnx")


def test_reference_math_restores_forward_on_error():
    model = _tiny().eval()
    with pytest.raises(RuntimeError, match="boom"), sk.reference_math(model) as m:
        assert "forward" in m.blocks2[3].mixer.__dict__
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        with sk.reference_math(copy.deepcopy(model)) as ref:
            torch.testing.assert_close(ref(x), model(x), rtol=1e-4, atol=1e-5)
