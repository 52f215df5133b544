"""Triton kernels against their float64 reference specs, on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py
sets it, before anything imports triton, on a machine without a GPU), else on CUDA. Shapes are small: the
interpreter costs ~8 ms per program."""
import os


def triton_device() -> str:
    """The device the Triton tests run on; skips the calling module when triton is missing or cannot run."""
    import pytest
    import torch

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)
