"""Triton kernels against their float64 reference specs, on CPU tensors under TRITON_INTERPRET=1 (set here, before
any test module imports triton), or on CUDA when the variable is 0 and a GPU is present. Shapes are small: the
interpreter costs ~8 ms per program."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def triton_device() -> str:
    """The device the Triton tests run on; skips the calling module when triton is missing or cannot run."""
    import pytest
    import torch

    pytest.importorskip("triton")
    if os.environ["TRITON_INTERPRET"] == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)
