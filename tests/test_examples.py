"""Smoke-run every example script in python/ at tiny size: they are what users start from."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}


def _run(cmd, tmp_path):
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_convert_timm(tmp_path):
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    out = _run([sys.executable, str(ROOT / "python/convert_timm.py"), "--batch", "1", "--size", "64"], tmp_path)
    assert "max |stock - fused|" in out


def test_train_amp(tmp_path):
    out = _run([sys.executable, str(ROOT / "python/train_amp.py"), "--steps", "2", "--batch", "4", "--size", "64"],
               tmp_path)
    assert out.count("loss") == 2


def test_export(tmp_path):
    out = _run([sys.executable, str(ROOT / "python/export.py"), "--size", "64", "--out", "m.pt2"], tmp_path)
    assert "shvit.shsa" in out and (tmp_path / "m.pt2").exists()


def test_export_onnx(tmp_path):
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(mod)
    out = _run([sys.executable, str(ROOT / "python/export.py"), "--size", "64", "--onnx", "m.onnx"], tmp_path)
    assert "max |onnxruntime - eager|" in out and (tmp_path / "m.onnx").exists()


def test_measure_speed(tmp_path):
    env_json = tmp_path / "b.json"
    ENV["SHVIT_BENCH_JSON"] = str(env_json)
    out = _run(["bash", str(ROOT / "python/measure_speed.sh"), "--batch", "1", "--reps", "1", "--ops", "dwconv_bn"],
               tmp_path)
    assert "vs eager" in out and env_json.exists()
