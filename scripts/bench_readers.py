#!/usr/bin/env python3
"""Compares the readers on one data set: trains with each reader set-up for
the same epochs and model and prints the training throughput of each.

The host has no read-only mode, so what is measured is the rate the whole
training step reaches with each reader: a reader that keeps up gives the
model's own rate, a slower one lowers it. Differences therefore show when
the model step is fast (a GPU, --device cuda) or the file system is slow;
on a CPU with a small model they mostly measure the model. Run it on an
otherwise idle machine: with other jobs on the cores the numbers are noise.

Set-ups (--readers picks some; all by default):
  hdf5                  the HDF5 files, the hdf5 reader's threads
  npy-mmap              the .npy form, memory-mapped (page cache)
  npy-direct            the .npy form, O_DIRECT (no page cache)
  prefetch-hdf5         the prefetch ring over the hdf5 reader
  prefetch-npy-mmap     the prefetch ring over npy mmap
  prefetch-npy-direct   the prefetch ring over npy O_DIRECT

Usage:
  scripts/bench_readers.py --data /data/h5 [--npy /data/npy] [--device cuda]
  scripts/bench_readers.py                      # a small synthetic set in a temporary folder

--data is a data set in HDF5 form; its .npy form is --npy, or made with
`deepcam-data convert` into a temporary folder beside the runs. With
--drop-caches (root only) the page cache is emptied before each run, so
every set-up starts cold. The table goes to stdout; --json also writes the
numbers to a file. The exit status is non-zero if any run failed (its
error is shown in the table).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SETUPS = {
    "hdf5": ("h5", {"name": "hdf5"}, None),
    "npy-mmap": ("npy", {"name": "npy", "io": "mmap"}, None),
    "npy-direct": ("npy", {"name": "npy", "io": "direct"}, None),
    "prefetch-hdf5": ("h5", {"name": "prefetch"}, {"name": "hdf5", "threads": 1}),
    "prefetch-npy-mmap": ("npy", {"name": "prefetch"}, {"name": "npy", "io": "mmap", "threads": 1}),
    "prefetch-npy-direct": ("npy", {"name": "prefetch"}, {"name": "npy", "io": "direct", "threads": 1}),
}

PROGRESS = re.compile(r"^epoch (\d+) step (\d+)/(\d+) .* ([0-9.]+) samples/s")
RUN_TOOK = re.compile(r"run took ([0-9.]+) s")


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def run_file(args, setup, data_root, output_dir):
    _, reader, source = SETUPS[setup]
    reader = dict(reader)
    if reader["name"] == "prefetch":
        reader.update({"threads": args.threads, "depth": args.depth})
    else:
        reader["threads"] = args.threads
    tables = {
        "run": {"seed": 1, "output_dir": str(output_dir), "max_epochs": args.epochs, "target_iou": 1.0,
                "logging_frequency": args.logging_frequency, "train_batch_size": args.batch_size,
                "validation_batch_size": args.batch_size, "device": args.device, "threads": 0,
                "checkpoint_every": 0},
        "data": {"root": str(data_root)},
        "reader": reader,
        "model": {"name": "deeplabv3plus", "width": args.model_width, "middle_blocks": args.middle_blocks},
        "optimizer": {"name": "adam", "lr": 0.001},
        "scheduler": {"name": "multistep", "milestones": [1000000]},
        "mlperf": {"org": "bench", "platform": args.device, "division": "open", "status": "research"},
    }
    lines = []
    for name, keys in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {'[' + ', '.join(map(str, v)) + ']' if isinstance(v, list) else toml_value(v)}"
                  for k, v in keys.items()]
        if name == "reader" and source:
            lines.append("[reader.source]")
            lines += [f"{k} = {toml_value(v)}" for k, v in source.items()]
        lines.append("")
    return "\n".join(lines)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def bench(args, setup, data_root, work):
    output_dir = work / f"run-{setup}"
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    toml = output_dir / "run.toml"
    toml.write_text(run_file(args, setup, data_root, output_dir))
    if args.drop_caches:
        drop_caches()
    env = dict(os.environ, DEEPCAM_PLUGIN_PATH=str(args.build_dir / "plugins"))
    start = time.monotonic()
    proc = subprocess.run([str(args.build_dir / "core" / "deepcam-host"), str(toml)], capture_output=True,
                          text=True, env=env)
    wall = time.monotonic() - start
    result = {"setup": setup, "wall_s": round(wall, 2)}
    # Exit status 1 is "target not reached", which target_iou = 1.0 makes sure of.
    if proc.returncode not in (0, 1) or not RUN_TOOK.search(proc.stderr):
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        result["error"] = last
        return result
    # Each progress line gives the mean rate since the start of its epoch;
    # the last line of each epoch is that epoch's rate, the first epoch's
    # includes the warm-up (first reads, allocator, CUDA kernels).
    per_epoch = {}
    for line in proc.stderr.splitlines():
        m = PROGRESS.match(line)
        if m:
            per_epoch[int(m.group(1))] = float(m.group(4))
        m = RUN_TOOK.search(line)
        if m:
            result["run_s"] = float(m.group(1))
    rates = [per_epoch[e] for e in sorted(per_epoch)]
    result["samples_per_s_by_epoch"] = rates
    steady = rates[1:] or rates
    result["samples_per_s"] = round(statistics.median(steady), 2) if steady else None
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", type=Path, help="data set in HDF5 form (default: a synthetic one)")
    p.add_argument("--npy", type=Path, help="the same set in .npy form (default: converted from --data)")
    p.add_argument("--readers", default=",".join(SETUPS), help="comma-separated set-ups (default: all)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2; the first is warm-up)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=4, help="reader threads (default 4)")
    p.add_argument("--depth", type=int, default=4, help="prefetch ring depth (default 4)")
    p.add_argument("--model-width", type=float, default=None,
                   help="model width (default 1.0 on cuda, 0.0625 on cpu)")
    p.add_argument("--middle-blocks", type=int, default=None, help="default 16 on cuda, 1 on cpu")
    p.add_argument("--logging-frequency", type=int, default=4)
    p.add_argument("--samples", type=int, default=16, help="synthetic set: training samples (default 16)")
    p.add_argument("--height", type=int, default=192, help="synthetic set: height (default 192)")
    p.add_argument("--width", type=int, default=288, help="synthetic set: width (default 288)")
    p.add_argument("--drop-caches", action="store_true", help="empty the page cache before each run (root)")
    p.add_argument("--work", type=Path, help="folder for runs and made data (default: a temporary one)")
    p.add_argument("--build-dir", type=Path, default=Path(os.environ.get("DEEPCAM_BUILD_DIR", REPO / "build")))
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    setups = [s.strip() for s in args.readers.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        p.error(f"--readers: unknown set-up(s) {', '.join(unknown)}; choose from {', '.join(SETUPS)}")
    if args.model_width is None:
        args.model_width = 1.0 if args.device == "cuda" else 0.0625
    if args.middle_blocks is None:
        args.middle_blocks = 16 if args.device == "cuda" else 1
    if args.drop_caches and os.geteuid() != 0:
        p.error("--drop-caches needs root (it writes /proc/sys/vm/drop_caches)")
    tool = args.build_dir / "core" / "deepcam-data"
    if not tool.is_file():
        p.error(f"{tool} is not built; run scripts/setup.sh or ninja -C {args.build_dir}")

    temp = None
    if args.work is None:
        temp = tempfile.TemporaryDirectory(prefix="bench_readers.")
        args.work = Path(temp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        h5_root = args.data
        if h5_root is None:
            h5_root = args.work / "h5"
            if not h5_root.exists():
                print(f"bench_readers: writing a synthetic set ({args.samples} samples, "
                      f"{args.height}x{args.width}) to {h5_root}", file=sys.stderr)
                subprocess.run([str(tool), "synth", "--out", str(h5_root), "--train", str(args.samples),
                                "--validation", str(max(2, args.samples // 4)), "--height", str(args.height),
                                "--width", str(args.width)], check=True, capture_output=True)
        npy_root = args.npy
        if npy_root is None and any(SETUPS[s][0] == "npy" for s in setups):
            npy_root = args.work / "npy"
            print(f"bench_readers: converting {h5_root} to {npy_root}", file=sys.stderr)
            # Resumable: a second run over the same --work reuses the files.
            subprocess.run([str(tool), "convert", str(h5_root), str(npy_root)], check=True,
                           capture_output=True)

        results = []
        for setup in setups:
            root = h5_root if SETUPS[setup][0] == "h5" else npy_root
            print(f"bench_readers: {setup} ...", file=sys.stderr)
            results.append(bench(args, setup, root, args.work))

        print(f"\n{args.device}, model width {args.model_width}, middle blocks {args.middle_blocks}, "
              f"batch {args.batch_size}, reader threads {args.threads}, {args.epochs} epochs"
              f"{', cold page cache' if args.drop_caches else ''}\n")
        print(f"| {'set-up':<20} | {'samples/s':>10} | {'per epoch':<24} | {'run s':>7} |")
        print(f"|{'-' * 22}|{'-' * 12}|{'-' * 26}|{'-' * 9}|")
        for r in results:
            if "error" in r:
                print(f"| {r['setup']:<20} | {'failed':>10} | {r['error']}")
                continue
            by_epoch = ", ".join(f"{x:g}" for x in r["samples_per_s_by_epoch"])
            print(f"| {r['setup']:<20} | {r['samples_per_s'] or 0:>10.2f} | {by_epoch:<24} | "
                  f"{r.get('run_s', r['wall_s']):>7.1f} |")
        if args.json:
            args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                             "results": results}, indent=2))
        return 1 if any("error" in r for r in results) else 0
    finally:
        if temp is not None:
            temp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
