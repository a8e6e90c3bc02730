#!/usr/bin/env bash
# The GPU checks of the fused losses, for a session with one CUDA device (written for an H200; a few
# minutes per stage). Run from the repository root:
#
#   bash benchmarks/gpu_check.sh [stage ...]      # default: tests main
#
# Stages (each well under 10 minutes, so a stage can be rerun within one session):
#   tests   the `gpu`-marked tests (Triton kernels compiled for the device, not interpreted)
#   plan    the meta allocation plan at the benchmark shapes (CPU only; also printed by `main`)
#   main    CE, 0.5 CE + 0.5 forward KL, 0.5 CE + 0.5 JSD at N=8192 H=4096 V=128256 bf16: ours (default:
#           blocked dW), ours_fp32 (fp32 accumulator), plain, compiled plain, torch's chunked CE, Liger,
#           Cut Cross-Entropy, the matmul floor
#   long    long context: CE and distillation at N=32768 H=4096 V=128256 bf16
#   gemma   a 256k vocabulary (Gemma 3 4B): CE and distillation at N=8192 H=2560 V=262208 bf16
#   peers   try `pip install liger-kernel cut-cross-entropy` (skipped quietly where there is no network)
#
# Results go to $OUT (the device tool's output folder) when set, else benchmarks/results/gpu_check/;
# copy the tables into benchmarks/results/ and the README. DPO and GRPO: benchmarks/alignment.py measures
# CPU memory only (VmHWM); a CUDA path is not written yet.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TUNE_LOSSES_REPO="$PWD"
unset TRITON_INTERPRET  # compiled kernels on the device
PY="${PYTHON:-python}"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests main)

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT_DIR/gpu_check.log"; }

env_report() {
  "$PY" - <<'PY' 2>&1 | tee "$OUT_DIR/env.txt"
import importlib.util, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
for m in ("triton", "liger_kernel", "cut_cross_entropy"):
    spec = importlib.util.find_spec(m)
    v = None
    if spec is not None:
        try:
            v = getattr(__import__(m), "__version__", "installed")
        except Exception as e:  # noqa: BLE001
            v = f"import failed: {e}"
    print(m, v)
PY
}

bench() {  # name, then benchmarks.run arguments
  local name="$1"; shift
  log "benchmark $name: $*"
  timeout 560 "$PY" -m benchmarks.run --device cuda --out "$OUT_DIR/$name" --repeats 5 --mem-reps 1 \
    --timeout 240 "$@" 2>&1 | tail -n 80 | tee "$OUT_DIR/$name.txt"
  log "benchmark $name: exit ${PIPESTATUS[0]}"
}

env_report
for stage in "${STAGES[@]}"; do
  case "$stage" in
    peers)
      log "pip install liger-kernel cut-cross-entropy (no-deps: keep this torch)"
      timeout 120 "$PY" -m pip install --no-deps -q liger-kernel cut-cross-entropy 2>&1 | tail -3 | tee -a "$OUT_DIR/gpu_check.log"
      env_report ;;
    tests)
      log "gpu-marked tests"
      timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_triton*.py 2>&1 | tail -n 40 \
        | tee "$OUT_DIR/gpu_tests.txt"
      log "gpu tests: exit ${PIPESTATUS[0]}" ;;
    plan)
      log "meta allocation plan"
      timeout 300 "$PY" -m benchmarks.memory_plan --out "$OUT_DIR/memory_plan.md" 2>&1 | tail -n 20 ;;
    main)
      bench main --size 8192,4096,128256,bf16 --tasks ce,distill,distill_jsd \
        --methods floor,plain,compile,torch_chunked,liger,cce,ours,ours_fp32 ;;
    long)
      bench long --size 32768,4096,128256,bf16 --tasks ce,distill --methods floor,compile,liger,cce,ours,ours_fp32 ;;
    gemma)
      bench gemma --size 8192,2560,262208,bf16 --tasks ce,distill --methods floor,compile,liger,cce,ours,ours_fp32 ;;
    *)
      log "unknown stage $stage (tests plan main long gemma peers)" ;;
  esac
done
log "done; results under $OUT_DIR"
