#!/usr/bin/env python3
"""The training-step benchmark of issue 8 section 5: deepcam-host's
`--benchmark` beside the MLCommons reference's own model and loss in a
PyTorch loop, in one run, on the same device, threads, batch and synthetic
input, for each precision and memory format asked for.

Both sides time whole training steps (forward under autocast where asked,
the weighted cross entropy, backward, an Adam step, zeroing the gradients)
on one batch that stays on the device, after 5 warm-up steps each (deepcam-host's
--benchmark warms up 5: core/train/engine.cpp); the reference
is the MLCommons DeepLabv3+ (deepcam/src/deepCam/architecture) and its
CELoss, imported from a checkout named by --ref (it is not part of this
repository: clone github.com/mlcommons/hpc into peers/hpc, which git
ignores). Its model only runs at the full 768 x 1152 resolution (its
bottleneck tiles to 48 x 72), so the comparison is at full size; on a CPU
that takes seconds per step. Adam on both sides: the reference trains with
APEX's LAMB, which is CUDA-only.

A set-up is PRECISION:MEMORY_FORMAT, or PRECISION:MEMORY_FORMAT:graphs for
deepcam-host with [run] cuda_graphs (CUDA only; the reference loop stays
eager, measured once per precision and memory format). Each precision and
memory format is measured on both sides before the next, the side that goes
first alternating, so that a drift in the machine's speed during the run
(a shared or warming machine) falls on both sides alike. Prints one row per
set-up with samples/s and step time p50 for both and the ratio ours /
reference, and writes the table to the section "Training
step (issue 8 section 5)" of docs/benchmarks.md (--no-docs leaves it) after
each precision and memory format, so that a run stopped part way (a
deadline on a borrowed GPU) keeps the rows it measured, marked as such.
SIGTERM or SIGINT ends both sides' processes.

Usage:
  scripts/bench_step.py --ref peers/hpc                       # CPU: fp32 and amp_bf16, both formats, batch 1
  scripts/bench_step.py --ref peers/hpc --device cuda --batch 8 \\
      --setups fp32:contiguous,amp_fp16:channels_last,amp_bf16:channels_last
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import ToolFailed, commit, run_tool, write_docs

REPO = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("DEEPCAM_BUILD_DIR", REPO / "build"))
SECTION = "## Training step (issue 8 section 5)"
WARMUP = 5  # deepcam-host's --benchmark warm-up (kWarmup in core/train/engine.cpp): the reference's too
PRECISIONS = ("fp32", "amp_fp16", "amp_bf16")
MEMORY_FORMATS = ("contiguous", "channels_last")


def run_file(path, data, device, threads, batch):
    path.write_text(f"""[run]
device = "{device}"
threads = {threads}
train_batch_size = {batch}
[data]
root = "{data}"
[reader]
name = "hdf5"
[model]
name = "deeplabv3plus"
[optimizer]
name = "adam"
lr = 0.0001
[scheduler]
name = "multistep"
milestones = [100000]
""")
    return path


def ours(args, run, precision, memory_format, graphs):
    cmd = [str(BUILD / "core" / "deepcam-host"), str(run), "--benchmark", str(args.steps),
           "--set", f"run.precision={precision}", "--set", f"run.memory_format={memory_format}",
           "--set", f"run.cuda_graphs={'true' if graphs else 'false'}"]
    env = dict(os.environ, DEEPCAM_PLUGIN_PATH=str(BUILD / "plugins"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"bench_step: {shlex.join(cmd)} failed:\n{r.stderr[-3000:]}")
    line = json.loads(r.stdout.strip().splitlines()[-1])
    return line["samples_per_s"], line["step_ms_p50"]


REFERENCE_LOOP = r"""
import json, statistics, sys, time, torch
ref, device, threads, batch, steps, warmup = sys.argv[1:7]
torch.set_num_threads(int(threads))
sys.path.insert(0, ref + "/deepcam/src/deepCam")
from architecture import deeplab_xception
from utils import losses
dev = torch.device(device)
torch.backends.cudnn.benchmark = dev.type == "cuda"  # as the reference's train.py sets it on a GPU
weights = [0.986267818390377 ** -0.125, 0.0004578708870701058 ** -0.125, 0.01327431072255291 ** -0.125]
# One process for every set-up (one interpreter and CUDA start-up), each read from stdin when the
# script asks for it: a fresh model, optimizer and batch for each, the previous ones freed first.
for line in sys.stdin:
    setup = line.strip()
    precision, memory_format = setup.split(":")
    torch.manual_seed(7)
    net = deeplab_xception.DeepLabv3_plus(n_input=16, n_classes=3, os=16, pretrained=False, _print=False).to(dev)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    net = net.to(memory_format=fmt)
    criterion = losses.CELoss(weights).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, eps=1e-6, weight_decay=1e-6)
    x = torch.randn(int(batch), 16, 768, 1152, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 3, (int(batch), 768, 1152), device=dev)
    dtype = {"amp_fp16": torch.float16, "amp_bf16": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device, enabled=precision == "amp_fp16")
    net.train()
    times = []
    for s in range(int(warmup) + int(steps)):
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = criterion(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if s >= int(warmup):
            times.append(time.perf_counter() - t0)
    # The median as deepcam-host's --benchmark gives it (numpy.percentile's interpolation).
    print(json.dumps({"setup": setup, "samples_per_s": int(batch) * len(times) / sum(times),
                      "step_ms_p50": 1e3 * statistics.median(times)}), flush=True)
    del net, criterion, opt, x, y, scaler, loss
    if dev.type == "cuda":
        torch.cuda.empty_cache()
"""


def python_with_torch():
    """The project's venv (scripts/setup.sh), where torch is; else this Python."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class Reference:
    """The reference loop in one process, kept while ours run: measure() hands it one set-up and reads
    its figures back."""

    def __init__(self, args):
        self.errors = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe nobody reads while ours run
        self.proc = subprocess.Popen(
            [python_with_torch(), "-c", REFERENCE_LOOP, str(args.ref.resolve()), args.device, str(args.threads),
             str(args.batch), str(args.steps), str(WARMUP)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True)

    def measure(self, precision, memory_format):
        self.proc.stdin.write(f"{precision}:{memory_format}\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("{"):
                d = json.loads(line)
                return d["samples_per_s"], d["step_ms_p50"]
        self.proc.wait()
        self.errors.seek(0)
        sys.exit(f"bench_step: the reference loop failed:\n{self.errors.read()[-3000:]}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def report(args, rows, setups_total, device_name, ref_commit):
    """The docs section of the rows measured so far."""
    # An allocator put in front of both sides (the reference's Python too) changes their figures: named.
    preload = f"LD_PRELOAD={shlex.quote(os.environ['LD_PRELOAD'])} " if os.environ.get("LD_PRELOAD") else ""
    lines = [args.section, "",
             f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with "
             f"`{preload}scripts/bench_step.py {shlex.join(sys.argv[1:])}` (commit {commit(REPO)}; reference "
             f"mlcommons/hpc {ref_commit}) on {device_name}, {args.threads} threads.", ""]
    if len(rows) < setups_total:
        lines += [f"**Incomplete: {len(rows)} of the {setups_total} set-ups asked for had been measured when the "
                  "run stopped.**", ""]
    lines += [f"Full-size DeepLabv3+ (768 x 1152, 16 channels), local batch {args.batch}, Adam, one synthetic batch "
              f"kept on the device; {args.steps} timed steps each after {WARMUP} warm-up steps on both sides. "
              "samples/s is the mean over the timed steps, step ms (p50) their median. Each precision and memory "
              "format is measured on both sides in turn, the side that goes first alternating.", "",
              "| precision | memory format | ours: CUDA graphs | ours samples/s | ours step ms (p50) | "
              "reference samples/s (eager) | reference step ms (p50) | ours / reference |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for precision, memory_format, graphs, o, r in rows:
        lines.append(f"| {precision} | {memory_format} | {'on' if graphs else 'off'} | {o[0]:.3f} | {o[1]:.0f} | "
                     f"{r[0]:.3f} | {r[1]:.0f} | {o[0] / r[0]:.2f} |")
    return "\n".join(lines) + "\n"


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 1")
    return value


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--ref", type=Path, default=REPO / "peers" / "hpc", help="a checkout of mlcommons/hpc")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=positive, default=os.cpu_count())
    p.add_argument("--batch", type=positive, default=1)
    p.add_argument("--steps", type=positive, default=3)
    p.add_argument("--setups", default="fp32:contiguous,fp32:channels_last,amp_bf16:contiguous,amp_bf16:channels_last",
                   help="comma-separated PRECISION:MEMORY_FORMAT[:graphs]")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--section", default=SECTION, help="the heading of the docs section to write")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    if not (args.ref / "deepcam" / "src" / "deepCam" / "architecture" / "deeplab_xception.py").exists():
        p.error(f"--ref {args.ref}: not a checkout of mlcommons/hpc (git clone https://github.com/mlcommons/hpc "
                f"{REPO / 'peers' / 'hpc'})")
    setups = []
    for setup in args.setups.split(","):
        parts = setup.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "graphs"):
            p.error(f"--setups: {setup!r} is not PRECISION:MEMORY_FORMAT or PRECISION:MEMORY_FORMAT:graphs")
        if parts[0] not in PRECISIONS or parts[1] not in MEMORY_FORMATS:
            p.error(f"--setups: {setup!r}: the precision is one of {', '.join(PRECISIONS)}, the memory format one "
                    f"of {', '.join(MEMORY_FORMATS)}")
        if len(parts) == 3 and args.device != "cuda":
            p.error(f"--setups: {setup!r}: CUDA graphs need --device cuda")
        setups.append((parts[0], parts[1], len(parts) == 3))
    if args.device == "cuda":
        # Before anything is written or started: the reference loop's torch would fail with a traceback.
        seen = subprocess.run([python_with_torch(), "-c", "import torch; print(torch.cuda.is_available())"],
                              capture_output=True, text=True)
        if seen.stdout.strip() != "True":
            p.error(f"--device cuda: {python_with_torch()}'s torch sees no CUDA GPU on this machine")
    # SIGTERM (a deadline, a batch system) ends this script as SIGINT does, through the clean-up below:
    # deepcam-host (ended by subprocess.run) and the reference loop do not outlive it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    data = REPO / "runs" / "bench-step" / "data"
    if not (data / "stats.h5").exists():
        try:
            run_tool([BUILD / "core" / "deepcam-data", "synth", "--out", data, "--train", 2, "--validation", 1,
                      "--seed", 5])
        except ToolFailed as e:
            sys.exit(f"bench_step: making the set in {data}: {e}")
    device_name = platform.processor() or platform.machine()
    if args.device == "cuda":
        device_name = subprocess.run([python_with_torch(), "-c", "import torch; print(torch.cuda.get_device_name(0))"],
                                     capture_output=True, text=True).stdout.strip()
    ref_commit = commit(args.ref)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        run = run_file(Path(tmp) / "run.toml", data, args.device, args.threads, args.batch)
        # One group per (precision, memory format): the reference once (it has no graphs) and each of our
        # set-ups, the reference first in every other group.
        ref = Reference(args)
        try:
            groups = {}
            for precision, memory_format, graphs in setups:
                groups.setdefault((precision, memory_format), []).append(graphs)
            for index, ((precision, memory_format), graph_choices) in enumerate(groups.items()):
                ours_first = index % 2 == 1
                measured = {}
                if ours_first:
                    measured.update({g: ours(args, run, precision, memory_format, g) for g in graph_choices})
                r = ref.measure(precision, memory_format)
                if not ours_first:
                    measured.update({g: ours(args, run, precision, memory_format, g) for g in graph_choices})
                for graphs in graph_choices:
                    o = measured[graphs]
                    rows.append((precision, memory_format, graphs, o, r))
                    print(f"{precision} {memory_format}{' graphs' if graphs else ''}: ours {o[0]:.3f} samples/s, "
                          f"reference {r[0]:.3f} samples/s, ratio {o[0] / r[0]:.2f}", flush=True)
                if not args.no_docs and len(rows) < len(setups):
                    write_docs(args.docs, args.section, report(args, rows, len(setups), device_name, ref_commit))
            ref.close()
        finally:
            ref.kill()
    text = report(args, rows, len(setups), device_name, ref_commit)
    print(text)
    if not args.no_docs:
        write_docs(args.docs, args.section, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
