"""`python -m shvit_kernels info | bench` run end to end in a subprocess."""
import json
import os
import subprocess
import sys


def _run(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "shvit_kernels", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=True).stdout


def test_info_lists_backends_and_auto_choices():
    out = _run("info")
    for word in ("torch", "reference", "cpu", "triton", "cuda", "auto picks", "dwconv_bn", "shsa"):
        assert word in out


def test_bench_prints_table_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    out = _run("bench", "--batch", "2", "--reps", "2", "--json", str(path))
    assert "speedup" in out and "dispatch overhead" in out
    data = json.loads(path.read_text())
    ops = {(r["op"], r["mode"]) for r in data["results"]}
    assert ops == {("dwconv_bn", "eval fwd"), ("dwconv_bn", "train fwd+bwd"), ("shsa", "eval fwd"),
                   ("shsa", "train fwd+bwd")}
    for r in data["results"]:
        assert r["stock_ms"] > 0 and r["fused_ms"] > 0
        assert r["max_err"] <= 2 * r["stock_err"] + 1e-5, r  # fp32 vs the float64 oracle
