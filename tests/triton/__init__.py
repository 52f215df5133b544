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


def gpu_dims(b: int, c: int, hw: int, hidden: int, dtype):
    """The token GEMMs' sizes of a (b, c, hw, hw) input as a CUDA tensor gives them (meta device: sizing only)."""
    import torch

    from shvit_kernels.triton import _token_gemm

    dm = _token_gemm._Dims(torch.empty(b, c, hw, hw, dtype=dtype, device="meta"), hidden)
    dm.gpu, dm.fma = True, dtype in (torch.float32, torch.float64)  # as _Shape sets them for a CUDA tensor
    return dm
