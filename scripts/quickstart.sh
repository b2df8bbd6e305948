#!/usr/bin/env bash
# The default job on a fresh machine: set up and build, write the small
# synthetic data set once, train configs/quickstart.toml on CPU, check its
# MLPerf log with the official checker, and print how long it all took.
# Extra arguments go to deepcam-host (e.g. --set run.max_epochs=3).
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
status=0
# A second quickstart replaces the first one's log and checkpoint.
build/core/deepcam-host configs/quickstart.toml --set run.overwrite=true "$@" || status=$?
end=$(date +%s)
log=runs/quickstart/mlperf.log
if [ -f "$log" ]; then
  # The checker writes compliance_checker.log into its working directory.
  (cd "$(dirname "$log")" && "$top/.venv/bin/python" -m mlperf_logging.compliance_checker --usage hpc \
     --ruleset 3.0.0 "$(basename "$log")" 2>&1 | tail -n 1)
fi
echo "quickstart: training took $((end - trained)) s; everything took $((end - start)) s (log: $log)"
exit $status
