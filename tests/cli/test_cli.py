"""`python -m shvit_kernels info | bench` run end to end in a subprocess (tiny sizes: the flags and the output
schema are under test here, not the speed)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from shvit_kernels.__main__ import main


def _run(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "shvit_kernels", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=True)


def test_info_lists_backends_and_auto_choices():
    out = _run("info").stdout
    for word in ("torch", "reference", "cpu", "triton", "cuda", "auto picks", "dwconv_bn", "shsa"):
        assert word in out


def test_bench_ops_and_models_table_json_markdown(tmp_path):
    path, md = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = _run("bench", "--device", "cpu", "--batch", "1", "--reps", "1", "--threads", "1", "--ops",
                "--models", "S1", "--resolution", "32", "--model-batch", "2", "--model-reps", "1", "--progress",
                "--json", str(path), "--markdown", str(md))
    out = proc.stdout
    for word in ("vs eager", "vs compile", "% roofline", "fused vs eager", "dispatch overhead", "cpu threads 1",
                 "ceilings measured now", "malloc "):
        assert word in out, word
    # the progress bar (tqdm or the plain one) goes to stderr and ends at jobs/jobs (tqdm may skip early updates)
    done = re.findall(r"\b(\d+)/(\d+)\b", proc.stderr)
    assert done and done[-1][0] == done[-1][1] != "0", proc.stderr[-300:]
    data = json.loads(path.read_text())
    assert data["threads"] == data["env"]["threads"] == data["ceilings"]["threads"] == 1
    assert {"device_name", "torch", "triton", "python", "date", "malloc"} <= set(data["env"])
    assert data["ceilings"]["bytes_per_s"] > 0 and data["ceilings"]["flops_per_s"] > 0
    assert data["errors"] == [] and data["skipped"] == []
    assert {(r["op"], r["mode"]) for r in data["results"]} == {
        (op, mode) for op in ("dwconv_bn", "ffn", "pw_conv_bn", "shsa", "sra")
        for mode in ("eval fwd", "train fwd+bwd")}
    for r in data["results"]:
        assert r["stock_ms"] > 0 and r["fused_ms"] > 0 and r["gflop"] > 0 and r["mbytes"] > 0
        assert r["fused_roofline_pct"] > 0 and r["bound"] in ("memory", "compute")
        assert r["max_err"] <= 2 * r["stock_err"] + 1e-5, r  # fp32 vs the float64 oracle
    runs = {(m["scenario"], m["variant"]): m for m in data["models"]}
    assert {s for s, _ in runs} == {"infer b1", "infer batch", "train step"}
    assert {v for _, v in runs} == {"eager", "timm", "fused"}  # compile variants only with --compile
    for (_, variant), m in runs.items():
        assert m["model"] == "S1" and m["resolution"] == 32 and m["batch"] == (1 if m["scenario"] == "infer b1" else 2)
        if variant != "timm":  # timm may be missing: then skipped, with the reason
            assert m["ms"] > 0 and m["flops_pct"] > 0 and m["gflop"] > 0, m
    text = md.read_text()
    assert "## Ops" in text and "## Models" in text and "ceilings" in text


def test_bench_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["bench", "--plot", str(tmp_path / "x.png")]) == 2  # before any benchmark runs
    err = capsys.readouterr().err
    assert "matplotlib" in err and "shvit_kernels[plot]" in err
    assert not (tmp_path / "x.png").exists()


def test_bench_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "speedups.png"
    _run("bench", "--device", "cpu", "--ops", "shsa", "--mode", "eval fwd", "--batch", "1", "--reps", "1",
         "--threads", "1", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fresh_process_child_times_one_implementation():
    """benchmarks/fresh_process.py: one measurement in its own process prints its median ms as JSON."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for kind, name, mode, impl in (("op", "shsa", "eval fwd", "fused"), ("op", "dwconv_bn", "train fwd+bwd", "eager"),
                                   ("model", "S1", "infer batch", "fused")):
        out = subprocess.run([sys.executable, "-m", "benchmarks.fresh_process", "--child", kind, name, mode, impl,
                              "--threads", "1", "--batch", "1", "--model-batch", "1", "--reps", "2", "--warmup", "1",
                              "--rounds", "1"], capture_output=True, text=True, env=env, timeout=600, check=True)
        assert json.loads(out.stdout.strip().splitlines()[-1])["ms"] > 0


def test_fresh_process_table_takes_medians_and_ratios(monkeypatch, tmp_path, capsys):
    from benchmarks import fresh_process

    times = iter([4.0, 3.0, 2.0, 40.0, 30.0, 20.0, 5.0, 3.0, 1.0])  # rounds of (eager, compile, fused)
    monkeypatch.setattr(fresh_process, "measure", lambda *a: next(times))
    md = tmp_path / "fresh.md"
    monkeypatch.setattr(sys, "argv", ["fresh_process", "--ops", "shsa", "--rounds", "3", "--markdown", str(md)])
    assert fresh_process.main() == 0
    row = next(line for line in md.read_text().splitlines() if line.startswith("| shsa"))
    # medians: eager 5, compile 3, fused 2
    assert row == "| shsa | eval fwd | 5.000 | 3.000 | 2.000 | 2.50x | 1.50x |", row


def test_gpu_profile_reports_each_implementation(tmp_path):
    """benchmarks.gpu_profile on the CPU (its GPU report has the same rows): stock and the fused module per mode,
    each with its time and the ops that took it."""
    from benchmarks import gpu_profile

    out = tmp_path / "profile.md"
    gpu_profile.main(["--device", "cpu", "--dtype", "float32", "--batch", "1", "--ops", "dwconv_bn", "--calls", "2",
                      "--top", "3", "--markdown", str(out)])
    text = out.read_text()
    for mode in ("eval fwd", "train fwd+bwd"):
        for impl in ("stock", "fused auto"):
            assert f"| {mode} | {impl}: wall " in text
    assert "dwconv_bn" in text and "ms  x" in text


def test_host_overhead_reports_every_layer(capsys):
    """benchmarks.host_overhead on the CPU: a positive per-call time for each layer of the SHSA call stack."""
    from benchmarks import host_overhead

    rows = host_overhead.measure(torch.device("cpu"), "auto", calls=5, repeats=2)
    assert list(rows) == ["backend", "dispatcher", "op", "op, no fast path", "module", "op+grad"]
    assert all(us > 0 for us in rows.values())
    assert host_overhead.main(["--calls", "3", "--repeats", "1"]) == 0
    assert "module" in capsys.readouterr().out


def test_gpu_tune_knobs_are_bound():
    """Every constant gpu_tune sweeps is bound by a Triton module; a mode with its own kernels has its own grid."""
    from benchmarks import gpu_tune

    pytest.importorskip("triton")
    for key in gpu_tune.KNOBS:
        op, _, mode = key.partition(" ")
        mode = mode or "train fwd+bwd"  # no mode of its own there
        assert set(gpu_tune.defaults(op, mode)) == set(gpu_tune.knobs(op, mode)) == set(gpu_tune.KNOBS[key])
    assert "_EVAL_BLOCK_V" in gpu_tune.knobs("shsa", "eval fwd", (256, 336, 8, 8))
    assert gpu_tune.knobs("shsa", "eval fwd", (8, 336, 42, 25)) is gpu_tune.KNOBS["shsa"]  # the launch path
    assert gpu_tune.knobs("shsa", "train fwd+bwd") is gpu_tune.KNOBS["shsa"]


def test_gpu_tune_sweeps_restores_and_reports(tmp_path, monkeypatch):
    """benchmarks.gpu_tune on the CPU (Triton under the interpreter), on a tiny depthwise case: every setting of the
    grid is checked and timed (the module's default marked), a setting that cannot compile is reported instead, and
    the constants are back to their defaults afterwards."""
    import shvit_kernels as sk
    from benchmarks import gpu_tune
    from shvit_kernels import bench
    from shvit_kernels.reference import residual_dwconv
    from shvit_kernels.roofline import dwconv_bn_cost
    from shvit_kernels.triton import dwconv_bn

    if "triton" not in sk.available_backends():
        pytest.skip("triton unavailable")
    tiny = bench.Case("dwconv_bn", "1x8x5x5 k3", lambda: residual_dwconv(8), (1, 8, 5, 5),
                      lambda e: dwconv_bn_cost(1, 8, 5, 5, 3, 1, e))
    monkeypatch.setattr(bench, "cases", lambda batch: [tiny])
    monkeypatch.setitem(gpu_tune.KNOBS, "dwconv_bn", {"_TILE": [0, 256]})  # 0: no tile, cannot run
    tile = dwconv_bn._TILE
    out = tmp_path / "tune.md"
    gpu_tune.main(["--device", "cpu", "--dtype", "float32", "--batch", "1", "--mode", "eval fwd", "--markdown",
                   str(out)])
    text = out.read_text()
    assert dwconv_bn._TILE == tile
    assert f"_TILE={tile} (default): " in text and "_TILE=256: " in text and "% roofline" in text
    assert "_TILE=0: not timed, " in text
    assert "eval fwd: best _TILE=" in text
    with pytest.raises(KeyError, match="_NO_SUCH_TILE"), gpu_tune.setting({"_NO_SUCH_TILE": 1}):
        pass
