"""Fixtures shared by the Triton kernel tests."""
import os

import pytest


class _Spy:
    """A Triton kernel that records the keyword arguments (constexprs) of each launch, then runs it."""

    def __init__(self, kernel, log: list):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append(kwargs)
            return launch(*args, **kwargs)
        return run


@pytest.fixture(params=["resident", "k-steps"])
def x_path(request, monkeypatch):
    """Both paths of the eval forwards that can keep x on chip (FFN, pw_conv_bn): x's whole tile resident for the
    program (fp16 / bf16 on a GPU, every dtype under the interpreter), or re-read in K steps (RESIDENT_X = 0: GPU
    fp32 / fp64 and very wide inputs). Training has one path: its k-steps twin is skipped. On teardown, checks that
    the eval forwards the test ran took the path it names (under the interpreter, where every dtype may)."""
    from shvit_kernels.triton import _token_gemm, ffn

    if request.param == "k-steps":
        if getattr(request.node, "callspec", None) and request.node.callspec.params.get("train"):
            pytest.skip("the training forward has no resident path")
        monkeypatch.setattr(_token_gemm, "RESIDENT_X", 0)
    ffn_fwd, pw_resident, pw_gemm = [], [], []
    monkeypatch.setattr(ffn, "_fused_fwd_kernel", _Spy(ffn._fused_fwd_kernel, ffn_fwd))
    monkeypatch.setattr(_token_gemm, "_resident_kernel", _Spy(_token_gemm._resident_kernel, pw_resident))
    monkeypatch.setattr(_token_gemm, "_gemm_kernel", _Spy(_token_gemm._gemm_kernel, pw_gemm))
    yield request.param
    resident = request.param == "resident"
    pw_eval = [k for k in pw_gemm if k["EPI"] in (4, 5)]  # _gemm_kernel as the eval pw_conv_bn forward
    if not resident:
        assert not pw_resident and not any(k["X_RESIDENT"] for k in ffn_fwd)
    elif os.environ.get("TRITON_INTERPRET") == "1":
        assert not pw_eval and all(k["X_RESIDENT"] for k in ffn_fwd)


@pytest.fixture(params=["flat", "per-sample"])
def token_tiles(request, monkeypatch):
    """Both tilings of the token GEMMs (_gemm_kernel, _wgrad_kernel): tiles of the flattened B*N tokens, which may
    span samples (FLAT_TOKENS, the default), or tiles within each sample. On teardown, checks that every launch the
    test made took the tiling it names; launches with the gate (PRO 3, EPI 6, PRO_R 3) always tile per sample."""
    from shvit_kernels.triton import _token_gemm

    monkeypatch.setattr(_token_gemm, "FLAT_TOKENS", request.param == "flat")
    gemm, wgrad = [], []
    monkeypatch.setattr(_token_gemm, "_gemm_kernel", _Spy(_token_gemm._gemm_kernel, gemm))
    monkeypatch.setattr(_token_gemm, "_wgrad_kernel", _Spy(_token_gemm._wgrad_kernel, wgrad))
    yield request.param
    gated = [k["PRO"] == 3 or k["EPI"] == 6 for k in gemm] + [k["PRO_R"] == 3 for k in wgrad]
    flat = [k["FLAT"] for k in gemm + wgrad]
    assert flat, "no token GEMM was launched"
    assert flat == [request.param == "flat" and not g for g in gated]
