#!/usr/bin/env bash
# Everything that needs a GPU, in one command: build with the CUDA kernels, the GPU tests, compute-sanitizer, the
# benchmarks. Writes benchmarks/results/<gpu>-<date>.{json,md,png} (CLI: ops and models, GPU name, driver,
# torch/triton versions) and <gpu>-<date>-pytest.json (pytest-benchmark), plus logs/, under $OUT when it is set.
#
#   bash benchmarks/gpu_suite.sh       # all stages: build test suite sanitize auto bench profile tune pytest-bench
#   bash benchmarks/gpu_suite.sh build test sanitize    # or any of them, in the order given
#
# Stages: build (pip install -e . with the CUDA kernels), test (the `gpu`-marked tests), suite (the whole test suite
# on the GPU, where every Triton test runs compiled instead of interpreted; pytest-xdist), sanitize
# (compute-sanitizer), auto (auto's measured table), bench (ops and models), profile (each op case kernel by kernel,
# benchmarks/gpu_profile.py), tune (the Triton launchers' tile constants swept per op, benchmarks/gpu_tune.py),
# pytest-bench.
# About 25 minutes of device time in all. Where one command may run at most 10 minutes (the lent machines), run it
# as several calls, each within SUITE_BUDGET_S; a fresh machine needs `build` again (about a minute on 16 cores; the
# built extension is larger than such a machine returns).
# Tunables: PYTHON (default python3), MAX_JOBS (ninja jobs), BENCH_BUDGET_S (the bench stage starts no case after
# this many seconds; default 420, which leaves room for one max-autotune compile that started just before),
# STAGE_TIMEOUT_S (per stage, default 590), SUITE_BUDGET_S (no stage runs past this many seconds from the start;
# default 3600), SUITE_WORKERS (pytest-xdist workers of the suite stage; default: cores - 2).
# Under $OUT (the lent machines return at most 8 files, 2 folders deep), results and logs are packed into
# $OUT/gpu_suite.tgz at the end.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
py="${PYTHON:-python3}"
results="${OUT:+$OUT/}benchmarks/results"
[[ "$results" = /* ]] || results="$root/$results"
logs="$results/logs"
mkdir -p "$logs"
stage_timeout="${STAGE_TIMEOUT_S:-590}"
suite_budget="${SUITE_BUDGET_S:-3600}"

pack() {  # results and logs into one file under $OUT, which returns few files and no deep folders
  [[ -n "${OUT:-}" && -d "$OUT/benchmarks" ]] || return 0
  tar czf "$OUT/gpu_suite.tgz" -C "$OUT" benchmarks && rm -rf "$OUT/benchmarks"
}
trap pack EXIT

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite: no CUDA device visible to $py (torch.cuda.is_available() is False)" >&2
  exit 2
fi
gpu="$("$py" -c "import torch; print(torch.cuda.get_device_name(0))" | tr -c 'A-Za-z0-9._\n-' '-' | tr -s '-')"
stem="$results/${gpu}-$(date -u +%Y-%m-%d)"

summary=()  # "stage: rc, seconds" in the order run
failed=0

# run_stage NAME CMD...: run with a time limit, the full output in logs/NAME.log, its tail on the console.
run_stage() {
  local name="$1"; shift
  local log="$logs/$name.log" start=$SECONDS rc limit=$((suite_budget - SECONDS))
  (( limit > stage_timeout )) && limit=$stage_timeout
  if (( limit < 20 )); then
    summary+=("$name: not run, the suite's ${suite_budget} s budget is spent")
    echo "== $name: not run (budget spent)"
    return 124
  fi
  echo "== $name: $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$log" 2>&1
  rc=$?
  summary+=("$name: rc $rc, $((SECONDS - start)) s")
  if (( rc != 0 )); then
    failed=1
    echo "-- $name failed (rc $rc$( ((rc == 124)) && echo ": timed out after ${limit} s")); last lines of $log:"
    tail -n 30 "$log"
  else
    tail -n 3 "$log"
  fi
  return "$rc"
}

cuda_backends() {  # the fused backends to time on this GPU: triton, and cuda when the build has its kernels
  "$py" -c "import shvit_kernels as sk; print(' '.join(b for b in ('triton', 'cuda') if b in sk.available_backends()) or 'auto')"
}

stage_build() {
  # --no-deps: torch is the image's, and the lent machines reach no package index.
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-16}" \
    run_stage build "$py" -m pip install --no-build-isolation --no-deps -e . || return
  "$py" -m shvit_kernels info | tee -a "$logs/build.log"
  if [[ " $(cuda_backends) " != *" cuda "* ]]; then
    echo "-- build: the extension has no CUDA kernels (see $logs/build.log)"
    failed=1
    return 1
  fi
}

stage_test() {
  run_stage test "$py" -m pytest -m gpu -q -p no:cacheprovider -rs
}

stage_suite() {
  # The whole suite: on a GPU the Triton tests run their kernels compiled. The sm_90 AOT compile check is what CPU
  # machines run instead. Few threads per worker: the workers share the cores. The GPU-heavy folders go first, so a
  # stage cut short by its time limit has run those; each failure is logged as it happens (tests/conftest.py).
  local workers="${SUITE_WORKERS:-$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))}"
  OMP_NUM_THREADS=2 SHVIT_TEST_FAILURE_LOG="$logs/suite-failures" run_stage suite "$py" -m pytest -q \
    -p no:cacheprovider -rfE -n "$workers" --deselect tests/triton/test_sm90_compile.py \
    tests/gpu tests/triton tests/ops tests/nn tests/integration tests/reliability tests
}

stage_sanitize() {
  if [[ -f tests/gpu/sanitize.sh ]]; then
    run_stage sanitize bash tests/gpu/sanitize.sh
  else
    echo "== sanitize: tests/gpu/sanitize.sh not present, skipped"
  fi
}

stage_auto() {
  # auto's measured table for this GPU (every backend per op, dtype and size), kept with the results; copy it to
  # ~/.cache/shvit_kernels/auto_table.json (or point $SHVIT_KERNELS_AUTO_TABLE at it) to make "auto" use it.
  local dtype
  for dtype in bfloat16 float16 float32; do
    SHVIT_KERNELS_AUTO_TABLE="$stem-auto.json" run_stage "auto-$dtype" "$py" -m shvit_kernels bench --record-auto \
      --device cuda --dtype "$dtype" --batch 256
  done
}

stage_bench() {
  local plot=()
  "$py" -c "import matplotlib" 2>/dev/null && plot=(--plot "$stem.png")
  # shellcheck disable=SC2046  # the backend names are words
  run_stage bench "$py" -m shvit_kernels bench --device cuda --dtype bfloat16 --batch 256 --mode all \
    --backends $(cuda_backends) --compile --models S1 S2 S3 S4 --budget-s "${BENCH_BUDGET_S:-420}" \
    --json "$stem.json" --markdown "$stem.md" "${plot[@]}"
  # The figures are written after every case, so a stage cut short still leaves its rows in $stem.{json,md}.
  [[ -f "$stem.md" ]] && sed -n '/^## /,$p' "$stem.md"
}

stage_profile() {
  # Kernel by kernel, stock against fused (benchmarks/gpu_profile.py): where each op case's time goes.
  # shellcheck disable=SC2046  # the backend names are words
  run_stage profile "$py" -m benchmarks.gpu_profile --device cuda --dtype float16 --batch 256 \
    --backends $(cuda_backends) --markdown "$stem-profile.md"
}

stage_tune() {
  # Each op's Triton tile constants swept on the bench's cases (benchmarks/gpu_tune.py): eval forward, and the token
  # GEMMs' training tiles (flat against per-sample tiles) at the training target's batch.
  run_stage tune "$py" -m benchmarks.gpu_tune --device cuda --dtype float16 --batch 256 --markdown "$stem-tune.md"
  run_stage tune-train "$py" -m benchmarks.gpu_tune --device cuda --dtype bfloat16 --batch 128 --ops ffn pw_conv_bn \
    --mode "train fwd+bwd" --markdown "$stem-tune-train.md"
}

stage_pytest_bench() {
  # The compile variants are timed by the bench stage (max-autotune compiles cost minutes; once is enough).
  SHVIT_BENCH_COMPILE=0 run_stage pytest-bench "$py" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$stem-pytest.json" --benchmark-columns=median,iqr,rounds --benchmark-sort=name
}

all_stages=(build test suite sanitize auto bench profile tune pytest-bench)
stages=("$@")
(( ${#stages[@]} )) || stages=("${all_stages[@]}")
for s in "${stages[@]}"; do
  [[ " ${all_stages[*]} " == *" $s "* ]] || { echo "gpu_suite: unknown stage '$s' (${all_stages[*]})" >&2; exit 2; }
done
for s in "${stages[@]}"; do
  case "$s" in
    build) stage_build || { echo "gpu_suite: build failed; stopping"; break; } ;;
    test) stage_test ;;
    suite) stage_suite ;;
    sanitize) stage_sanitize ;;
    auto) stage_auto ;;
    bench) stage_bench ;;
    profile) stage_profile ;;
    tune) stage_tune ;;
    pytest-bench) stage_pytest_bench ;;
  esac
done

echo "== summary ($gpu; results and logs in $results)"
for line in "${summary[@]}"; do echo "  $line"; done
exit "$failed"
