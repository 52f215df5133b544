"""The backend registry: names, availability with reasons, env var, context manager, auto choice."""
import threading

import pytest
import torch

import shvit_kernels as sk
from shvit_kernels import backends


def test_reference_always_available_and_names_known():
    assert "reference" in sk.available_backends()
    assert set(backends.availability()) == {"reference", "cpu", "triton", "cuda"}
    for name, (ok, why) in backends.availability().items():
        assert why, f"{name} must say what it runs on or why it is unavailable"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with sk.use_backend("nope"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_unavailable_backend_says_why():
    with pytest.raises(sk.BackendUnavailableError, match="'cuda' is unavailable: no CUDA device"):
        with sk.use_backend("cuda"):
            pass


def test_context_manager_nests_and_restores():
    assert sk.current_backend() == "auto"
    with sk.use_backend("reference"):
        assert sk.current_backend() == "reference"
        with sk.use_backend("auto"):
            assert sk.current_backend() == "auto"
        assert sk.current_backend() == "reference"
    assert sk.current_backend() == "auto"


def test_env_var_sets_default(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert sk.current_backend() == "reference"
    x = torch.randn(2, 3, 4, 4)
    assert backends.kernel("dwconv_bn", x) is backends._kernels[("dwconv_bn", "reference")].resolve()
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="SHVIT_KERNELS_BACKEND"):
        sk.current_backend()


def test_setting_is_per_thread():
    seen = []
    with sk.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(sk.current_backend()))
        t.start()
        t.join()
    assert seen == ["auto"]


def test_auto_prefers_compiled_cpu_kernels_and_falls_back_by_dtype():
    cpu = torch.device("cpu")
    expected = "cpu" if "cpu" in sk.available_backends() else "reference"
    assert backends.choose("dwconv_bn", cpu, torch.float32)[0] == expected
    name, why = backends.choose("dwconv_bn", cpu, torch.float16)
    assert name == "reference" and ("float16" in why or "unavailable" in why)


def test_explicit_backend_without_kernel_for_op_raises():
    backends.register("_only_ref", "reference", object(), ("cpu",), (torch.float32,))
    with sk.use_backend("reference"):
        backends.choose("_only_ref", torch.device("cpu"), torch.float32)
    if "cpu" in sk.available_backends():
        with sk.use_backend("cpu"), pytest.raises(sk.BackendUnavailableError, match="no 'cpu' kernel"):
            backends.choose("_only_ref", torch.device("cpu"), torch.float32)
    with pytest.raises(sk.BackendUnavailableError, match="supports"):
        with sk.use_backend("reference"):
            backends.choose("_only_ref", torch.device("cpu"), torch.float64)


def test_lazy_module_implementation_is_imported_on_first_use():
    backends.register("_lazy", "reference", "shvit_kernels.reference.dwconv_bn", ("cpu",), (torch.float32,))
    impl = backends.kernel("_lazy", torch.zeros(1))
    assert impl.__name__ == "shvit_kernels.reference.dwconv_bn"
