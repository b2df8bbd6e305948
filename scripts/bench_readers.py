#!/usr/bin/env python3
"""The reader benchmark (issue 3 section 7, issue 13 sections 3 and 4): our
readers side by side with h5py, numpy.load and `cat` on one synthetic data set
at full resolution (at least 2 GB), all measured here, in one run, on the
machine the table names.

Every measurement runs in its own process and reads the training split once
(the same files for all: the HDF5 files, or their .npy conversion). What each
row does:

  hdf5, npy-mmap, npy-pread,        `deepcam-data read` of a run file with that
  npy-direct, prefetch-hdf5,        reader (no model): read, select, normalise
  prefetch-npy-mmap,                and transpose into (B, C, H, W) float32
  prefetch-npy-pread,               batches and int64 labels; its JSON line
  prefetch-npy-direct               gives samples/s, GB/s and peak RSS
  hdf5-nhwc, npy-mmap-nhwc,         the same with [run] memory_format =
  prefetch-npy-mmap-nhwc            "channels_last": normalised, not transposed
  h5py, h5py-threads                read only: h5py reading climate/data and
                                    climate/labels_0 of each file into numpy
                                    arrays, in one thread / a pool of --threads
  h5py-normalise,                   read and normalise as the reference does:
  h5py-normalise-threads            scale * (x - shift) in float32, transposed
                                    to (C, H, W) contiguous, labels as int64
  numpy.load, numpy.load-threads    read only: numpy.load of data-X.npy and
                                    label-X.npy
  numpy.load-normalise,             read and normalise as the reference does
  numpy.load-normalise-threads
  cat                               `cat FILES > /dev/null`: reading the same
                                    bytes and writing nothing
  dd-direct                         `dd iflag=direct bs=4M` of each .npy file:
                                    the raw limit without the page cache, which
                                    io = "direct" reads bypass

each with a warm page cache (the files read once before, untimed) and a
cold one (`echo 3 > /proc/sys/vm/drop_caches` before; root only: where that
file cannot be written the cold rows are left out and the output says so).
Each cell is the median of --repeat runs. GB/s counts the bytes of the files
on disk (1 GB = 1e9 bytes); peak RSS is the process's maximum resident set
(wait4), which for memory-mapped reads includes the mapped file pages the
process touched, and for deepcam-data includes LibTorch (about 350 MB).

Then the prefetch test: `deepcam-data read --consume-matched
--with-validation` over the prefetch reader, whose consumer spends as long
per batch as a read takes (the mean time per batch of a first epoch without
consumer), each training epoch followed by a validation pass as the engine
calls the reader, warm cache: the fraction of time the consumer waits in
start_epoch() and next().

Goals, warm page cache: the hdf5 reader at least as fast as h5py's raw read
(the faster of one thread and --threads), the npy reader at >= 70 % of
`cat` (issue 13); the prefetch reader's consumer waiting < 5 % of the time
(issue 3). Each is printed as "met" or "not met" with its figures, with the
table, the machine (CPU model), the date and the command, and written to the
section "Readers (issue 3 section 7)" of docs/benchmarks.md (the rest of that
file is kept; --no-docs leaves it).

Run it when the machine is otherwise idle: it records the load average and
whether compilers are running, and numbers taken beside other jobs are noise.

Usage:
  scripts/bench_readers.py                          # makes runs/bench-readers/{h5,npy} (2.4 GB each), measures
  scripts/bench_readers.py --data DIR               # uses DIR/h5 (made if missing) and DIR/npy
  scripts/bench_readers.py --data /tmp/small --train 4 --height 96 --width 144 --repeat 1 --no-docs   # a dry run
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import ToolFailed, run_tool, write_docs

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Readers (issue 3 section 7)"
MIN_BYTES = 2e9

# name: (files, [reader] table, [reader.source] table or None); threads/depth filled in later.
# A name ending in -nhwc runs with [run] memory_format = "channels_last".
READERS = {
    "hdf5": ("h5", {"name": "hdf5"}, None),
    "hdf5-nhwc": ("h5", {"name": "hdf5"}, None),
    "npy-mmap": ("npy", {"name": "npy", "io": "mmap"}, None),
    "npy-mmap-nhwc": ("npy", {"name": "npy", "io": "mmap"}, None),
    "npy-direct": ("npy", {"name": "npy", "io": "direct"}, None),
    "npy-pread": ("npy", {"name": "npy", "io": "pread"}, None),
    "prefetch-hdf5": ("h5", {"name": "prefetch"}, {"name": "hdf5", "threads": 1}),
    "prefetch-npy-mmap": ("npy", {"name": "prefetch"}, {"name": "npy", "io": "mmap", "threads": 1}),
    "prefetch-npy-mmap-nhwc": ("npy", {"name": "prefetch"}, {"name": "npy", "io": "mmap", "threads": 1}),
    "prefetch-npy-direct": ("npy", {"name": "prefetch"}, {"name": "npy", "io": "direct", "threads": 1}),
    "prefetch-npy-pread": ("npy", {"name": "prefetch"}, {"name": "npy", "io": "pread", "threads": 1}),
}
# What each row does, for the table.
OURS_DOES = "read, normalise, transpose to (B, C, H, W)"
NHWC_DOES = "read, normalise; channels_last, no transpose"
PEER_DOES = {
    "h5py": "read only", "h5py-threads": "read only",
    "numpy.load": "read only", "numpy.load-threads": "read only",
    "h5py-normalise": "read, normalise, transpose (as the reference)",
    "h5py-normalise-threads": "read, normalise, transpose (as the reference)",
    "numpy.load-normalise": "read, normalise, transpose (as the reference)",
    "numpy.load-normalise-threads": "read, normalise, transpose (as the reference)",
    "cat": "read only, writes nothing", "dd-direct": "read only (O_DIRECT), writes nothing",
}


def does(name):
    if name in READERS:
        return NHWC_DOES if name.endswith("-nhwc") else OURS_DOES
    return PEER_DOES[name]


BASELINES = {
    "h5py": ("h5", 1),
    "h5py-threads": ("h5", None),  # None: --threads
    "h5py-normalise": ("h5", 1),
    "h5py-normalise-threads": ("h5", None),
    "numpy.load": ("npy", 1),
    "numpy.load-threads": ("npy", None),
    "numpy.load-normalise": ("npy", 1),
    "numpy.load-normalise-threads": ("npy", None),
    "cat": (None, 1),         # both formats
    "dd-direct": ("npy", 1),  # the .npy files with O_DIRECT, as the npy reader's io = "direct"
}


# ---- the worker: one baseline measurement in this process ------------------------------------------

def worker(kind, threads, files_json, stats=None):
    """Reads the files as h5py or numpy would, prints {"seconds": ...}. With `stats`
    (a stats.h5), each sample is also normalised as the reference does: the scale
    1 / (max - min) in the stored dtype, then scale * (x - shift) in float32,
    transposed to (C, H, W) contiguous, labels as int64."""
    samples = json.loads(Path(files_json).read_text())
    import numpy as np
    if kind == "h5py" or stats:
        import h5py
    if kind == "h5py":
        def load(sample):
            with h5py.File(sample[0], "r") as f:
                return f["climate/data"][...], f["climate/labels_0"][...]
    else:
        def load(sample):
            return np.load(sample[0]), np.load(sample[1])
    read_one = load
    if stats:
        with h5py.File(stats, "r") as f:
            lo, hi = f["climate/minval"][...], f["climate/maxval"][...]
        shift, scale = lo.astype(np.float32), (1.0 / (hi - lo)).astype(np.float32)

        def read_one(sample):
            x, y = load(sample)
            x = np.ascontiguousarray((scale * (x - shift)).transpose(2, 0, 1))
            return x, y.astype(np.int64)

    start = time.perf_counter()
    if threads == 1:
        for sample in samples:
            read_one(sample)
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(read_one, samples):
                pass
    print(json.dumps({"seconds": time.perf_counter() - start}))


# ---- measuring -------------------------------------------------------------------------------------

def run_measured(cmd, env=None, stdout=subprocess.PIPE):
    """Runs cmd; returns (wall seconds, stdout text, stderr text, exit status, peak RSS bytes)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=err, env=env)
        out = proc.stdout.read().decode() if stdout == subprocess.PIPE else ""
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return wall, out, err.read().decode(errors="replace"), proc.returncode, usage.ru_maxrss * 1024


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def can_drop_caches():
    try:
        drop_caches()
        return True, ""
    except OSError as e:
        return False, f"/proc/sys/vm/drop_caches cannot be written here ({e.strerror}): cold page cache not measured"


def warm_up(files):
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


class Failed(Exception):
    pass


def measure(cmd, files, cache, env=None, parse=None, stdout=subprocess.PIPE):
    """One run in the given cache state; returns {seconds, peak_rss_bytes, ...}."""
    if cache == "cold":
        drop_caches()
    else:
        warm_up(files)
    wall, out, err, status, rss = run_measured(cmd, env=env, stdout=stdout)
    if status != 0:
        last = (err.strip().splitlines() or [f"exit status {status}"])[-1]
        raise Failed(f"{shlex.join(map(str, cmd))[:200]}: {last}")
    result = {"seconds": wall, "peak_rss_bytes": rss}
    if parse:
        result.update(parse(out))
    return result


def median_of(runs, key):
    return statistics.median(r[key] for r in runs)


# ---- the data set ----------------------------------------------------------------------------------

def split_samples(root, fmt, split="train"):
    """[(data file, label file or None)] of a split, in name order."""
    folder = root / split
    if fmt == "h5":
        return [(p, None) for p in sorted(folder.glob("*.h5"))]
    return [(p, p.with_name("label-" + p.name[len("data-"):])) for p in sorted(folder.glob("data-*.npy"))]


def files_of(samples):
    return [f for s in samples for f in s if f is not None]


def make_data(args, tool):
    h5, npy = args.data / "h5", args.data / "npy"
    if not (h5 / "train").is_dir() or not any((h5 / "train").glob("*.h5")):
        say(f"writing a synthetic set ({args.train} training samples, {args.height} x {args.width}) to {h5}")
        run_tool([tool, "synth", "--out", h5, "--train", args.train, "--validation", args.validation,
                  "--height", args.height, "--width", args.width])
    else:
        say(f"reusing {h5}")
    # Resumable: pairs already converted are only checked (headers, sizes and times).
    say(f"converting {h5} to {npy} (or checking an earlier conversion)")
    run_tool([tool, "convert", h5, npy])
    return h5, npy


# ---- run files for deepcam-data read ---------------------------------------------------------------

def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def run_file(args, name, root, work):
    _, reader, source = READERS[name]
    reader = dict(reader, threads=args.threads)
    if reader["name"] == "prefetch":
        reader["depth"] = args.depth
    tables = [
        ("run", {"seed": 1, "output_dir": str(work / "out"), "train_batch_size": args.batch_size,
                 "validation_batch_size": args.batch_size, "device": "cpu",
                 "memory_format": "channels_last" if name.endswith("-nhwc") else "contiguous"}),
        ("data", {"root": str(root)}),
        ("reader", reader),
        ("reader.source", source),
        # Checked by the run file's loader, never built by deepcam-data read.
        ("model", {"name": "deeplabv3plus"}),
        ("optimizer", {"name": "adam", "lr": 0.001}),
        ("scheduler", {"name": "multistep", "milestones": [1000]}),
        ("mlperf", {"org": "bench", "platform": "cpu", "division": "open", "status": "research"}),
    ]
    lines = []
    for table, keys in tables:
        if keys is None:
            continue
        lines.append(f"[{table}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
        lines.append("")
    path = work / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path


# ---- the report ------------------------------------------------------------------------------------

def say(text):
    print(f"bench_readers: {text}", file=sys.stderr, flush=True)


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor() or "unknown")
    mem_kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    return cpu, os.cpu_count(), mem_kib * 1024


def python_versions():
    import h5py
    import numpy
    return f"Python {platform.python_version()}, NumPy {numpy.__version__}, h5py {h5py.__version__}"


def disk_of(path):
    path = Path(path).resolve()
    best = ("?", "", "?")  # the longest mount point holding path
    for line in open("/proc/mounts"):
        dev, mnt, fstype = line.split()[:3]
        if (path == Path(mnt) or Path(mnt) in path.parents) and len(mnt) > len(best[1]):
            best = (dev, mnt, fstype)
    dev = Path(best[0]).name
    rotational = Path(f"/sys/block/{dev}/queue/rotational")
    kind = ""
    if rotational.exists():
        kind = ", rotational" if rotational.read_text().strip() == "1" else ", non-rotational"
    total, _, free = shutil.disk_usage(path)
    return f"{best[0]} ({best[2]} on {best[1]}{kind}), {total / 1e9:.0f} GB, {free / 1e9:.0f} GB free"


def quietness():
    load = os.getloadavg()
    compilers = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() in ("cc1plus", "cc1", "nvcc", "cicc", "ptxas"):
                    compilers += 1
            except OSError:
                pass
    return load, compilers


def fmt_rate(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def verdict(ok):
    return "met" if ok else "not met"


def prefetch_batches(args, context):
    return -(-context["samples"] // args.batch_size)


def build_report(args, rows, prefetch, goals, notes, context):
    out = [SECTION, ""]
    out.append(f"Measured {context['when']} with `{context['command']}` "
               f"(commit {context['commit']}).")
    out.append("")
    out.append(f"Data: {context['samples']} training samples of {context['shape']} (SPEC 1, `deepcam-data synth`), "
               f"{context['h5_bytes'] / 1e9:.2f} GB as HDF5 and {context['npy_bytes'] / 1e9:.2f} GB as .npy "
               f"(`deepcam-data convert`), in `{args.data}`. Our readers: batch {args.batch_size}, "
               f"{args.threads} threads, prefetch depth {args.depth}, all 16 channels normalised into "
               f"(B, C, H, W) float32 (channels first, or channels_last for the -nhwc rows) and int64 labels; "
               f"the column \"does\" says what each row's program does with the bytes it reads. Python peers: "
               f"{context['python']}. Each row reads the training split once in its own "
               f"process; each number is the median of {args.repeat} runs. Warm: the files read just before "
               f"(page cache); cold: `echo 3 > /proc/sys/vm/drop_caches` just before. GB/s counts the bytes "
               f"of the files on disk (1e9). \"% of cat\" compares with `cat` of the same files in the same "
               f"cache state. Peak RSS is the process's maximum resident set; for `deepcam-data read` it "
               f"includes about {context['base_rss_mb']:.0f} MB of LibTorch and plugins before any read, and "
               f"memory-mapped file pages count as resident.")
    out.append("")
    out.append("| set-up | does | files | cache | samples/s | GB/s | % of cat | peak RSS MB |")
    out.append("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | {does(r['name'])} | {r['files']} | {r['cache']} | failed: {r['error']} "
                       "| | | |")
            continue
        pct = "–" if r.get("pct_raw") is None else f"{r['pct_raw']:.0f} %"
        out.append(f"| {r['name']} | {does(r['name'])} | {r['files']} | {r['cache']} | {r['samples_per_s']:.1f} | "
                   f"{r['gb_per_s']:.2f} | {pct} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    out.append("")
    out.append("How to read the warm rows: `cat` copies each file through a 128 KiB buffer that stays in the "
               "CPU cache, so with a warm page cache it measures copying page-cache pages, with no writes to "
               "memory. h5py and numpy.load (read only) write the data once, as stored. A reader writes its "
               "whole output to memory: float32 data as large as the data read, int64 labels twice the size of "
               "the stored int32 ones, normalised (and transposed, channels first); the -normalise peers do the "
               "same work in NumPy, as the reference does.")
    out.append("")
    if prefetch:
        out.append("Prefetch test (warm cache): `deepcam-data read --consume-matched --with-validation`, the "
                   "consumer holding each batch as long as the reader took per batch in a first epoch without "
                   f"consumer; {args.prefetch_epochs} epochs measured after that one, each training epoch followed "
                   "by a validation pass as the engine calls the reader (its batches count in the samples/s).")
        out.append("")
        out.append("| set-up | consumer ms/batch | waits ms/batch | waiting | of which first batches | "
                   "waiting after each epoch's first batch | samples/s |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for p in prefetch:
            if "error" in p:
                out.append(f"| {p['name']} | failed: {p['error']} | | | | | |")
                continue
            out.append(f"| {p['name']} | {p['consume_ms']:.1f} | {p['wait_ms_per_batch']:.1f} | "
                       f"{100 * p['wait_fraction']:.1f} % | {100 * p['first_wait_seconds'] / p['seconds']:.1f} % | "
                       f"{100 * p['steady_wait_fraction']:.1f} % | {p['samples_per_s']:.1f} |")
        out.append("")
        out.append("The prefetch reader reads the epochs expected next (validation, the next training epoch) "
                   "ahead once the current epoch's samples are all read, so an epoch's first batch is waited for "
                   "only when that read-ahead has not finished. On this set a training epoch has "
                   f"{prefetch_batches(args, context)} batches, so an epoch's first batch weighs more than over "
                   "a full DeepCAM epoch; the last column leaves it out.")
        out.append("")
    out.append("Goals:")
    out.append("")
    for g in goals:
        if g["ok"] is not None:
            out.append(f"- {verdict(g['ok'])}: {g['text']}")
    out.append("")
    extra = [g for g in goals if g["ok"] is None]
    if extra:
        out.append("Beside the goals:")
        out.append("")
        for g in extra:
            out.append(f"- {g['text']}")
        out.append("")
    if notes:
        for n in notes:
            out.append(f"- {n}")
        out.append("")
    cpu, ncpu, mem = context["machine"]
    # The benchmark keeps at most --threads cores busy; a load above that is someone else's.
    whose = ("the benchmark's own" if context["load_end"][0] <= args.threads
             else f"above the benchmark's {args.threads} threads: the machine was busy with other work")
    out.append(f"Machine: {ncpu} CPUs ({cpu}), {mem / 2**30:.1f} GiB memory, disk {context['disk']}; "
               f"{platform.system()} {platform.release()}. Load average (1 min) {context['load'][0]:.2f} at the "
               f"start, {context['load_end'][0]:.2f} at the end ({whose}); compiler processes "
               f"running: {context['compilers']} at the start, {context['compilers_end']} at the end.")
    out.append("")
    return "\n".join(out)


# ---- main ------------------------------------------------------------------------------------------

def main():
    if len(sys.argv) in (4, 5) and sys.argv[1] in ("--worker-h5py", "--worker-numpy"):
        worker("h5py" if sys.argv[1] == "--worker-h5py" else "numpy", int(sys.argv[2]), sys.argv[3],
               sys.argv[4] if len(sys.argv) == 5 else None)
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", type=Path, default=REPO / "runs" / "bench-readers",
                   help="holds h5/ (made if missing) and npy/ (converted from h5/); default runs/bench-readers")
    p.add_argument("--train", type=int, default=40, help="training samples when making the set (default 40: 2.4 GB)")
    p.add_argument("--validation", type=int, default=2, help="validation samples when making the set (default 2)")
    p.add_argument("--height", type=int, default=768, help="when making the set (default 768)")
    p.add_argument("--width", type=int, default=1152, help="when making the set (default 1152)")
    p.add_argument("--batch-size", type=int, default=2, help="our readers' batch (default 2)")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16),
                   help="our readers' threads, and the Python pools' (default: the CPU count, at most 16; more "
                        "threads than cores only make them take turns)")
    p.add_argument("--depth", type=int, default=4, help="prefetch ring depth (default 4)")
    p.add_argument("--repeat", type=int, default=3, help="runs per cell, the median is shown (default 3)")
    p.add_argument("--prefetch-epochs", type=int, default=3,
                   help="epochs of the prefetch test after the calibrating one (default 3)")
    p.add_argument("--only", help="comma-separated subset of the set-ups (default: all)")
    p.add_argument("--no-cold", action="store_true", help="warm page cache only")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md as it is")
    p.add_argument("--json", type=Path, help="also write every measurement to this file")
    p.add_argument("--build-dir", type=Path, default=Path(os.environ.get("DEEPCAM_BUILD_DIR", REPO / "build")))
    args = p.parse_args()

    names = list(READERS) + list(BASELINES)
    only = names if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in names]
    if unknown:
        p.error(f"--only: unknown set-up(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if not only:
        p.error(f"--only {args.only!r} names no set-up; choose from {', '.join(names)}")
    for opt in ("train", "batch_size", "threads", "depth", "repeat", "prefetch_epochs"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt.replace('_', '-')} must be at least 1")
    if args.validation < 1:
        p.error("--validation must be at least 1 (deepcam-data synth's least)")
    for opt in ("height", "width"):  # deepcam-data synth's range
        if not 16 <= getattr(args, opt) <= 16384:
            p.error(f"--{opt} must be between 16 and 16384, got {getattr(args, opt)}")
    if args.data.exists() and not args.data.is_dir():
        p.error(f"--data {args.data} is not a directory")
    if args.json is not None and not args.json.parent.is_dir():
        # Found only after the whole benchmark, whose figures were then lost.
        p.error(f"--json {args.json}: no folder {args.json.parent} to write it in")
    tool = args.build_dir / "core" / "deepcam-data"
    if not tool.is_file():
        p.error(f"{tool} is not built; run scripts/setup.sh or ninja -C {args.build_dir} core/deepcam-data")
    env = dict(os.environ, DEEPCAM_PLUGIN_PATH=str(args.build_dir / "plugins"))

    load, compilers = quietness()
    if load[0] > 1.5 or compilers:
        say(f"warning: the machine is busy (load {load[0]:.2f}, {compilers} compiler processes): "
            "the numbers will be noise")
    command = "scripts/bench_readers.py" + ("" if len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:]))

    try:
        args.data.mkdir(parents=True, exist_ok=True)
        h5_root, npy_root = make_data(args, tool)
    except (ToolFailed, OSError) as e:
        p.error(f"--data {args.data}: {e}")
    roots = {"h5": h5_root, "npy": npy_root}
    samples = {f: split_samples(roots[f], f) for f in roots}
    files = {f: files_of(samples[f]) for f in roots}
    nbytes = {f: sum(x.stat().st_size for x in files[f]) for f in roots}
    count = len(samples["h5"])
    if count == 0 or len(samples["npy"]) != count:
        p.error(f"{h5_root}/train and {npy_root}/train must hold the same samples "
                f"({count} and {len(samples['npy'])})")
    notes = []
    if nbytes["h5"] < MIN_BYTES:
        notes.append(f"The data set ({nbytes['h5'] / 1e9:.2f} GB) is smaller than the 2 GB section 7 asks for: "
                     "a trial run, not the benchmark.")
    import h5py
    with h5py.File(samples["h5"][0][0], "r") as f:
        shape = " x ".join(map(str, f["climate/data"].shape))

    caches = ["warm"]
    if not args.no_cold:
        ok, why = can_drop_caches()
        if ok:
            caches.append("cold")
        else:
            notes.append(why)
            say(why)
    else:
        notes.append("Cold page cache not measured (--no-cold).")

    work_tmp = tempfile.TemporaryDirectory(prefix="bench_readers.")
    work = Path(work_tmp.name)
    rows, runs_log = [], []
    base_rss = []

    def cell(name, fmt, cache, cmd, parse, run_env=None, stdout=subprocess.PIPE):
        say(f"{name} ({fmt}, {cache}) ...")
        runs = []
        try:
            for _ in range(args.repeat):
                runs.append(measure(cmd, files[fmt], cache, env=run_env, parse=parse, stdout=stdout))
        except Failed as e:
            say(f"  failed: {e}")
            return {"name": name, "files": fmt, "cache": cache, "error": str(e)}
        runs_log.append({"name": name, "files": fmt, "cache": cache, "runs": runs})
        seconds = median_of(runs, "seconds")
        row = {"name": name, "files": fmt, "cache": cache, "seconds": seconds,
               "samples_per_s": count / seconds, "gb_per_s": nbytes[fmt] / seconds / 1e9,
               "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs)}
        say(f"  {row['samples_per_s']:.1f} samples/s, {row['gb_per_s']:.2f} GB/s")
        return row

    def parse_read(fmt):
        def parse(out):
            r = json.loads(out.strip().splitlines()[-1])
            if r["bytes"] != nbytes[fmt] or r["samples"] != count:
                raise Failed(f"deepcam-data read counted {r['samples']} samples, {r['bytes']} bytes; "
                             f"the split holds {count}, {nbytes[fmt]}")
            base_rss.append(r["base_rss_bytes"])
            # The reader's own time, without process start and plugin loading.
            return {"seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"], "read": r}
        return parse

    def parse_worker(out):
        return {"seconds": json.loads(out.strip().splitlines()[-1])["seconds"]}

    for cache in caches:
        for name in only:
            if name in READERS:
                fmt = READERS[name][0]
                toml = run_file(args, name, roots[fmt], work)
                rows.append(cell(name, fmt, cache, [str(tool), "read", str(toml)], parse_read(fmt), env))
            elif name == "cat":
                for fmt in ("h5", "npy"):
                    rows.append(cell("cat", fmt, cache, ["cat", *map(str, files[fmt])], None,
                                     stdout=subprocess.DEVNULL))
            elif name == "dd-direct":
                loop = 'for f in "$@"; do dd if="$f" of=/dev/null bs=4M iflag=direct status=none || exit 1; done'
                rows.append(cell(name, "npy", cache, ["sh", "-c", loop, "sh", *map(str, files["npy"])], None,
                                 stdout=subprocess.DEVNULL))
            else:
                fmt, threads = BASELINES[name]
                threads = threads or args.threads
                listing = work / f"{fmt}-files.json"
                listing.write_text(json.dumps([[str(a), str(b) if b else None] for a, b in samples[fmt]]))
                flag = "--worker-h5py" if fmt == "h5" else "--worker-numpy"
                stats = [str(roots[fmt] / "stats.h5")] if "normalise" in name else []
                rows.append(cell(name, fmt, cache, [sys.executable, str(Path(__file__).resolve()), flag,
                                                    str(threads), str(listing), *stats], parse_worker))

    # "% of raw": against cat of the same files in the same cache state.
    raw = {(r["files"], r["cache"]): r["gb_per_s"] for r in rows if r["name"] == "cat" and "error" not in r}
    for r in rows:
        if "error" not in r and r["name"] not in ("cat", "dd-direct") and (r["files"], r["cache"]) in raw:
            r["pct_raw"] = 100 * r["gb_per_s"] / raw[(r["files"], r["cache"])]

    prefetch = []
    for name in [n for n in only if n.startswith("prefetch-")]:
        fmt = READERS[name][0]
        toml = run_file(args, name, roots[fmt], work)
        say(f"prefetch test: {name} with a matched consumer ...")
        try:
            r = measure([str(tool), "read", str(toml), "--consume-matched", "--with-validation",
                         "--epochs", str(args.prefetch_epochs)],
                        files[fmt], "warm", env=env, parse=lambda out: json.loads(out.strip().splitlines()[-1]))
            r["name"] = name
            say(f"  waiting {100 * r['wait_fraction']:.1f} % of the time")
        except Failed as e:
            r = {"name": name, "error": str(e)}
        prefetch.append(r)

    def find(name, cache, fmt=None):
        return next((r for r in rows if r["name"] == name and r["cache"] == cache and "error" not in r
                     and fmt in (None, r["files"])), None)

    def best_of(cache, *names):
        return max((r for r in (find(n, cache) for n in names) if r), key=lambda r: r["gb_per_s"], default=None)

    def ratio(a, b):
        return f"{a['gb_per_s']:.2f} GB/s = {100 * a['gb_per_s'] / b['gb_per_s']:.0f} % of {b['name']}'s " \
               f"{b['gb_per_s']:.2f} GB/s"

    goals = []
    for cache in caches:
        # The io mode is chosen per file system (README): a goal is met when
        # the mode for this cache state reaches it.
        npy = best_of(cache, "npy-mmap", "npy-pread", "npy-direct")
        cat = find("cat", cache, "npy")
        h5py_raw = best_of(cache, "h5py", "h5py-threads")
        hdf5 = find("hdf5", cache)
        if cache == "warm":
            # Issue 13 section 3.
            if hdf5 and h5py_raw:
                goals.append({"ok": hdf5["gb_per_s"] >= h5py_raw["gb_per_s"],
                              "text": f"hdf5 reader at least as fast as h5py's raw read (read only), warm: hdf5 "
                                      f"{ratio(hdf5, h5py_raw)}"})
            if npy and cat:
                goals.append({"ok": npy["gb_per_s"] >= 0.7 * cat["gb_per_s"],
                              "text": f"npy reader >= 70 % of cat, warm: {npy['name']} {ratio(npy, cat)}"})
        else:
            # Issue 3 section 7, cold page cache.
            if npy and cat:
                goals.append({"ok": npy["gb_per_s"] >= 0.9 * cat["gb_per_s"],
                              "text": f"npy reader >= 90 % of cat, cold: {npy['name']} {ratio(npy, cat)}"})
            if hdf5 and h5py_raw:
                goals.append({"ok": hdf5["gb_per_s"] >= h5py_raw["gb_per_s"],
                              "text": f"hdf5 reader at least as fast as h5py's raw read, cold: hdf5 "
                                      f"{ratio(hdf5, h5py_raw)}"})
        # Beside the goals: channels_last, the peers that normalise as the
        # reference does, O_DIRECT.
        for ours, peer in (("hdf5-nhwc", h5py_raw), ("npy-mmap-nhwc", cat)):
            mine = find(ours, cache)
            if mine and peer:
                goals.append({"ok": None, "text": f"{ours} (channels_last), {cache}: {ratio(mine, peer)}"})
        for ours, peer in (("hdf5", best_of(cache, "h5py-normalise", "h5py-normalise-threads")),
                           ("npy-mmap", best_of(cache, "numpy.load-normalise", "numpy.load-normalise-threads"))):
            mine = find(ours, cache)
            if mine and peer:
                goals.append({"ok": None, "text": f"{ours} against {peer['name']} (read and normalise as the "
                                                  f"reference), {cache}: {ratio(mine, peer)}"})
        direct, dd = find("npy-direct", cache), find("dd-direct", cache)
        if direct and dd:
            goals.append({"ok": None, "text": f"npy reader with io = \"direct\" against O_DIRECT reads of the "
                                              f"same files, {cache}: npy-direct {ratio(direct, dd)}"})
    for r in prefetch:
        if "error" not in r:
            goals.append({"ok": r["wait_fraction"] < 0.05,
                          "text": f"{r['name']} with a consumer as slow as a read waits < 5 % of the time: "
                                  f"{100 * r['wait_fraction']:.1f} % ({100 * r['steady_wait_fraction']:.1f} % "
                                  "after each epoch's first batch)"})

    load_end, compilers_end = quietness()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    context = {"when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "command": command, "commit": commit, "samples": count, "shape": shape,
               "h5_bytes": nbytes["h5"], "npy_bytes": nbytes["npy"],
               "base_rss_mb": (statistics.median(base_rss) if base_rss else 0) / 2**20,
               "machine": machine(), "disk": disk_of(args.data), "load": load, "compilers": compilers,
               "python": python_versions(),
               "load_end": load_end, "compilers_end": compilers_end}
    report = build_report(args, rows, prefetch, goals, notes, context)
    print(report)
    if not args.no_docs:
        write_docs(args.docs, SECTION, report)
        say(f"wrote the section to {args.docs}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "prefetch": prefetch, "goals": goals, "runs": runs_log,
                                         "context": {k: v for k, v in context.items()}}, indent=2, default=str))
    work_tmp.cleanup()
    return 1 if any("error" in r for r in rows + prefetch) else 0


if __name__ == "__main__":
    sys.exit(main())
