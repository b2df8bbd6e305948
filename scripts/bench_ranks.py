#!/usr/bin/env python3
"""The many-ranks benchmark of issue 7 section 5: training throughput of one
rank and of two ranks (deepcam-host --nproc 2, Gloo) on this machine's CPU,
one thread each, at the same local batch, in one run, and the time per
optimizer step that rank 0 spends waiting for the gradient all-reduce.

The model and data are the quickstart's (configs/quickstart.toml: a
scaled-down DeepLabv3+ at 96 x 144 pixels, written by deepcam-data synth
into runs/bench-ranks). Each measurement is a separate run of --epochs
epochs; its step time is the training time of the epochs after the first
(epoch_start to eval_start in the MLPerf log, so validation and start-up are
left out) divided by the steps they took. The one- and two-rank runs
alternate --repeat times and each figure is the median.

The goal: the all-reduce overlaps the backward pass, so the two-rank step
time stays within 15 % of the one-rank step time (each rank then does the
one rank's work on its own core, plus the exchange). Printed with PASS/FAIL,
the machine and the command, and written to the section "Many ranks (issue 7
section 5)" of docs/benchmarks.md (--no-docs leaves it).

Run it on an otherwise idle machine: two ranks need both cores.

Usage:
  scripts/bench_ranks.py                       # 3 repeats of 4 epochs each
  scripts/bench_ranks.py --repeat 1 --epochs 2 --no-docs
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import ToolFailed, commit, run_tool, write_docs

REPO = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("DEEPCAM_BUILD_DIR", REPO / "build"))
HOST = BUILD / "core" / "deepcam-host"
SECTION = "## Many ranks (issue 7 section 5)"
WAIT = re.compile(r"gradient all-reduce over (\d+) ranks: ([0-9.]+) ms waited per optimizer step")


def events(log):
    return [json.loads(l.split(":::MLLOG ", 1)[1]) for l in Path(log).read_text().splitlines() if ":::MLLOG" in l]


def describe_set(data):
    """(training samples, height, width) of the set in `data`: what was measured, which a set made by an
    earlier run with other --train or sizes decides, not this run's options."""
    files = sorted((Path(data) / "train").glob("*.h5"))
    if not files:
        raise ValueError(f"{Path(data) / 'train'} holds no .h5 files")
    import h5py
    with h5py.File(files[0], "r") as f:
        height, width = f["climate/data"].shape[:2]
    return len(files), height, width


def one_run(ranks, data, out, args):
    """Returns (seconds per step, samples/s over all ranks, ms waited in all-reduce per step or None)."""
    cmd = [str(HOST)] + (["--nproc", str(ranks)] if ranks > 1 else []) + [
        str(REPO / "configs" / "quickstart.toml"),
        "--set", f"data.root={data}", "--set", f"run.output_dir={out}",
        "--set", "run.threads=1", "--set", "reader.threads=1",
        "--set", f"run.max_epochs={args.epochs}", "--set", "run.target_iou=1.0",
        "--set", "run.logging_frequency=0", "--set", f"run.train_batch_size={args.batch}",
        "--set", "run.validation_batch_size=8"]
    env = dict(os.environ, DEEPCAM_PLUGIN_PATH=str(BUILD / "plugins"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode not in (0, 1):
        sys.exit(f"bench_ranks: {shlex.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    ev = events(Path(out) / "mlperf.log")
    starts = {e["metadata"]["epoch_num"]: e["time_ms"] for e in ev if e["key"] == "epoch_start"}
    evals = {e["metadata"]["epoch_num"]: e["time_ms"] for e in ev if e["key"] == "eval_start"}
    steps = {e["metadata"]["epoch_num"]: e["metadata"]["step_num"] for e in ev if e["key"] == "epoch_stop"}
    measured = [n for n in sorted(starts) if n > 1]
    seconds = sum(evals[n] - starts[n] for n in measured) / 1000.0
    n_steps = steps[measured[-1]] - steps[1]
    m = WAIT.search(r.stdout + r.stderr)
    wait = float(m.group(2)) if m else None
    return seconds / n_steps, args.batch * ranks * n_steps / seconds, wait


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--repeat", type=int, default=3, help="runs of each rank count, the median is shown")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not measured")
    p.add_argument("--batch", type=int, default=4, help="local (per-rank) batch size")
    p.add_argument("--train", type=int, default=64, help="training samples when making the data set")
    p.add_argument("--data", type=Path, default=REPO / "runs" / "bench-ranks" / "data")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    for opt in ("repeat", "batch", "train"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt} must be at least 1")
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first is not measured)")
    if args.data.exists() and not args.data.is_dir():
        p.error(f"--data {args.data} is not a directory")
    make_data = not (args.data / "stats.h5").exists()
    # Two ranks share the set: each needs a batch of its own, or deepcam-host refuses the run after the
    # one-rank runs have been made.
    if make_data and args.train < 2 * args.batch:
        p.error(f"--train must be at least twice --batch (each of two ranks reads a batch): {args.train} < "
                f"2 x {args.batch}")
    if make_data:
        try:
            run_tool([BUILD / "core" / "deepcam-data", "synth", "--out", args.data, "--train", args.train,
                      "--validation", "8", "--height", "96", "--width", "144", "--seed", "11"])
        except ToolFailed as e:
            p.error(f"--data {args.data}: making the set: {e}")
    try:
        data_set = describe_set(args.data)
    except (ValueError, OSError) as e:
        p.error(f"--data {args.data}: {e}")
    if data_set[0] < 2 * args.batch:
        p.error(f"--data {args.data} holds {data_set[0]} training samples, fewer than twice --batch {args.batch} "
                "(each of two ranks reads a batch)")
    results = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        for i in range(args.repeat):
            for ranks in (1, 2):
                results[ranks].append(one_run(ranks, args.data, Path(tmp) / f"r{ranks}-{i}", args))
                print(f"run {i + 1}/{args.repeat}, {ranks} rank(s): {results[ranks][-1][0] * 1e3:.1f} ms/step",
                      flush=True)
    text = report(args, results, *data_set)
    print(text)
    if not args.no_docs:
        write_docs(args.docs, SECTION, text)
    return 0


def report(args, results, samples, height, width):
    """The section's text from each rank count's runs [(s per step, samples/s, wait ms or None)] and the
    set's size (describe_set)."""
    med = {r: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v),
               statistics.median(x[2] for x in v) if v[0][2] is not None else None) for r, v in results.items()}
    ratio = med[2][0] / med[1][0]
    verdict = "PASS" if ratio <= 1.15 else "FAIL"
    command = "scripts/bench_ranks.py " + shlex.join(sys.argv[1:])
    load = os.getloadavg()[0]
    lines = [SECTION, "",
             f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with `{command.strip()}` "
             f"(commit {commit(REPO)}) on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"load average {load:.2f} at the end.", "",
             f"The quickstart model (configs/quickstart.toml) at {height} x {width} pixels, {samples} training "
             f"samples, local batch {args.batch}, one LibTorch thread and one reader thread per rank, Gloo over "
             "loopback. "
             f"Each figure is the median of {args.repeat} runs of {args.epochs} epochs; the first epoch of each "
             "run is not counted, nor validation. samples/s counts all ranks.", "",
             "| ranks | ms per step | samples/s | all-reduce wait per step (ms) |", "|---:|---:|---:|---:|"]
    for r in (1, 2):
        wait = "–" if med[r][2] is None else f"{med[r][2]:.2f}"
        lines.append(f"| {r} | {med[r][0] * 1e3:.1f} | {med[r][1]:.1f} | {wait} |")
    lines += ["", f"Two-rank step time / one-rank step time: {ratio:.3f} (goal <= 1.15: {verdict}). "
              "The wait is rank 0's time in GradientAllReduce::finish(), after its backward pass, for buckets "
              "still being exchanged.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
