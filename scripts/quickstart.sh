#!/usr/bin/env bash
# The default job on a fresh machine: set up and build, write the small
# synthetic data set once, train configs/quickstart.toml on CPU, check its
# MLPerf log with the official checker, and print how long it all took.
# Extra arguments go to deepcam-host (e.g. --set run.max_epochs=3). Exit
# status: deepcam-host's (1 target not reached, 4 diverged, 130 Ctrl-C, ...),
# whatever the checker says.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
start=$(date +%s)
scripts/setup.sh
export DEEPCAM_PLUGIN_PATH="$top/build/plugins"
data=runs/quickstart-data
if [ ! -f "$data/stats.h5" ]; then
  build/core/deepcam-data synth --out "$data" --train 64 --validation 16 --height 96 --width 144 --seed 11
fi
trained=$(date +%s)
# deepcam-host's last line on stderr names its MLPerf log ("deepcam-host: wall
# time ... s; log PATH"); that log is the one to check, wherever the extra
# arguments sent it (run.output_dir, mlperf.log_file), and none is checked when
# the host stopped before naming one: an older log would say nothing of this run.
# Its stderr goes through tee into $said; tee ignores SIGINT, so that Ctrl-C
# stops the run (status 130) and not the copy of what it says.
said=$(mktemp)
trap 'rm -f "$said"' EXIT
status=0
exec 3>&1
# A second quickstart replaces the first one's log and checkpoint.
build/core/deepcam-host configs/quickstart.toml --set run.overwrite=true "$@" 2>&1 >&3 3>&- |
  (trap '' INT; exec tee "$said") >&2 3>&- || status=${PIPESTATUS[0]}
exec 3>&-
end=$(date +%s)
log=$(sed -n 's/^deepcam-host: wall time [0-9.]* s; log //p' "$said" | tail -n 1)
if [ -n "$log" ] && [ -f "$log" ]; then
  # The checker writes compliance_checker.log into its working directory. It
  # exits 1 on a log that fails (a run that diverged or stopped short of the
  # target), which must not end this script before the timing line: the host's
  # status is this script's. Its verdict is not its last line.
  verdict=$(cd "$(dirname "$log")" && "$top/.venv/bin/python" -m mlperf_logging.compliance_checker --usage hpc \
     --ruleset 3.0.0 "$(basename "$log")" 2>&1 | grep -E ' - (SUCCESS|FAILED)$' | tail -n 1) || true
  echo "${verdict:-quickstart: the MLPerf compliance checker gave no verdict}"
  [[ "$verdict" == *SUCCESS ]] || echo "quickstart: the checker's reasons: $(dirname "$log")/compliance_checker.log"
else
  log="none (deepcam-host exited with status $status before naming one)"
fi
echo "quickstart: training took $((end - trained)) s; everything took $((end - start)) s (log: $log)"
exit $status
