#!/usr/bin/env bash
# The GPU check of issue 13 in one command: build, prove and measure the CUDA path.
# Docs: docs/cuda-kernels.md, "Running the GPU check".
#
#   bash bench/gpu_check.sh             on the GPU machine (the device tool sets $OUT; every result
#                                       file lands there, at most 8 files, flat)
#   bash bench/gpu_check.sh --dry-run   on any CPU machine: every stage's logic on the CPU ops with
#                                       tiny sizes, no nvcc, no sanitizer (what would run is
#                                       printed); OUT defaults to a new temporary folder
#   bash bench/gpu_check.sh --only a,b,d   only these stages (a rerun; keep `a` on a fresh machine)
#   bash bench/gpu_check.sh --prepare   here, before the device call: copy the data the prune needs
#                                       into .gpudata/ (git-ignored); name it in the run's carry
#
# Stages, in this order, each under its own `timeout`, all within GPU_CHECK_BUDGET_S (default
# 470 s); a failed stage is recorded and the script goes on (after a failed build only the
# reports run):
#   0  preflight: GPU, python packages, nvcc, compute-sanitizer, the shipped data
#   a  build with CUDA for sm_90 against this machine's torch (no network), print build_info()
#   b  pytest -m cuda tests/test_cuda.py tests/test_cuda_model.py      } side by side: checks,
#   c1 compute-sanitizer memcheck, c2 racecheck, on bench/gpu_ops_smoke.py } not timings
#   d  bench/kernels.py --device cuda: fused vs the batched loop, ResNet-50/56 shapes, K = 64,
#      256, 1024, the mask product's TFLOP/s against the measured fp32/tf32 matmul peak
#   e1 bench/search_step.py (issue 16) if present;  e2 a ResNet-56 prune to 50 % MACs, timed
#   f  (always) the reports under $OUT and a one-screen summary with the compass figures
# Exit status: 0 when no stage failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

DRY=0
ONLY=""
PREPARE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY="${2:?--only needs a list of stages, e.g. a,b,d}"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    --prepare) PREPARE=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-python3}"
RESNET56_WEIGHTS="weights/resnet56-4bfd9763.th"
RESNET20_WEIGHTS="weights/resnet20-12fca82f.th"

# The folder with the shipped data: $AOFP_DATA_DIR, the carried .gpudata, shared/data, ../shared/data.
find_data() {
  local d
  for d in "${AOFP_DATA_DIR:-}" .gpudata shared/data ../shared/data; do
    if [ -n "$d" ] && [ -f "$d/$RESNET56_WEIGHTS" ] && [ -d "$d/cifar10-subset" ]; then
      (cd "$d" && pwd)
      return 0
    fi
  done
  return 1
}

if [ "$PREPARE" = 1 ]; then
  src="${AOFP_DATA_DIR:-../shared/data}"
  [ -f "$src/$RESNET56_WEIGHTS" ] || { echo "--prepare: no $RESNET56_WEIGHTS under $src (set AOFP_DATA_DIR)" >&2; exit 1; }
  mkdir -p .gpudata/weights
  cp "$src/$RESNET56_WEIGHTS" .gpudata/weights/
  rm -rf .gpudata/cifar10-subset
  cp -r "$src/cifar10-subset" .gpudata/
  git check-ignore -q .gpudata/weights || echo "warning: .gpudata is not git-ignored here" >&2
  echo "prepared .gpudata ($(du -sh .gpudata | cut -f1)); run with carry [\".gpudata\"]"
  exit 0
fi

# A command found on PATH or in the usual CUDA folders.
find_tool() {
  command -v "$1" 2>/dev/null && return 0
  local c
  for c in /usr/local/cuda/bin/"$1" /usr/local/cuda-*/bin/"$1" /opt/nvidia/*/"$1" /opt/nvidia/*/*/"$1"; do
    [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

if [ "$DRY" = 1 ]; then TAG=dryrun; DEV=cpu; else TAG=h200; DEV=cuda; fi
OUT="${OUT:-$(mktemp -d "/tmp/gpu_check_${TAG}.XXXXXX")}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "/tmp/gpu_check_work.XXXXXX")"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
# The pytest selection of the dry run (the full files take many minutes on a CPU).
DRY_TESTS="${GPU_CHECK_DRY_TESTS:-(all_keep and batch-relu) or empty_inputs or uint8 or compact_several or (cut_on_device and projection) or (prune_on_device and projection)}"
export PY DRY TAG DEV OUT WORK DRY_TESTS RESNET56_WEIGHTS RESNET20_WEIGHTS PYTHONUNBUFFERED=1
export -f find_data find_tool
[ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT

record() {  # ID NAME STATUS SECONDS NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" >> "$WORK/stages.tsv"
}

selected() {  # is stage $1 (its letter) in --only?
  [ -z "$ONLY" ] && return 0
  case ",$ONLY," in *",${1:0:1},"*|*",$1,"*) return 0 ;; esac
  return 1
}

SKIP_REST=""
run_stage() {  # ID NAME CAP_SECONDS FUNCTION
  local id=$1 name=$2 cap=$3 fn=$4
  if ! selected "$id"; then record "$id" "$name" skipped 0 "not in --only $ONLY"; return 0; fi
  if [ -n "$SKIP_REST" ]; then record "$id" "$name" skipped 0 "$SKIP_REST"; return 0; fi
  local left=$((DEADLINE - $(date +%s) - 20))
  if [ "$left" -lt 20 ]; then
    record "$id" "$name" NO-TIME 0 "not run: out of time (GPU_CHECK_BUDGET_S=$BUDGET)"
    return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo
  echo "=== [$id] $name: limit ${cap} s, $(date -u +%H:%M:%S) UTC ==="
  local t0 rc secs note status
  t0=$(date +%s.%N)
  STAGE_CAP=$cap timeout --kill-after=10 "$cap" bash -c "$fn" 2>&1 | tee "$WORK/$id.log"
  rc=${PIPESTATUS[0]}
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  note=$(tail -n 1 "$WORK/$id.note" 2>/dev/null)
  case $rc in
    0) status=ok; [ -f "$WORK/$id.skip" ] && status=skipped ;;
    124) status=TIMEOUT; note="stopped at its limit of ${cap} s; $note" ;;
    137) status=TIMEOUT; note="killed at its limit of ${cap} s; $note"
      if awk -v s="$secs" -v c="$cap" 'BEGIN { exit !(s < c - 1) }'; then
        status=FAILED; note="killed by SIGKILL after ${secs} s (out of memory?); $note"
      fi ;;
    *) status=FAILED; note="exit $rc; $note" ;;
  esac
  record "$id" "$name" "$status" "$secs" "$note"
  echo "=== [$id] $status in ${secs} s${note:+: $note} ==="
  return "$rc"
}

# ---- the stages (run as `bash -c FUNCTION` under timeout; $STAGE_CAP is their limit) ------------

stage_preflight() {
  local bad=0 m
  $PY bench/gpu_report.py machine || bad=1
  if [ "$DRY" = 0 ]; then
    nvidia-smi || echo "preflight: nvidia-smi failed"
    if ! $PY -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"; then
      echo "no GPU visible to torch: the other stages are skipped" | tee "$WORK/0.note"
      return 3
    fi
  fi
  local missing optional
  read -r missing optional < <($PY - <<'EOF'
import importlib.util as u
need = ["torch", "scikit_build_core", "pybind11", "pytest", "hypothesis", "numpy", "tqdm"]
opt = ["ninja", "matplotlib", "expecttest"]
miss = lambda names: ",".join(n for n in names if u.find_spec(n) is None) or "-"
print(miss(need), miss(opt))
EOF
)
  [ "$optional" != - ] && echo "preflight: optional packages missing (not needed by the check): $optional"
  if [ "$missing" != - ]; then
    echo "preflight: MISSING python packages: $missing -- carry them as wheels in .whl/ (docs/cuda-kernels.md)"
    bad=1
  fi
  if [ "$DRY" = 1 ]; then
    echo "dry run: would look for nvcc and compute-sanitizer (not used here)"
  else
    echo "nvcc: $(find_tool nvcc || echo NOT FOUND)"
    echo "compute-sanitizer: $(find_tool compute-sanitizer || echo NOT FOUND)"
  fi
  echo "shipped data: $(find_data || echo 'NOT FOUND: run bench/gpu_check.sh --prepare and carry .gpudata')"
  echo "missing packages: $missing; optional missing: $optional" > "$WORK/0.note"
  return $bad
}

stage_build() {
  if [ "$DRY" = 1 ]; then
    echo "dry run: would run: CMAKE_BUILD_PARALLEL_LEVEL=\$(nproc) $PY -m pip install --no-index --no-build-isolation --no-deps -v -e . -Ccmake.define.AOFP_CUDA=ON"
    echo "dry run: checking the installed (CPU) build instead"
  else
    if [ -n "${CUDACXX:-}" ]; then
      echo "nvcc: $CUDACXX"; "$CUDACXX" --version | tail -n 2
    else
      echo "nvcc: not found on PATH or in /usr/local/cuda*/bin (CMake will look for itself)"
    fi
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
      $PY -m pip install --no-index --no-build-isolation --no-deps -v -e . -Ccmake.define.AOFP_CUDA=ON || return 1
  fi
  $PY -c "import aofp_ext, json; print(json.dumps(aofp_ext.build_info()))" > "$WORK/build_info.json" || return 1
  echo "build_info: $(cat "$WORK/build_info.json")"
  $PY - "$WORK/build_info.json" "$DRY" > "$WORK/a.note" <<'EOF'
import json, sys
info = json.load(open(sys.argv[1]))
print(f"torch {info['torch_version']}, cuda {info['cuda']}, archs {info['cuda_archs'] or '-'}")
if sys.argv[2] == "0" and not info["cuda"]:
    sys.exit("the build has no CUDA kernels")
EOF
}

stage_tests() {
  local sel=()
  if [ "$DRY" = 1 ]; then
    export AOFP_CUDA_TEST_DEVICE=cpu
    sel=(-k "$DRY_TESTS")
    echo "dry run: AOFP_CUDA_TEST_DEVICE=cpu, selection -k \"$DRY_TESTS\""
  fi
  $PY -m pytest -m cuda tests/test_cuda.py tests/test_cuda_model.py -q -rs -p no:cacheprovider \
    --junitxml="$WORK/pytest.xml" ${sel[@]+"${sel[@]}"}
  local rc=$?
  local gpu=--gpu
  [ "$DRY" = 1 ] && gpu=
  $PY bench/gpu_report.py junit "$WORK/pytest.xml" $gpu | tee "$WORK/b.note"
  local verdict=${PIPESTATUS[0]}
  [ "$rc" = 0 ] && [ "$verdict" = 0 ]
}

stage_kernels() {
  local args=(--device cuda)
  [ "$DRY" = 1 ] && args=(--device cpu --tiny --ks 16 --baseline batched --peak)
  $PY bench/kernels.py "${args[@]}" --out "$OUT/kernels-$TAG.md" --json "$WORK/kernels.json" || return 1
  echo "wrote $OUT/kernels-$TAG.md" > "$WORK/d.note"
}

stage_search_step() {
  local md="$OUT/search-step-$TAG.md"
  if [ ! -f bench/search_step.py ]; then
    echo "skipped: bench/search_step.py not present" | tee "$WORK/e1.note"
    touch "$WORK/e1.skip"
    return 0
  fi
  local args=(--device "$DEV" --models resnet56 --masks 64,256 --out "$md" --json "$WORK/search-step.json")
  [ "$DRY" = 1 ] && args+=(--tiny)
  echo "+ $PY bench/search_step.py ${args[*]}"
  $PY bench/search_step.py "${args[@]}" || return 1
  echo "wrote $md" > "$WORK/e1.note"
}

stage_prune() {
  local data cmd t0 rc wall
  data=$(find_data) || { echo "prune: shipped data not found (AOFP_DATA_DIR, .gpudata, shared/data, ../shared/data); run bench/gpu_check.sh --prepare here and carry .gpudata" | tee "$WORK/e2.note"; return 1; }
  if [ "$DRY" = 1 ]; then
    cmd=($PY -m aofp_ext.cli prune --arch resnet20 --weights "$data/$RESNET20_WEIGHTS"
         --data "cifar10:$data/cifar10-subset" --target-flops 0.5 --thresh 0.05 --masks-per-step 4
         --max-steps 1 --train-limit 64 --test-limit 32 --batch-size 32 --device cpu --no-progress
         --out "$WORK/prune")
  else
    cmd=($PY -m aofp_ext.cli prune --arch resnet56 --weights "$data/$RESNET56_WEIGHTS"
         --data "cifar10:$data/cifar10-subset" --target-flops 0.5 --thresh 0.05 --masks-per-step 64
         --max-steps 2000 --device cuda --no-progress --out "$WORK/prune")
  fi
  echo "+ ${cmd[*]}"
  t0=$(date +%s.%N)
  # its own, shorter limit: the report below must still be written when the prune is stopped
  timeout --kill-after=5 $((STAGE_CAP > 30 ? STAGE_CAP - 15 : 15)) "${cmd[@]}"
  rc=$?
  wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
  local note="" stopped=()
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    note="stopped by its time limit"
    stopped=(--stopped)
  fi
  [ "$DRY" = 1 ] && note="dry run: ResNet-20, 64 images, 1 step on the CPU (not the GPU figure)"
  $PY bench/gpu_report.py prune-md --report "$WORK/prune/report.json" --wall "$wall" \
    --command "${cmd[*]}" --note "$note" ${stopped[@]+"${stopped[@]}"} --out "$OUT/prune-$TAG.md" \
    --json "$WORK/prune-summary.json" \
    | tee "$WORK/e2.note" || return 1
  return "$rc"
}

stage_sanitizer() {  # $1: memcheck or racecheck
  local tool=$1 extra=() cs rc
  [ "$tool" = racecheck ] && extra=(--quick)
  if [ "$DRY" = 1 ]; then
    echo "dry run: would run: compute-sanitizer --tool $tool --error-exitcode 9 $PY bench/gpu_ops_smoke.py --device cuda ${extra[*]}" | tee "$WORK/$tool.log"
    if [ "$tool" = memcheck ]; then  # the op script's logic once, on the CPU ops
      $PY bench/gpu_ops_smoke.py --device cpu --quick --tiny 2>&1 | tee -a "$WORK/$tool.log"
      rc=${PIPESTATUS[0]}
    else  # the same op script as memcheck's dry run, --quick: nothing new to run on the CPU
      [ -f bench/gpu_ops_smoke.py ] && echo "dry run: the op script ran in memcheck's dry run" | tee -a "$WORK/$tool.log"
      rc=${PIPESTATUS[0]}
    fi
  else
    cs=$(find_tool compute-sanitizer) || { echo "compute-sanitizer not found" | tee "$WORK/$tool.log"; return 1; }
    # no caching allocator under memcheck: every buffer its own exact allocation
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$tool" --error-exitcode 9 --print-limit 100 \
      $PY bench/gpu_ops_smoke.py --device cuda ${extra[@]+"${extra[@]}"} 2>&1 | tee "$WORK/$tool.log"
    rc=${PIPESTATUS[0]}
  fi
  return "$rc"
}
stage_memcheck() { stage_sanitizer memcheck; local rc=$?; sanitizer_note memcheck c1; return $rc; }
stage_racecheck() { stage_sanitizer racecheck; local rc=$?; sanitizer_note racecheck c2; return $rc; }
sanitizer_note() {
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|checks passed" "$WORK/$1.log" 2>/dev/null | tr '\n' ' ' > "$WORK/$2.note"
  echo >> "$WORK/$2.note"
}

export -f stage_preflight stage_build stage_tests stage_kernels stage_search_step stage_prune \
  stage_sanitizer stage_memcheck stage_racecheck sanitizer_note

# ---- f: reports (always) ------------------------------------------------------------------------

stub_md() {  # FILE TITLE STAGE_ID: a result file for a stage that wrote none
  [ -f "$1" ] && return 0
  local st
  st=$(awk -F'\t' -v id="$3" '$1 == id { print $3 ": " $5 }' "$WORK/stages.tsv")
  printf '# %s\n\n- date: %s\n- machine: %s\n- command: `bash bench/gpu_check.sh%s`\n\nNot measured: stage %s %s.\n' \
    "$2" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$($PY bench/gpu_report.py machine 2>/dev/null)" \
    "$([ "$DRY" = 1 ] && echo ' --dry-run')" "$3" "${st:-did not run}" > "$1"
}

reports() {
  echo
  echo "=== [f] reports, $(date -u +%H:%M:%S) UTC ==="
  local cmdline="bash bench/gpu_check.sh$([ "$DRY" = 1 ] && echo ' --dry-run')"
  $PY bench/gpu_report.py sanitizer "$WORK/memcheck.log" "$WORK/racecheck.log" --tag "$TAG" \
    --command "compute-sanitizer --tool memcheck|racecheck --error-exitcode 9 $PY bench/gpu_ops_smoke.py --device $DEV [--quick] (from $cmdline)" \
    --out "$OUT/sanitizer-$TAG.log"
  stub_md "$OUT/kernels-$TAG.md" "Kernel benchmark: masks priced per second" d
  stub_md "$OUT/search-step-$TAG.md" "AOFP search step vs plain training step" e1
  stub_md "$OUT/prune-$TAG.md" "ResNet-56 pruned to 50 % of its MACs with AOFP" e2
  tar -czf "$OUT/logs-$TAG.tar.gz" -C "$WORK" --exclude=checkpoint --exclude='*.pt' --exclude='*.png' . \
    || echo "warning: could not pack the logs"
  $PY bench/gpu_report.py summary --work "$WORK" --out "$OUT" --tag "$TAG" $([ "$DRY" = 1 ] && echo --dry-run)
}

main() {
  echo "gpu_check.sh: $([ "$DRY" = 1 ] && echo 'DRY RUN on the CPU' || echo 'GPU run'), OUT=$OUT, budget ${BUDGET} s, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | grep -c . || true) changed files"
  if [ "$DRY" = 0 ]; then
    if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then  # carried wheels (docs/cuda-kernels.md)
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" && echo "installed the carried wheels into /tmp/site"
    fi
    local nvcc
    if nvcc=$(find_tool nvcc); then
      export CUDACXX="${CUDACXX:-$nvcc}" PATH="$(dirname "$nvcc"):$PATH"
    fi
  fi
  run_stage 0 "preflight" 60 stage_preflight
  [ "$?" = 3 ] && SKIP_REST="no GPU visible to torch"
  run_stage a "build (CUDA, sm_90) + build_info" 240 stage_build \
    || SKIP_REST="the build failed"
  # The correctness checks side by side (the machine has cores to spare), the timings alone.
  echo
  echo "=== [b] and [c1, c2] run side by side; their output follows when both have ended ==="
  (run_stage b "pytest -m cuda (ops, cut, prune)" 200 stage_tests) > "$WORK/b.out" 2>&1 &
  local pid_b=$!
  (run_stage c1 "compute-sanitizer memcheck" 100 stage_memcheck
   run_stage c2 "compute-sanitizer racecheck" 100 stage_racecheck) > "$WORK/c.out" 2>&1 &
  wait "$pid_b" $!
  cat "$WORK/b.out" "$WORK/c.out"
  run_stage d "bench/kernels.py --device cuda" 150 stage_kernels
  run_stage e1 "bench/search_step.py" 90 stage_search_step
  run_stage e2 "ResNet-56 prune to 50 % MACs" 150 stage_prune
  reports
}

main 2>&1 | tee "$OUT/gpu-check-$TAG.log"
exit "${PIPESTATUS[0]}"
