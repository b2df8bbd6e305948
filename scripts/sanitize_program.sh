#!/usr/bin/env bash
# The whole program under AddressSanitizer and UndefinedBehaviorSanitizer:
# deepcam-host, deepcam-data, the core library, every plugin and the test
# plugins and probes, built in build-sanitize/ (CUDA off, asserts on), then
# every integration test run against that build. scripts/test.sh sanitizes
# only the parsers (tests/sanitize/); this finds memory errors anywhere in
# our code, on every path the integration tests take: many ranks, stop
# signals, resume, the readers' worker threads.
#
#   scripts/sanitize_program.sh            # about 15 minutes to build on 2 cores, 16 to test
#   scripts/sanitize_program.sh -k resume  # arguments go to pytest
#
# The verdict is the sanitizers' reports, not the tests' outcome (their
# FAILED lines are printed). Under the sanitizers some tests fail for reasons
# of their own: those that bound a time or a count of page faults, those that
# expect CUDA's wording, those that compile and run an SDK program (the ASan
# runtime must come first in a process), those that run a program under a
# memory limit (ASan cannot reserve its shadow memory there), and
# test_allocator's (ASan's runtime is the malloc, and the linker drops the
# then unneeded tcmalloc). The last line is
# "sanitize_program: N reports" and the exit status is non-zero when N > 0.
# Reports are kept in runs/sanitize/ (asan.PID, ubsan.PID).
#
# LibTorch, HDF5, Gloo and glibc are not instrumented: what they do wrong on
# their own is not seen, except through the calls ASan intercepts (memcpy,
# malloc and free, which catch a double free or a bad pointer from anyone).
set -uo pipefail
case "${1:-}" in -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 1

if ! scripts/setup.sh >/dev/null; then
  echo "sanitize_program: scripts/setup.sh failed"
  exit 1
fi
export PATH="$top/.venv/bin:$PATH"
build="$top/build-sanitize"
if [ ! -f "$build/build.ninja" ]; then
  # b_lundef=false: the plugins leave the sanitizers' symbols to the program.
  meson setup "$build" -Db_sanitize=address,undefined -Db_lundef=false -Dcuda=disabled -Dtests=true \
    -Dbuildtype=debugoptimized -Db_ndebug=false >/dev/null || { echo "sanitize_program: meson setup failed"; exit 1; }
fi
# Everything but the doctest executables (a LibTorch compile each, and their
# cases run in scripts/test.sh): the programs, the plugins, the tests' plugins
# and probes.
mapfile -t targets < <(meson introspect --targets "$build" | python -c '
import json, os, sys
for t in json.load(sys.stdin):
    if t["type"] in ("executable", "shared library", "shared module") and not t["name"].startswith("test_"):
        print(os.path.relpath(t["filename"][0], os.path.realpath(sys.argv[1])))' "$build")
ninja -C "$build" "${targets[@]}" || { echo "sanitize_program: the build failed"; exit 1; }
# No sanitizer in the program would make "0 reports" say nothing.
if ! ldd "$build/core/deepcam-host" | grep -q libasan; then
  echo "sanitize_program: $build/core/deepcam-host is not linked with ASan (b_sanitize changed?)"
  exit 1
fi

reports="$top/runs/sanitize"
rm -rf "$reports"
mkdir -p "$reports"
# Leaks found at exit count as reports too.
# allocator_may_return_null=1: a batch beyond the memory fails as the product
# says it does (std::bad_alloc), not as ASan's own abort.
export ASAN_OPTIONS="halt_on_error=1:allocator_may_return_null=1:log_path=$reports/asan"
export UBSAN_OPTIONS="print_stacktrace=1:log_path=$reports/ubsan"
export DEEPCAM_BUILD_DIR="$build"
export DEEPCAM_PLUGIN_PATH="$build/plugins"
# The Slurm scripts' programs (scripts/slurm/), which the Slurm tests run.
export DEEPCAM_HOST="$build/core/deepcam-host" DEEPCAM_DATA="$build/core/deepcam-data"
export OMP_WAIT_POLICY=PASSIVE
# pytest's status: 1 (tests failed) is expected here, as said above; 5 is
# "nothing collected"; 2 to 4 (interrupted, an internal error, a bad
# option) mean the tests did not run, and then "0 reports" would say nothing.
ran=0
for marks in "not alone" alone; do
  workers=()
  [ "$marks" = alone ] || workers=(-n 2 --dist loadfile)
  python -m pytest -q -p no:cacheprovider -o console_output_style=classic "${workers[@]}" -m "$marks" \
    tests/integration "$@" | grep -E '^(FAILED|ERROR) |[0-9]+ (passed|failed)|^ERROR|error:'
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0 | 1) ran=1 ;;
    5) ;;
    *) echo "sanitize_program: pytest did not run the tests (-m \"$marks\", status $rc)"; exit 1 ;;
  esac
done
if [ "$ran" -eq 0 ]; then
  echo "sanitize_program: pytest collected no test with these arguments: $*"
  exit 1
fi

# A test that runs a program under a memory limit (RLIMIT_DATA, ulimit -d)
# leaves a report that ASan could not reserve its shadow memory there: that
# process ran no code of ours, so it is listed apart, not counted.
n=0
for f in "$reports"/*; do
  [ -f "$f" ] || continue
  if grep -q "ReserveShadowMemoryRange failed" "$f"; then
    echo "not run under ASan (a memory limit): ${f#"$top"/}"
    continue
  fi
  n=$((n + 1))
  echo "--- ${f#"$top"/}"
  head -n 40 "$f"
done
echo "sanitize_program: $n reports"
[ "$n" -eq 0 ]
