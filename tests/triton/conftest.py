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
    """Both tilings of the token GEMMs: tiles of the flattened B*N tokens, which may span samples (FLAT_TOKENS = 1;
    by default only where N % 16 == 0), or tiles within each sample (0). On teardown, checks that every such launch
    the test made took the tiling it names; the launches with pw_conv_bn's gate (PRO 3, EPI 6, PRO_R 3) and SHSA's
    qkv weight grad (RIGHT_U False) always tile per sample."""
    from shvit_kernels.triton import _common, _token_gemm, ffn, shsa

    monkeypatch.setattr(_common, "FLAT_TOKENS", 1 if request.param == "flat" else 0)
    log = []
    for module, name in ((_token_gemm, "_gemm_kernel"), (_token_gemm, "_wgrad_kernel"), (ffn, "_fused_bwd_kernel"),
                         (shsa, "_proj_kernel"), (shsa, "_proj_bwd_kernel"), (shsa, "_wgrad_kernel")):
        monkeypatch.setattr(module, name, _Spy(getattr(module, name), log))
    yield request.param
    assert log, "no token GEMM was launched"
    for k in log:
        per_sample = k.get("PRO") == 3 or k.get("EPI") == 6 or k.get("PRO_R") == 3 or k.get("RIGHT_U") is False
        assert k["FLAT"] == (request.param == "flat" and not per_sample), k
