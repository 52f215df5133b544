""""auto" picks per op and input size from the measured table (shvit_kernels/autotable.py)."""
import json
import subprocess
import sys

import pytest
import torch

from shvit_kernels import autotable, backends, ops, use_backend
from shvit_kernels.reference import dwconv_bn as ref_dwconv

CPU = torch.device("cpu")


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "auto.json"
    monkeypatch.setenv("SHVIT_KERNELS_AUTO_TABLE", str(path))
    backends.reset_choices()
    yield path
    backends.reset_choices()


def _x(b):
    return torch.randn(b, 8, 6, 6)


def test_no_table_keeps_the_fixed_order(table):
    assert not table.exists()
    assert backends.choose("dwconv_bn", CPU, torch.float32, _x(2).numel()) == ("cpu", "first available in auto order")


def test_measured_fastest_wins_per_size(table):
    small, big = _x(1), _x(64)  # 288 and 18432 elements: buckets 8 and 14, more than NEAREST apart
    autotable.record("dwconv_bn", CPU, torch.float32, small.numel(), {"cpu": 2.0, "reference": 1.0}, "small")
    autotable.record("dwconv_bn", CPU, torch.float32, big.numel(), {"cpu": 1.0, "reference": 3.0}, "big")
    name, why = backends.choose("dwconv_bn", CPU, torch.float32, small.numel())
    assert name == "reference" and "measured fastest" in why and "reference 1 ms" in why
    assert backends.choose("dwconv_bn", CPU, torch.float32, big.numel())[0] == "cpu"
    # sizes within a factor of 4 use the nearest measurement; far away ones, the fixed order
    assert backends.choose("dwconv_bn", CPU, torch.float32, 2 * small.numel())[0] == "reference"
    assert backends.choose("dwconv_bn", CPU, torch.float32, 1 << 30)[1] == "first available in auto order"
    # the per-call dispatch follows the table: kernel() returns the chosen backend's implementation
    assert backends.kernel("dwconv_bn", small) is ref_dwconv
    assert backends.kernel("dwconv_bn", big) is not ref_dwconv
    # and an explicit use_backend still overrides it
    with use_backend("cpu"):
        assert backends.kernel("dwconv_bn", small) is not ref_dwconv
    # the op gives the same numbers whichever backend the table picks
    w, bias = torch.randn(8, 1, 3, 3), torch.randn(8)
    torch.testing.assert_close(ops.dwconv_bn(small, w, bias, 1, False), ref_dwconv.fwd(small, w, bias, 1, False))


def test_unrunnable_backends_in_the_table_are_skipped(table):
    x = _x(2)
    autotable.record("shsa", CPU, torch.float32, x.numel(), {"cuda": 0.1, "triton": 0.2, "reference": 5.0, "cpu": 1.0},
                     "s")
    assert backends.choose("shsa", CPU, torch.float32, x.numel())[0] == "cpu"  # cuda/triton cannot run here
    autotable.record("shsa", CPU, torch.float32, x.numel(), {"cuda": 0.1}, "s")
    assert backends.choose("shsa", CPU, torch.float32, x.numel())[1] == "first available in auto order"


def test_other_devices_and_schemas(table):
    x = _x(2)
    data = {"schema": autotable.SCHEMA, "entries": {
        f"NVIDIA H100|dwconv_bn|float32|{autotable.bucket(x.numel())}": {"ms": {"reference": 0.1}, "shape": "s"}}}
    table.write_text(json.dumps(data))
    assert backends.choose("dwconv_bn", CPU, torch.float32, x.numel())[0] == "cpu"  # another device's entry
    table.write_text(json.dumps({"schema": 0, "entries": {}}))
    with pytest.raises(ValueError, match="schema"):
        autotable.entries()


def test_cli_records_and_info_reports(table):
    run = [sys.executable, "-m", "shvit_kernels"]
    args = ["bench", "--record-auto", "--device", "cpu", "--ops", "dwconv_bn", "--batch", "1", "--reps", "2"]
    out = subprocess.run(run + args, capture_output=True, text=True, check=True).stdout
    assert "dwconv_bn" in out and "cpu" in out
    entries = json.loads(table.read_text())["entries"]
    (key, entry), = entries.items()
    assert key.startswith(autotable.device_name(CPU) + "|dwconv_bn|float32|")
    assert set(entry["ms"]) == set(backends.runnable("dwconv_bn", CPU, torch.float32)) and all(
        t > 0 for t in entry["ms"].values())
    info = subprocess.run(run + ["info"], capture_output=True, text=True, check=True).stdout
    assert "auto table" in info and "measured fastest" in info
