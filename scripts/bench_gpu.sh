#!/usr/bin/env bash
# The GPU benchmark of issue 8 section 5, in one go on a GPU machine:
# deepcam-host --benchmark at local batch 1 and 8 for every precision and
# memory format, beside the MLCommons reference's training step (PyTorch
# eager, the same precision, memory format, batch and device), written to
# docs/benchmarks.md with the GPU's name and this command
# (scripts/bench_step.py does the measuring; see its header).
#
#   REF=peers/hpc scripts/bench_gpu.sh          # REF: a checkout of mlcommons/hpc
#
# DOCS names another file to write the tables to (scripts/gpu_check.sh
# writes them under its $OUT); STEPS the timed steps (default 20); BATCHES
# the local batches (default "8 1": the goal's batch first; one at a time
# splits the run).
#
# deepcam-host runs each with CUDA graphs off and on (amp_fp16 only off: its
# loss scaler's skip decision cannot be captured); the reference is eager.
# This script has not yet run on a GPU: no GPU machine was lent to the
# sessions that wrote it; its CPU counterpart is `scripts/bench_step.py`.
set -euo pipefail
case "${1:-}" in
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  ?*) echo "bench_gpu: takes no arguments (settings are environment variables: REF, DOCS, STEPS, BATCHES); see --help" >&2
      exit 2 ;;
esac
top=$(cd "$(dirname "$0")/.." && pwd)
ref=${REF:-$top/peers/hpc}
python=${PYTHON:-$top/.venv/bin/python}
[ -x "$python" ] || python=python3
# The goal's set-ups first (>= 100 samples/s at batch 8, >= 1.3x the reference's
# AMP + channels_last): bench_step.py writes the table after each precision and
# memory format, so a run stopped by a deadline keeps those.
setups=amp_bf16:channels_last,amp_bf16:channels_last:graphs,amp_fp16:channels_last
setups+=,fp32:channels_last,fp32:channels_last:graphs,fp32:contiguous,fp32:contiguous:graphs
setups+=,amp_bf16:contiguous,amp_bf16:contiguous:graphs,amp_fp16:contiguous
for batch in ${BATCHES:-8 1}; do
  "$python" "$top/scripts/bench_step.py" --ref "$ref" --device cuda --threads 8 --batch "$batch" \
    --steps "${STEPS:-20}" --setups "$setups" \
    --docs "${DOCS:-$top/docs/benchmarks.md}" --section "## Training step on a GPU, local batch $batch (issue 8 section 5)"
done
