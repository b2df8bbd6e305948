#!/usr/bin/env bash
# Runs every CUDA path of deepcam-host on a GPU machine that lacks this
# project's packages, from the folder scripts/device_bundle.sh made, in one
# go, and records what happened. Each part reports pass or FAIL and its time;
# a failing part does not stop the next. Parts, in order:
#
#   env          nvidia-smi, the torch version and GPU, the CPU and whether
#                it has AVX-512; the bundle's programs load (deepcam-host
#                --version, --list-plugins)
#   unit         the CUDA test cases of every doctest executable (the fused
#                optimizers against the CPU path, the prefetch reader on the
#                GPU): those named *CUDA*, as every case that uses the GPU is
#                (tests/integration/test_device_bundle.py checks it); and the
#                sample normalisation kernels' case (normalise_sample*), whose
#                AVX-512 path runs only on a CPU that has it, as a GPU
#                machine's may and CI's does not. The other CPU cases run in
#                CI, and UNIT_CASES=* runs them here too. With
#                DEVICE=cuda a CUDA case that sees no GPU fails rather than
#                being skipped. The tests find the checkout, the bundle's
#                build/ and testdata/ and the Python through the environment
#                (tests/unit/test_paths.hpp), not at the paths compiled in
#   train        configs/reference.toml on a full-size synthetic set written
#                on local disk, 2 epochs at local batch 8; its MLPerf log
#                through the checker (open division; on synthetic data only
#                the accuracy check may fail); warm samples/s from the log;
#                it runs before integration, which a deadline may cut short
#   integration  the pytest cases that need CUDA (tests/integration -k cuda:
#                training on the GPU, CUDA graphs, amp, NCCL at world size 1,
#                or on two ranks where there are two GPUs), each case named
#                as it ends, so that a deadline keeps what was run
#   bench        scripts/bench_gpu.sh beside the MLCommons reference (the
#                bundle's copy), its tables written to $OUT/benchmarks.md
#
#   scripts/gpu_check.sh                 # on the GPU machine, in the repository root
#   PARTS=env,unit DEVICE=cpu scripts/gpu_check.sh   # rehearsal on a machine without a GPU
#
# With the device tool (15 device-minutes in all, the machine's start of a
# minute or more included; 10 a call), in two calls back to back while the
# machine is warm, each with carry ["device-bundle"] and timeout_s 360:
# DEADLINE=330 PARTS=env,unit,train,integration, then DEADLINE=330
# PARTS=bench BATCHES=8 (16 processes: 10 of deepcam-host, 6 set-ups of the
# reference loop, each with CUDA's start-up and cuDNN's autotuning, which may
# not all fit in 330 s: the goal's set-ups come first, and bench_step.py writes
# the table after each, so a deadline keeps what was measured; BATCHES=1 in a
# third call only if device time is left).
# Nothing has measured these times yet: each part prints its own. With
# DEVICE=cpu the bench part takes minutes (full-size steps on a CPU).
#
# What it writes under OUT, eight files (the most the device tool brings
# back): a log per part, train-mlperf.log, benchmarks.md and summary.json.
#
# Settings (environment): BUNDLE (default device-bundle/), OUT (where logs and
# summary.json go; the device tool sets it, else runs/gpu-check/), PARTS
# (comma-separated, default all five), DEVICE (cuda, or cpu for a rehearsal:
# small data, no GPU tests, one benchmark set-up), PYTHON (default: the GPU
# image's /opt/torch/.venv, else this checkout's .venv), WORK (local scratch,
# default /tmp/gpu-check), STEPS (timed benchmark steps, default 20), BATCHES
# (the benchmark's local batches, default "8 1": the goal's first), DEADLINE
# (seconds: stop there, see run_part; set it below the call's timeout_s),
# UNIT_CASES (doctest's -tc filter of the unit part, default
# *CUDA*,normalise_sample*; * for every case).
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bundle=$(cd "${BUNDLE:-$top/device-bundle}" 2>/dev/null && pwd) || {
  echo "gpu_check: no bundle at ${BUNDLE:-$top/device-bundle}: make it with scripts/device_bundle.sh" >&2
  exit 2
}
out=${OUT:-$top/runs/gpu-check}
work=${WORK:-/tmp/gpu-check}
device=${DEVICE:-cuda}
parts=${PARTS:-env,unit,train,integration,bench}
unit_cases=${UNIT_CASES:-*CUDA*,normalise_sample*}
python=${PYTHON:-}
if [ -z "$python" ]; then
  for p in /opt/torch/.venv/bin/python3 "$top/.venv/bin/python"; do
    if [ -x "$p" ]; then python=$p; break; fi
  done
fi
python=${python:-python3}
case "$device" in cuda | cpu) ;; *) echo "gpu_check: DEVICE=$device is not cuda or cpu" >&2; exit 2 ;; esac
# A mistyped part or deadline would run nothing and still pass.
IFS=, read -r -a part_list <<<"$parts"
for p in "${part_list[@]}"; do
  case "$p" in env | unit | train | integration | bench) ;;
    *) echo "gpu_check: PARTS=$parts: no part '$p'; the parts are env, unit, train, integration, bench" >&2; exit 2 ;;
  esac
done
if [ -n "${DEADLINE:-}" ] && ! [[ "$DEADLINE" =~ ^[1-9][0-9]{0,5}$ ]]; then
  echo "gpu_check: DEADLINE=$DEADLINE is not a whole number of seconds" >&2
  exit 2
fi
mkdir -p "$out" "$work"
started=$(date +%s)

# ---- the loader and Python paths --------------------------------------------------------------
# LibTorch from this machine's torch; of the bundle's libraries only those
# this machine cannot find (a library the image has stays the image's).
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
  echo "gpu_check: $python has no torch" >&2
  exit 2
}
rm -rf "$work/lib" && mkdir -p "$work/lib"
export LD_LIBRARY_PATH="$torch_lib:$work/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
elves=$(find "$bundle/build" -type f \( -name '*.so' -o -perm -u+x \) ! -name '*.h')
unresolved=""
for _ in 1 2 3 4 5 6; do
  wanted=$(for f in $elves "$work"/lib/*; do [ -e "$f" ] && ldd "$f" 2>/dev/null; done |
           awk '$2 == "=>" && $3 == "not" {print $1}' | sort -u)
  [ -z "$wanted" ] && break
  linked=0
  unresolved=""
  for name in $wanted; do
    if [ -e "$bundle/lib/$name" ] && [ ! -e "$work/lib/$name" ]; then
      ln -s "$bundle/lib/$name" "$work/lib/$name"
      linked=1
    elif [ ! -e "$bundle/lib/$name" ]; then
      unresolved+=" $name"
    fi
  done
  [ "$linked" -eq 0 ] && break
done
if [ -d "$bundle/wheels" ] && ls "$bundle"/wheels/*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$work/site" \
    --upgrade "$bundle"/wheels/*.whl >"$work/pip.log" 2>&1 ||
    { echo "gpu_check: the bundle's wheels did not install:"; tail -n 20 "$work/pip.log"; }
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The integration tests read the test vectors at ../shared/testdata beside the
# checkout.
testdata="$top/../shared/testdata"
[ -e "$testdata" ] || { mkdir -p "$(dirname "$testdata")" && ln -s "$bundle/testdata" "$testdata"; }
# The unit tests find these through the environment (tests/unit/test_paths.hpp);
# the paths compiled into them are those of the machine that built the bundle.
export DEEPCAM_SOURCE_DIR="$top" DEEPCAM_BUILD_DIR="$bundle/build" DEEPCAM_TESTDATA="$bundle/testdata" \
  DEEPCAM_PYTHON="$python"
export DEEPCAM_PLUGIN_PATH="$bundle/build/plugins" PYTHONUNBUFFERED=1
# The commit the bundle was built from, for the benchmark's record (a copy of
# the checkout on a GPU machine may come without .git).
DEEPCAM_COMMIT=$(sed -n 's/^commit \([0-9a-f]*\).*/\1/p' "$bundle/MANIFEST")
export DEEPCAM_COMMIT
host="$bundle/build/core/deepcam-host"

# ---- running the parts --------------------------------------------------------------------------
summary_parts=()
# With DEADLINE, a part is stopped (with everything it started) when the
# script has run that many seconds, and a part that would start later is not
# run: the summary is written either way, inside the device tool's limit.
run_part() {
  local name=$1 t0 rc ms verdict left
  case ",$parts," in *",$name,"*) ;; *) return ;; esac
  t0=$(date +%s%N)
  if [ -n "${DEADLINE:-}" ]; then
    left=$((started + DEADLINE - $(date +%s)))
    if [ "$left" -lt 15 ]; then
      echo "gpu_check: $name not run: DEADLINE=$DEADLINE s is (nearly) reached"
      summary_parts+=("$(printf '"%s": {"status": "not run"}' "$name")")
      return
    fi
    # timeout signals the whole process group it starts: the part's programs too.
    timeout -k 10 "$left" bash -c "part_$name" >"$out/$name.log" 2>&1
  else
    "part_$name" >"$out/$name.log" 2>&1
  fi
  rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  verdict=pass
  [ "$rc" -ne 0 ] && verdict=fail
  [ -n "${DEADLINE:-}" ] && { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && verdict="timed out"
  printf 'gpu_check: %-12s %s in %d s (log: %s)\n' "$name" \
    "$([ "$verdict" = pass ] && echo pass || echo "${verdict^^}, status $rc")" $((ms / 1000)) "$out/$name.log"
  [ "$rc" -ne 0 ] && tail -n 25 "$out/$name.log" | sed 's/^/    /'
  summary_parts+=("$(printf '"%s": {"status": "%s", "exit": %d, "seconds": %d.%03d}' "$name" "$verdict" "$rc" \
    $((ms / 1000)) $((ms % 1000)))")
}

part_env() {
  echo "bundle: $bundle"; cat "$bundle/MANIFEST"
  echo "libraries taken from the bundle: $(cd "$work/lib" && ls | tr "\n" " ")"
  [ -n "$unresolved" ] && echo "not found anywhere:$unresolved"
  command -v nvidia-smi >/dev/null && nvidia-smi
  # The normalisation kernels' widest path (the unit part's normalise_sample case) needs AVX-512.
  echo "CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1), $(nproc --all) cores," \
    "AVX-512: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no)"
  "$python" - "$device" <<'EOF' || return 1
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"{p.total_memory / 2**30:.0f} GiB", "cuDNN", torch.backends.cudnn.version(),
          "NCCL", ".".join(map(str, torch.cuda.nccl.version())))
elif sys.argv[1] == "cuda":
    sys.exit("torch sees no CUDA GPU")
EOF
  "$host" --version && "$host" --list-plugins && [ -z "$unresolved" ]
}

part_unit() {
  local failed=0 t flags=(-tc="$unit_cases")
  # A CUDA case is skipped where no GPU is seen: on the GPU machine that is a failure.
  [ "$device" = cuda ] && flags+=(--no-skip)
  while IFS= read -r t; do
    echo "== ${t#"$bundle"/}"
    "$t" "${flags[@]}" 2>&1 || failed=$((failed + 1))
  done < <(find "$bundle/build" -type f -perm -u+x -name 'test_*' ! -name '*.so' | sort)
  echo "unit: $failed executables failed"
  [ "$failed" -eq 0 ]
}

part_integration() {
  local files=(tests/integration/test_cuda.py tests/integration/test_cuda_graphs.py
               tests/integration/test_precision.py tests/integration/test_data_parallel.py)
  "$python" -m pytest -v -rs -p no:cacheprovider -o console_output_style=classic -k cuda "${files[@]}" |
    tee "$work/pytest.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || return "$rc"
  # On the GPU machine a skipped GPU case is a failure (the GPU was not
  # seen), but for those that need a second GPU where there is one.
  if [ "$device" = cuda ] && grep -E '^SKIPPED' "$work/pytest.txt" | grep -qv 'needs two CUDA GPUs'; then
    echo "integration: GPU cases were skipped on the GPU machine"
    return 1
  fi
}

part_train() {
  local data="$work/train-data" run="$work/train-run" size=() batch=8 threads=8
  if [ "$device" = cpu ]; then size=(--height 96 --width 144); batch=2; threads=2; fi
  rm -rf "$data" "$run"
  "$bundle/build/core/deepcam-data" synth --out "$data" --train $((2 * batch)) --validation "$batch" --seed 7 \
    "${size[@]}" || return 1
  "$host" configs/reference.toml --quiet --set "data.root=$data" --set "run.output_dir=$run" \
    --set "run.device=$device" --set run.max_epochs=2 --set "run.train_batch_size=$batch" \
    --set "run.validation_batch_size=$batch" --set run.seed=7 --set "run.threads=$threads" --set run.logging_frequency=1 \
    --set mlperf.division=open
  local rc=$?
  # 1: the target was not reached in 2 epochs (run_stop "aborted"), as expected on this data.
  [ "$rc" -eq 0 ] || [ "$rc" -eq 1 ] || return "$rc"
  cp "$run/mlperf.log" "$out/train-mlperf.log"
  "$python" - "$run/mlperf.log" "$((2 * batch))" <<'EOF' || return 1
import json, sys
events = [json.loads(l[len(":::MLLOG "):]) for l in open(sys.argv[1]) if l.startswith(":::MLLOG ")]
assert events[-1]["key"] == "run_stop", events[-1]
starts = {e["metadata"]["epoch_num"]: e["time_ms"] for e in events if e["key"] == "epoch_start"}
stops = {e["metadata"]["epoch_num"]: e["time_ms"] for e in events if e["key"] == "epoch_stop"}
for epoch in sorted(stops):
    seconds = (stops[epoch] - starts[epoch]) / 1e3
    print(f"epoch {epoch}: {seconds:.2f} s, {int(sys.argv[2]) / seconds:.1f} training samples/s (with validation)")
EOF
  # (It writes compliance_checker.log into the folder it runs in.)
  (cd "$work" && "$python" -m mlperf_logging.compliance_checker --usage hpc --ruleset 3.0.0 "$run/mlperf.log") \
    >"$work/checker.txt" 2>&1
  local checker=$?
  cat "$work/checker.txt"
  [ "$checker" -eq 0 ] && return 0
  # Synthetic data: only the accuracy check may fail (the target is not reached in 2 epochs).
  local failed
  failed=$( (grep -oE "Failed checks for [a-z_]+" "$work/checker.txt" | awk '{print $4}'
            grep -oE "CHECK for '[a-z_]+' failed" "$work/checker.txt" | cut -d"'" -f2) | sort -u | tr '\n' ' ')
  echo "checks that failed: $failed"
  [ "$failed" = "eval_accuracy " ]
}

part_bench() {
  cp docs/benchmarks.md "$out/benchmarks.md"
  if [ ! -f "$bundle/ref/deepcam/src/deepCam/architecture/deeplab_xception.py" ]; then
    echo "bench: the bundle has no reference (peers/hpc was missing when it was made)"
    return 1
  fi
  if [ "$device" = cpu ]; then
    "$python" scripts/bench_step.py --ref "$bundle/ref" --steps 1 --setups fp32:contiguous \
      --docs "$out/benchmarks.md"
  else
    REF="$bundle/ref" PYTHON="$python" DOCS="$out/benchmarks.md" STEPS="${STEPS:-20}" BATCHES="${BATCHES:-8 1}" \
      bash scripts/bench_gpu.sh
  fi
}

# What the parts read, for the bash that timeout starts.
export bundle work device python host out unresolved unit_cases
export -f part_env part_unit part_integration part_train part_bench
for part in env unit train integration bench; do run_part "$part"; done

{
  echo "{\"device\": \"$device\", \"bundle\": \"$(head -n 1 "$bundle/MANIFEST")\", \"seconds\": $(($(date +%s) - started)), \"parts\": {"
  (IFS=,; echo "${summary_parts[*]}")
  echo "}}"
} >"$out/summary.json"
echo "gpu_check: $(($(date +%s) - started)) s; summary in $out/summary.json"
# Any part that failed, timed out or was not run fails the check.
! grep -qE '"status": "(fail|timed out|not run)"' "$out/summary.json"
