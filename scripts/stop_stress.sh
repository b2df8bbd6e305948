#!/usr/bin/env bash
# Stops a training run with SIGTERM at a random moment, many times over, and
# reports every stop that was not clean: an exit status other than 143
# (128 + SIGTERM), a rank killed by a signal other than SIGTERM itself (one
# that comes before a rank has set its handler ends it by the default
# action, as intended), or glibc's word on a corrupted heap. It was written
# for a heap corruption on the stop path, found and fixed (README, SIGTERM):
# a failure that rare shows only over many stops.
#
#   scripts/stop_stress.sh [STOPS] [RANKS]    # default 100 stops of 2 ranks
#
# Each stop trains the quickstart model on a small synthetic set (checkpoints
# every epoch) in a scratch folder (WORK, default /tmp/deepcam-stop-stress)
# and sends SIGTERM after 1 to 6 s. The log of a bad stop is kept there as
# bad-N.txt; with core dumps allowed (ulimit -c unlimited) the first stop
# that dumps one ends the script, leaving the core in WORK for gdb. Exits 1
# when any stop was bad.
set -uo pipefail
usage="usage: scripts/stop_stress.sh [STOPS] [RANKS]   (default 100 stops of 2 ranks; WORK=DIR for the scratch folder)"
case "${1:-}" in -h | --help) echo "$usage"; exit 0 ;; esac
top=$(cd "$(dirname "$0")/.." && pwd)
stops=${1:-100}
ranks=${2:-2}
work=${WORK:-/tmp/deepcam-stop-stress}
host="$top/build/core/deepcam-host"
if [ $# -gt 2 ] || ! [[ "$stops" =~ ^[1-9][0-9]*$ && "$ranks" =~ ^[1-9][0-9]*$ ]]; then
  echo "stop_stress: STOPS and RANKS are whole numbers of at least 1; $usage" >&2
  exit 2
fi
[ -x "$host" ] || { echo "stop_stress: no $host: build first (scripts/setup.sh)" >&2; exit 2; }
mkdir -p "$work"
cd "$work" || exit 2
rm -f bad-*.txt core core.*
# The set an earlier run here wrote is used again (synth refuses a finished set).
if [ ! -f data/stats.h5 ]; then
  "$top/build/core/deepcam-data" synth --out data --train 16 --validation 4 --seed 3 --height 64 --width 96 \
    >/dev/null || exit 2
fi
launch=()
[ "$ranks" -gt 1 ] && launch=(--nproc "$ranks")
bad=0
for i in $(seq 1 "$stops"); do
  rm -rf out
  DEEPCAM_PLUGIN_PATH="$top/build/plugins" OMP_WAIT_POLICY=PASSIVE "$host" "${launch[@]}" \
    "$top/configs/quickstart.toml" --set "data.root=$work/data" --set "run.output_dir=$work/out" \
    --set run.threads=1 --set run.checkpoint_every=1 --set run.max_epochs=50 >log.txt 2>&1 &
  pid=$!
  sleep "$(awk -v s="$RANDOM" 'BEGIN { printf "%.2f", 1 + 5 * s / 32767 }')"
  kill -TERM "$pid"
  wait "$pid"
  rc=$?
  if [ "$rc" -ne 143 ] || grep -qiE "corrupt|double free|segmentation|core dumped|terminate called|invalid pointer" log.txt ||
     { grep "killed by signal" log.txt | grep -qv "signal 15 "; } ||
     { grep "exited with status" log.txt | grep -qv "status 143"; }; then
    bad=$((bad + 1))
    cp log.txt "bad-$i.txt"
    echo "stop $i: exit status $rc (log: $work/bad-$i.txt)"
    grep -iE "corrupt|double free|segmentation|terminate called|killed by|exited with status" log.txt | head -n 3
    dumped=0
    for f in core core.*; do [ -e "$f" ] && dumped=1; done
    if [ "$dumped" -eq 1 ]; then
      echo "stop_stress: a core was dumped in $work; stopping here"
      break
    fi
  fi
done
echo "stop_stress: $bad bad of $i stops ($ranks rank(s))"
[ "$bad" -eq 0 ]
