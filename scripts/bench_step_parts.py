#!/usr/bin/env python3
"""Times the training step's bookkeeping that issue 13 changed, each beside
the formulation it replaced, in one run of tests/probes/step_parts_probe:
the train IoU of a logged step (ATen's argmax over classes and masked counts,
before; argmax(softmax) by comparisons and one bincount, after) and the
divergence watch's global gradient norm over the reference model's
parameters (computed by the engine before; read from LAMB's own step after).
Each pair of columns is timed alternately in one loop, so that other work on
the machine slows both alike. Writes the table into docs/benchmarks.md (or
--docs) with the machine, its load and the command.

    .venv/bin/python scripts/bench_step_parts.py [--repeats N] [--docs FILE | --no-docs]
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

from bench_common import ToolFailed, commit, run_tool, write_docs

REPO = Path(__file__).resolve().parents[1]
HEADING = "## The step's bookkeeping: train IoU and the divergence watch"


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=21, help="timed runs of each column, the median is shown")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--build", type=Path, default=REPO / "build")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--no-docs", action="store_true", help="print only")
    args = ap.parse_args()
    for opt in ("repeats", "threads"):
        if getattr(args, opt) < 1:
            ap.error(f"--{opt} must be at least 1")
    probe = args.build / "tests" / "step_parts_probe"
    if not probe.is_file():
        ap.error(f"--build {args.build}: no {probe.relative_to(args.build)} in it; build it with "
                 f"ninja -C {args.build} tests/step_parts_probe")
    state_dict = REPO.parent / "shared" / "testdata" / "reference_state_dict.txt"
    command = "scripts/bench_step_parts.py" + ("" if len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:]))

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    load_before = os.getloadavg()[0]
    try:
        out = run_tool([probe, state_dict, args.repeats], env=env).stdout
    except ToolFailed as e:
        sys.exit(f"bench_step_parts: {e}")
    load_after = os.getloadavg()[0]
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    table = ["| part | input | before (ms) | after (ms) | before / after |", "|---|---|---|---|---|"]
    for r in rows:
        what = (f"logits {tuple(r['shape'])}" if "shape" in r
                else f"{r['tensors']} gradients, {r['elements']:,} elements")
        after = r["after_ms"]
        ratio = f"{r['before_ms'] / after:.1f}x" if after > 0 else "not computed any more (LAMB)"
        if "same_scores" in r and not r["same_scores"]:
            raise SystemExit(f"the two IoU formulations disagree on {what}")
        table.append(f"| {r['part']} | {what} | {r['before_ms']:.2f} | {after:.2f} | {ratio} |")
    print("\n".join(table))
    if args.no_docs:
        return
    when = datetime.date.today().isoformat()
    text = "\n".join([
        HEADING, "",
        f"Measured {when} on {cpu_name()} ({os.cpu_count()} cores, {args.threads} threads), commit "
        f"{commit(REPO)}, load average {load_before:.1f} before and {load_after:.1f} after (other work on the "
        "machine slows both columns alike: they run interleaved in one process). Medians of "
        f"{args.repeats} runs.", "",
        f"Command: `{command}`", "",
        *table, "",
        "The IoU is computed once per logged step (for the MLPerf log and the progress line together); "
        "before, each step of the watch also computed the global gradient norm that a LAMB step computes "
        "for its clipping anyway. Both IoU columns give the same scores on these random logits (the new one "
        "is the reference's argmax(softmax) exactly, also at near-ties, where argmax of the logits is not).",
    ])
    write_docs(args.docs, HEADING, text)


if __name__ == "__main__":
    main()
