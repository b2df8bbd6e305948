#!/usr/bin/env python3
"""Checkpoint memory (issue 13 section 2): the peak resident memory of a
full-size-model run with and without its end-of-run checkpoint.

The model and optimizer are configs/reference.toml's (the full DeepLabv3+,
56,454,720 parameters, LAMB: two state tensors per parameter) on a small
synthetic data set (2 training and 1 validation sample of 96 x 144 pixels,
written by deepcam-data synth into runs/bench-checkpoint), so that training
itself needs little memory and the checkpoint's share shows. Each run is one
epoch of one step on the CPU; its peak RSS is the kernel's ru_maxrss of the
process (os.wait4). The same run is made with `checkpoint_every = -1` (no
checkpoint) and with `0` (the checkpoint after run_stop); the difference is
what writing the checkpoint adds. Beside it, Python's torch.save of the same
checkpoint (loaded with torch.load first) in a fresh process, as the MLCommons
reference writes its checkpoints: its peak RSS minus the RSS once loaded.

Each figure is the median of --repeat runs; the row says how many. The rows
of the table are kept by --label (a later run with the same label replaces its
row), so that the figures before and after a change sit side by side in the
section "Checkpoint memory (issue 13 section 2)" of docs/benchmarks.md (--docs
names another file, --no-docs leaves it).

Usage:
  scripts/bench_checkpoint.py --label after            # 3 repeats
  scripts/bench_checkpoint.py --label before --repeat 1 --no-docs
"""

import argparse
import datetime
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
DATA_TOOL = BUILD / "core" / "deepcam-data"
PYTHON = REPO / ".venv" / "bin" / "python"
SECTION = "## Checkpoint memory (issue 13 section 2)"
ROW = re.compile(r"^\| (?P<label>[^|]+?) \| ")
# The header of tables written before the column "repeats": its --repeat was the last run's, which the
# rows it kept are taken to have had.
OLD_REPEAT = re.compile(r"^Written by `scripts/bench_checkpoint\.py --label LABEL --repeat (\d+)`")

PYTHON_SAVE = r"""
import resource, sys, torch
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
state = torch.load(sys.argv[1], map_location="cpu")
loaded = rss_mb()
torch.save(state, sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(loaded, peak)
"""


def run_peak_mb(cmd, env):
    """Runs `cmd` and returns its peak RSS in MiB (ru_maxrss of the child)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode not in (0, 1):
            out.seek(0)
            sys.exit(f"{shlex.join(map(str, cmd))} exited {proc.returncode}:\n{out.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1024


def host_run(data, out, checkpoint_every):
    if out.exists():
        for f in out.iterdir():
            f.unlink()
    cmd = [str(HOST), str(REPO / "configs" / "reference.toml"), "--quiet",
           "--set", f"data.root={data}", "--set", f"run.output_dir={out}", "--set", "run.device=cpu",
           "--set", "run.seed=1", "--set", "run.max_epochs=1", "--set", "run.target_iou=1.0",
           "--set", "run.threads=2", "--set", "reader.threads=1", "--set", "run.overwrite=true",
           "--set", f"run.checkpoint_every={checkpoint_every}"]
    env = {k: v for k, v in os.environ.items() if k != "DEEPCAM_PLUGIN_PATH"}
    return run_peak_mb(cmd, env), cmd


def kept_rows(docs, label):
    """The section's rows other than `label`'s, each with its repeat count in the third column; a row
    from before that column gets the count its table's header named, or "?"."""
    if not docs.exists():
        return []
    lines = docs.read_text().splitlines()
    if SECTION not in lines:
        return []
    rows, old_repeat = [], "?"
    for line in lines[lines.index(SECTION) + 1:]:
        if line.startswith("## "):
            break
        header = OLD_REPEAT.match(line)
        if header:
            old_repeat = header.group(1)
        match = ROW.match(line)
        if not match or line.startswith("| label") or line.startswith("|---") or match.group("label") == label:
            continue
        cells = line.strip().strip("|").split("|")
        if len(cells) == 7:  # label, commit, then the five figures: no repeats column yet
            cells.insert(2, f" {old_repeat} ")
        rows.append("|" + "|".join(cells) + "|")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True, help="the table row's name, e.g. before or after")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each kind, the median is shown (default 3)")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md",
                    help="the file whose section the row goes to (default docs/benchmarks.md)")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if not args.label.strip() or "|" in args.label:
        ap.error(f"--label {args.label!r}: must be a non-empty table cell, without '|'")
    args.label = args.label.strip()

    work = REPO / "runs" / "bench-checkpoint"
    data = work / "data"
    if not (data / "stats.h5").exists():
        try:
            run_tool([DATA_TOOL, "synth", "--out", data, "--train", "2", "--validation", "1", "--height", "96",
                      "--width", "144", "--seed", "1"])
        except ToolFailed as e:
            sys.exit(f"bench_checkpoint: making the set in {data}: {e}")
    without, with_ckpt, py_loaded, py_peak = [], [], [], []
    cmd = None
    checkpoint = work / "out-ckpt" / "checkpoint-epoch1.pt"
    for _ in range(args.repeat):
        peak, _ = host_run(data, work / "out-none", -1)
        without.append(peak)
        peak, cmd = host_run(data, work / "out-ckpt", 0)
        with_ckpt.append(peak)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                r = run_tool([PYTHON, "-c", PYTHON_SAVE, checkpoint, Path(tmp) / "copy.pt"])
            except ToolFailed as e:
                sys.exit(f"bench_checkpoint: torch.save of {checkpoint}: {e}")
            loaded, peak = map(float, r.stdout.split())
            py_loaded.append(loaded)
            py_peak.append(peak)
    size_mb = checkpoint.stat().st_size / 2**20
    m = statistics.median
    row = (f"| {args.label} | {commit(REPO)} | {args.repeat} | {m(without):.0f} | {m(with_ckpt):.0f} | "
           f"{m(with_ckpt) - m(without):.0f} | {size_mb:.0f} | {m(py_peak) - m(py_loaded):.0f} |")
    print(f"peak RSS without checkpoint {m(without):.0f} MiB, with checkpoint {m(with_ckpt):.0f} MiB "
          f"(+{m(with_ckpt) - m(without):.0f}); checkpoint {size_mb:.0f} MiB; Python torch.save of it "
          f"+{m(py_peak) - m(py_loaded):.0f} MiB over the loaded state")
    print(row)
    if args.no_docs:
        return

    rows = kept_rows(args.docs, args.label) + [row]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.machine()
    text = f"""{SECTION}

Written by `scripts/bench_checkpoint.py --label LABEL --repeat N`, each row's N in its column "repeats" (last row {when}, on {cpu}, {os.cpu_count()} cores). The full-size model and LAMB of configs/reference.toml, one step of one epoch on 96 x 144 pixels on the CPU, so that the checkpoint's share of the memory shows:

```
{shlex.join(str(c).replace(str(REPO) + "/", "") for c in cmd)}
```

Peak RSS (MiB, the process's ru_maxrss, median of the row's repeats) of that run with `checkpoint_every = -1` (no checkpoint) and `0` (the checkpoint after run_stop); the difference is what writing the checkpoint adds (near 0, either sign, when the peak is training's own: the peak varies by about 15 MiB from run to run). "Python torch.save" is the same checkpoint loaded by torch.load and saved again in a fresh process, as the MLCommons reference saves: its peak RSS minus its RSS once loaded. The commit is the checkout's HEAD when the row was measured; "before" is the writer that built the whole archive in memory (torch::jit's pickler and a growing byte vector), "after" the streaming writer (`save_torch`, core/train/torch_pickle.cpp), which writes each tensor's storage into the file from where it lies.

| label | commit | repeats | no checkpoint | with checkpoint | added by the checkpoint | checkpoint size | Python torch.save adds |
|---|---|---:|---:|---:|---:|---:|---:|
""" + "\n".join(rows) + "\n"
    write_docs(args.docs, SECTION, text)
    print(f"wrote {args.docs}")


if __name__ == "__main__":
    main()
