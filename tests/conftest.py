import os
import warnings

import pytest
import torch

# Without a GPU, Triton kernels run under its CPU interpreter (set before anything imports triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# "auto" must follow the fixed order in tests, whatever auto table this machine has recorded (tests that need a
# table point this variable at their own).
os.environ["SHVIT_KERNELS_AUTO_TABLE"] = os.path.join(os.path.dirname(__file__), "no-auto-table.json")

# The suite must pass with or without the compiled extension, whose absence warns once at import.
warnings.filterwarnings("ignore", message="C++ extension shvit_kernels._C not importable")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A fresh, reported seed per test: inputs are random, failures reproducible (SHVIT_TEST_SEED=...). Drawn from
    the OS, not from torch's generator, which a previous test or module fixture may have seeded to a constant."""
    seed = int(os.environ.get("SHVIT_TEST_SEED", int.from_bytes(os.urandom(4), "little") % (2**31 - 1)))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception):
        for name, value in item.user_properties:
            if name == "seed":
                print(f"\n[reproduce with SHVIT_TEST_SEED={value}]")


def pytest_runtest_logreport(report):
    """$SHVIT_TEST_FAILURE_LOG: each failure's id and traceback appended as it happens (one file per xdist worker),
    so a run cut short by a time limit still says what failed (gpu_suite.sh)."""
    path = os.environ.get("SHVIT_TEST_FAILURE_LOG")
    if path and report.failed:
        seed = dict(report.user_properties).get("seed")
        with open(f"{path}.{os.environ.get('PYTEST_XDIST_WORKER', 'main')}", "a") as f:
            f.write(f"==== {report.nodeid} ({report.when}, seed {seed})\n{report.longreprtext[-4000:]}\n")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
