"""Fixtures shared by the Triton kernel tests."""
import pytest


@pytest.fixture(params=["resident", "k-steps"])
def x_path(request, monkeypatch):
    """Both paths of the eval kernels that can keep x on chip (FFN forward, pw_conv_bn forward): x's whole tile
    resident for the program (fp16 / bf16 on a GPU, everything under the interpreter), or re-read in K steps
    (RESIDENT_X = 0: what GPU fp32 / fp64 and very wide inputs take)."""
    if request.param == "k-steps":
        from shvit_kernels.triton import _token_gemm

        monkeypatch.setattr(_token_gemm, "RESIDENT_X", 0)
    return request.param
