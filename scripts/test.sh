#!/usr/bin/env bash
# Runs every test: set-up and build first (scripts/setup.sh), then each doctest
# unit-test executable in build/, then the parsers' unit tests and fuzz run
# built with ASan and UBSan (tests/sanitize/, in build-asan/), then the
# integration tests (pytest), which
# run deepcam-host and deepcam-data and check their files with h5py, torch and
# the official mlperf-logging checker. The last line is "N passed, N failed"
# (test cases); the exit status is non-zero when anything failed.
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

# How long each stage took, printed as it ends: CI has 30 minutes for all.
stage_start=$SECONDS
stage_took() {
  echo "test.sh: $1 took $((SECONDS - stage_start)) s"
  stage_start=$SECONDS
}

if ! scripts/setup.sh; then
  echo "0 passed, 1 failed"
  exit 1
fi
stage_took "set-up and build"
export PATH="$top/.venv/bin:$PATH"
export DEEPCAM_BUILD_DIR="$top/build"
# Only the build tree's plugins are seen by the tests.
export DEEPCAM_PLUGIN_PATH="$top/build/plugins"

passed=0
failed=0
# Tests run two at a time (DEEPCAM_TEST_WORKERS; 1 runs them one by one).
# With two processes on two cores, OpenMP threads that spin while they wait
# starve the other one's run (one quickstart took eight times as long), so
# they sleep instead.
workers=${DEEPCAM_TEST_WORKERS:-2}
export OMP_WAIT_POLICY=PASSIVE
# Adds the test cases of one doctest executable's run (LABEL, its output
# file, its exit status) to the totals; a crash or a non-zero exit without
# failed cases still counts as a failure.
count_doctest() {
  local label=$1 out=$2 rc=$3
  local summary p f
  summary=$(grep '\[doctest\] test cases:' "$out" | tail -n 1)
  p=$(printf '%s' "$summary" | sed -n 's/.*| *\([0-9]*\) passed.*/\1/p')
  f=$(printf '%s' "$summary" | sed -n 's/.*| *\([0-9]*\) failed.*/\1/p')
  p=${p:-0}
  f=${f:-0}
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
  if [ "$f" -ne 0 ]; then
    tail -n 60 "$out"
  fi
  echo "$label: $p passed, $f failed"
  passed=$((passed + p))
  failed=$((failed + f))
}

# Runs one doctest executable (the command after LABEL) and counts it.
run_doctest() {
  local label=$1 out rc
  shift
  out=$(mktemp)
  "$@" >"$out" 2>&1
  rc=$?
  count_doctest "$label" "$out" "$rc"
  rm -f "$out"
}

# The unit tests run $workers at a time (most of their time is Python's
# reference runs, one core each), and are reported in name order. The
# prefetch reader's runs alone afterwards: it checks that a ring of sleeping
# workers keeps a training step from waiting, which another process on the
# same cores could hold up.
units=$(mktemp -d)
mapfile -t unit_tests < <(find "$top/build" -type f -executable -name 'test_*' ! -name '*.so' ! -path '*.p/*' | sort)
parallel_units=()
alone_units=()
for t in "${unit_tests[@]}"; do
  if [ "$(basename "$t")" = test_reader_prefetch ]; then alone_units+=("$t"); else parallel_units+=("$t"); fi
done
for n in "${!parallel_units[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$workers" ]; do wait -n; done
  ( "${parallel_units[$n]}" >"$units/$n.out" 2>&1; echo $? >"$units/$n.rc" ) &
done
wait
for n in "${!parallel_units[@]}"; do
  t=${parallel_units[$n]}
  count_doctest "unit: ${t#"$top"/}" "$units/$n.out" "$(cat "$units/$n.rc" 2>/dev/null || echo 1)"
done
rm -rf "$units"
for t in "${alone_units[@]}"; do
  run_doctest "unit: ${t#"$top"/}" "$t"
done

stage_took "the unit tests"

# The parsers (npy, HDF5 layer, torch.save reader, run-file checking) and
# their unit tests once more with AddressSanitizer and UBSan, plus a fuzz run
# over mutated inputs (tests/sanitize/). A separate meson project in
# build-asan/: only those sources are compiled, a few minutes. Any sanitizer
# report ends the executable with a non-zero status: a failure.
asan="$top/build-asan"
asan_build=0
if [ ! -f "$asan/build.ninja" ]; then
  CXX_LD=lld meson setup "$asan" tests/sanitize >"$top/build/asan-setup.log" 2>&1 || asan_build=1
fi
if [ "$asan_build" -eq 0 ]; then
  ninja -C "$asan" >"$top/build/asan-build.log" 2>&1 || asan_build=1
fi
if [ "$asan_build" -ne 0 ]; then
  tail -n 40 "$top/build/asan-setup.log" "$top/build/asan-build.log" 2>/dev/null
  echo "sanitize: the build of tests/sanitize failed: 0 passed, 1 failed"
  failed=$((failed + 1))
else
  while IFS= read -r t; do
    run_doctest "sanitize: ${t#"$top"/}" env ASAN_OPTIONS=halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=1 \
      UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 "$t"
  done < <(find "$asan" -maxdepth 1 -type f -executable -name 'asan_*' | sort)
fi

# Runs pytest on the integration tests with the arguments given (LABEL
# first), listing its 15 slowest test phases, and adds its test cases to
# the totals; no test selected (status 5) adds none, any other non-zero
# status without failed cases is a failure.
run_pytest() {
  local label=$1
  shift
  local report="$top/build/pytest-report-$label.txt" rc last p f e
  python -m pytest -q -p no:cacheprovider -o console_output_style=classic --durations=15 "$@" | tee "$report"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 5 ] && return
  last=$(grep -E '(passed|failed|error)' "$report" | tail -n 1)
  p=$(printf '%s' "$last" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || true)
  f=$(printf '%s' "$last" | grep -oE '[0-9]+ failed' | grep -oE '[0-9]+' || true)
  e=$(printf '%s' "$last" | grep -oE '[0-9]+ error' | grep -oE '[0-9]+' || true)
  p=${p:-0}
  f=$(( ${f:-0} + ${e:-0} ))
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
  passed=$((passed + p))
  failed=$((failed + f))
}

stage_took "the sanitizer build and tests"

# The integration tests run in $workers pytest-xdist workers (1: all in one
# process), a test file to a worker, so that a module's fixtures are made
# once; the longest files start first (conftest.py). Those marked `alone`
# bound how long something takes (a lost rank noticed within comm_timeout_s):
# they run afterwards, one by one.
if [ "$workers" = 1 ]; then
  run_pytest all tests/integration "$@"
else
  run_pytest parallel -n "$workers" --dist loadfile --no-loadscope-reorder -m "not alone" tests/integration "$@"
  run_pytest alone -m alone tests/integration "$@"
fi

stage_took "the integration tests"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
