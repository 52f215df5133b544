#!/usr/bin/env bash
# Installs what the project and its tests need, without ever pulling CUDA wheels on a CPU machine:
# torch is pinned to the CPU build first, and timm / torchvision come without their (torch-pulling) deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
$PIP "torch==${SHVIT_TORCH_VERSION:-2.13.0}"
$PIP ninja "triton>=3.6" pytest hypothesis pytest-benchmark numpy pillow pyyaml huggingface_hub safetensors expecttest \
    onnx onnxscript onnxruntime
$PIP --no-deps "timm>=1.0.16" "torchvision==${SHVIT_TORCHVISION_VERSION:-0.28.0}"
$PIP --no-build-isolation -e ".[test]"
