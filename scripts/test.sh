#!/usr/bin/env bash
# Runs every test: set-up and build first (scripts/setup.sh), then each doctest
# unit-test executable in build/, then the integration tests (pytest), which
# run deepcam-host and deepcam-data and check their files with h5py, torch and
# the official mlperf-logging checker. The last line is "N passed, N failed"
# (test cases); the exit status is non-zero when anything failed.
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

if ! scripts/setup.sh; then
  echo "0 passed, 1 failed"
  exit 1
fi
export PATH="$top/.venv/bin:$PATH"
export DEEPCAM_BUILD_DIR="$top/build"
# Only the build tree's plugins are seen by the tests.
export DEEPCAM_PLUGIN_PATH="$top/build/plugins"

passed=0
failed=0
while IFS= read -r t; do
  out=$("$t" 2>&1)
  rc=$?
  summary=$(printf '%s\n' "$out" | grep '\[doctest\] test cases:' | tail -n 1)
  p=$(printf '%s' "$summary" | sed -n 's/.*| *\([0-9]*\) passed.*/\1/p')
  f=$(printf '%s' "$summary" | sed -n 's/.*| *\([0-9]*\) failed.*/\1/p')
  p=${p:-0}
  f=${f:-0}
  # A crash or a non-zero exit without failed cases still counts as a failure.
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
  if [ "$f" -ne 0 ]; then
    printf '%s\n' "$out" | tail -n 60
  fi
  echo "unit: ${t#"$top"/}: $p passed, $f failed"
  passed=$((passed + p))
  failed=$((failed + f))
done < <(find "$top/build" -type f -executable -name 'test_*' ! -name '*.so' ! -path '*.p/*' | sort)

report="$top/build/pytest-report.txt"
python -m pytest -q -p no:cacheprovider -o console_output_style=classic tests/integration "$@" | tee "$report"
rc=${PIPESTATUS[0]}
last=$(grep -E '(passed|failed|error)' "$report" | tail -n 1)
p=$(printf '%s' "$last" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || true)
f=$(printf '%s' "$last" | grep -oE '[0-9]+ failed' | grep -oE '[0-9]+' || true)
e=$(printf '%s' "$last" | grep -oE '[0-9]+ error' | grep -oE '[0-9]+' || true)
p=${p:-0}
f=$(( ${f:-0} + ${e:-0} ))
if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
passed=$((passed + p))
failed=$((failed + f))

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
