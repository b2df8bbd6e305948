#!/usr/bin/env python3
"""Curves of one or more deepcam-host runs from their MLPerf logs.

    scripts/plot_run.py RUN_DIR... [--out curves.png] [--dpi 100]

Each RUN_DIR is a run's output folder (its mlperf.log), or the log itself.
One PNG: train loss, train IoU, eval IoU and learning rate (rows), against
the optimizer step (left) and against wall time since run_start (right);
every run is one colour on every panel, named in the legend by its folder,
with its target IoU (from config.toml beside the log) dotted on the eval IoU
panels. It also prints one line per
run: steps, epochs, final train loss, best eval IoU, time to train.

A run is named by the folder of its mlperf.log (a log of another name: by
that name without its suffix). Two inputs of one name are refused, naming both: the
legend could not tell them apart. The usual cause is a glob that matches
both a run's folder JOB_n/ and the JOB_n.out that scripts/slurm/run.sub
writes beside it (what the run's ranks printed, the log's lines again):
give the folders alone, runs/slurm/JOB_*/.

A plotted value logged as NaN or Infinity (a diverged run logs its
eval_accuracy as NaN) is a gap in its curve, with a note naming the log.
Exit status 2 with one line naming the file (and line) for a missing,
unreadable or malformed log or config.toml (a number no float holds, NaN or
Infinity where the plot needs a number: time_ms, step_num, epoch_num,
target_iou), two inputs of one name, or a --out that cannot be
written or is one of the files it reads (a log or config.toml, also through
a link); 0 otherwise.
The PNG is written to a temporary name (removed on any failure) and renamed;
it gets the mode any new file gets under the umask. An --out that is a
symbolic link is written through, as matplotlib's savefig and PIL's save
do: the link stays and the file it names gets the PNG.
"""

import argparse
import json
import math
import os
import secrets
import sys
from pathlib import Path

MARKER = ":::MLLOG "
METRICS = [  # (log key, panel title)
    ("train_loss", "train loss"),
    ("train_accuracy", "train IoU"),
    ("eval_accuracy", "eval IoU"),
    ("learning_rate", "learning rate"),
]
PLOTTED = tuple(key for key, _ in METRICS)  # a tuple: "in" compares, and a key may be a list


class BadInput(Exception):
    pass


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def finite(value):
    """Whether a number is one a float holds: json gives ints of any size, NaN and Infinity."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def read_log(path):
    """The log's events as dicts; a line that is not an MLPerf JSON line is an error, and so is a
    number the plot uses that is not a finite float (matplotlib and the time arithmetic would raise),
    but for a plotted value's NaN or Infinity, which the host logs on purpose (a gap in the curve).
    A last line without its newline that does not parse is a line being written (a run in progress, a
    copy taken mid-write): left out, with a note."""
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            at = line.find(MARKER)
            if at < 0:
                continue
            try:
                event = json.loads(line[at + len(MARKER):])
            except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
                if not line.endswith("\n"):
                    print(f"plot_run.py: note: {path}:{number}: the last line is cut short (a log being "
                          "written); plotted without it", file=sys.stderr)
                    break
                raise BadInput(f"{path}:{number}: not a JSON log line: {e}") from None
            if not isinstance(event, dict) or "key" not in event or "time_ms" not in event:
                raise BadInput(f"{path}:{number}: a log line needs \"key\" and \"time_ms\"")
            if not is_number(event["time_ms"]) or not isinstance(event.get("metadata", {}), dict):
                raise BadInput(f"{path}:{number}: \"time_ms\" must be a number and \"metadata\" an object")
            meta = event.get("metadata", {})
            for what, value in (("time_ms", event["time_ms"]),
                                (f"{event['key']} value", event.get("value") if event["key"] in PLOTTED else None),
                                ("metadata step_num", meta.get("step_num")),
                                ("metadata epoch_num", meta.get("epoch_num"))):
                if is_number(value) and not finite(value):
                    if isinstance(value, float) and what.endswith(" value"):
                        continue  # a diverged run's NaN: a gap in the curve
                    kind = "NaN or Infinity" if isinstance(value, float) else "an integer no float holds"
                    raise BadInput(f"{path}:{number}: {what} is {kind}; it must be a finite number")
            events.append(event)
    return events


class Run:
    def __init__(self, arg):
        p = Path(arg)
        self.arg = arg
        self.log = p / "mlperf.log" if p.is_dir() else p
        if not self.log.is_file():
            raise BadInput(f"{arg}: no MLPerf log (give a run's output folder, which holds mlperf.log, or the log)")
        self.name = (self.log.parent.name if self.log.name == "mlperf.log" else self.log.stem) or str(self.log)
        events = read_log(self.log)
        starts = [e["time_ms"] for e in events if e["key"] == "run_start"]
        if not starts:
            raise BadInput(f"{self.log}: no run_start line: the run did not begin training")
        self.run_start = starts[0]
        stops = [e for e in events if e["key"] == "run_stop"]
        self.status = stops[0].get("metadata", {}).get("status") if stops else "running"
        self.time_to_train = (stops[0]["time_ms"] - self.run_start) / 1000 if stops else None
        # The target IoU is in the resolved run file deepcam-host writes beside the log.
        self.target = None
        config = self.log.parent / "config.toml"
        self.inputs = [self.log]  # the files read, which --out must not replace
        if config.is_file():
            self.inputs.append(config)
            import tomllib
            try:
                run = tomllib.loads(config.read_text(encoding="utf-8")).get("run", {})
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise BadInput(f"{config}: {e}") from None
            self.target = run.get("target_iou") if isinstance(run, dict) else None
            if not isinstance(run, dict) or not (self.target is None or is_number(self.target) and finite(self.target)):
                raise BadInput(f"{config}: [run] target_iou must be a finite number")
        # train_loss is logged divided by gradient_accumulation_frequency, as the reference logs it; the
        # loss of a batch (what the progress lines print) compares runs of every frequency.
        frequency = [e.get("value") for e in events if e["key"] == "gradient_accumulation_frequency"]
        k = frequency[0] if frequency and is_number(frequency[0]) and finite(frequency[0]) and frequency[0] > 0 else 1
        self.series = {}
        self.epochs = 0
        gaps = {}  # plotted key -> its points logged as NaN or Infinity
        for key, _ in METRICS:
            seen = {}
            for e in events:
                if e["key"] != key or not isinstance(e.get("value"), (int, float)):
                    continue
                meta = e.get("metadata", {})
                step = meta.get("step_num")
                if not is_number(step):
                    continue
                epoch = meta.get("epoch_num", 0)
                self.epochs = max(self.epochs, epoch if is_number(epoch) else 0)
                # The engine logs a step's figures again at the end of an epoch: one point per step.
                value = e["value"] * k if key == "train_loss" else e["value"]
                if not finite(value):
                    value = math.nan  # matplotlib leaves a gap at NaN (an infinity would stretch the axis)
                seen.setdefault(step, ((e["time_ms"] - self.run_start) / 1000, value))
            steps = sorted(seen)
            self.series[key] = (steps, [seen[s][0] for s in steps], [seen[s][1] for s in steps])
            if any(math.isnan(v) for v in self.series[key][2]):
                gaps[key] = sum(math.isnan(v) for v in self.series[key][2])
        for key, count in gaps.items():
            print(f"plot_run.py: note: {self.log}: {count} {key} value{'s' if count > 1 else ''} logged as NaN or "
                  "Infinity (a diverged run's); drawn as gaps", file=sys.stderr)
        if not any(self.series[k][0] for k, _ in METRICS):
            raise BadInput(f"{self.log}: no train_loss, train_accuracy, eval_accuracy or learning_rate lines")

    def summary(self):
        steps = max((s[-1] for s, _, _ in self.series.values() if s), default=0)
        loss = self.series["train_loss"][2]
        finite_iou = [v for v in self.series["eval_accuracy"][2] if finite(v)]
        ttt = f"{self.time_to_train:.1f} s" if self.time_to_train is not None else "not finished"
        best = f", best eval IoU {max(finite_iou):.4f}" if finite_iou else ", no eval IoU"
        return (f"{self.name}: {steps} steps, {self.epochs} epochs, final train loss "
                f"{loss[-1]:.4f}" if loss else f"{self.name}: {steps} steps, {self.epochs} epochs, no train loss") + (
                best) + f", time to train {ttt} ({self.status})"


def plot(runs, out, target, dpi):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(METRICS), 2, figsize=(12, 3 * len(METRICS)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (key, title) in enumerate(METRICS):
        for col, xlabel in enumerate(("optimizer step", "wall time since run_start (s)")):
            ax = axes[row][col]
            for k, run in enumerate(runs):
                steps, seconds, values = run.series[key]
                if not steps:
                    continue
                x = steps if col == 0 else seconds
                ax.plot(x, values, color=colors[k % len(colors)], marker="o" if len(x) < 30 else None,
                        markersize=3, linewidth=1.5, label=run.name)
                if key == "eval_accuracy" and run.target is not None:
                    ax.axhline(run.target, color=colors[k % len(colors)], linestyle=":", linewidth=1)
            ax.set_title(f"{title} vs {'step' if col == 0 else 'wall time'}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(title)
            if key == "learning_rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(runs), 4), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    try:
        write_png(fig, out, target, dpi)
    finally:
        plt.close(fig)


def refuse_same_names(runs):
    """Refuses two runs of one name, naming both: the legend and the summary lines name runs by their
    folders. A glob such as runs/slurm/JOB_* gives a run's folder JOB_n/ and, beside it, the JOB_n.out of
    scripts/slurm/run.sub, which holds the same log lines: that case is named as such."""
    seen = {}
    for run in runs:
        earlier = seen.setdefault(run.name, run)
        if earlier is run:
            continue
        for printed, folder in ((earlier, run), (run, earlier)):
            beside = Path(os.path.abspath(printed.log)).with_suffix("") == Path(os.path.abspath(folder.log)).parent
            if printed.log.suffix == ".out" and folder.log.name == "mlperf.log" and beside:
                raise BadInput(f"{printed.arg}: is what the ranks of run {folder.arg} printed, its log lines "
                               f"again; give the run's folder alone (a glob of run folders ends in a slash: "
                               f"{run.name.rstrip('0123456789')}*/)")
        raise BadInput(f"{earlier.arg} and {run.arg}: both are named {run.name} in the legend; give each run "
                       "once (of two runs whose folders share a name, give one through a link of another name)")


def check_out(out):
    """Refuses, before any plotting, an --out that is a folder or lies under a file."""
    if out.is_dir():
        raise BadInput(f"{out}: is a folder; --out names the PNG file to write")
    for folder in out.parents:
        if folder.exists():
            if not folder.is_dir():
                raise BadInput(f"{out}: cannot write: {folder} is not a folder")
            return


def refuse_inputs(out, target, runs):
    """Refuses an --out whose file (`target`) is one the plot read: by its path, through a link or a hard
    link. Renamed over, the log would be gone; a link to it would be replaced, not written through."""
    for run in runs:
        for path in run.inputs:
            if target.exists() and os.path.samefile(target, path):
                named = "" if os.path.abspath(out) == os.path.abspath(path) else f" ({path})"
                raise BadInput(f"{out}: is a file the plot reads{named}; name another --out")


def write_png(fig, out, target, dpi):
    """The figure to a temporary beside `target`, the file `out` names (through a link, if it is one),
    renamed over it: it is never half-written, and a link stays a link."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # Opened as a plain open() would (0666 less the umask), not with mkstemp's fixed 0600;
    # O_EXCL keeps mkstemp's guarantee that the name is ours.
    temp = target.parent / f".{target.name}.{secrets.token_hex(6)}.png"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, dpi=dpi, format="png")
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's output folder (or its mlperf.log)")
    parser.add_argument("--out", default="curves.png", help="the PNG file to write (default: curves.png)")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch; the figure is 12 x 12 inches")
    args = parser.parse_args(argv)
    if args.dpi < 20 or args.dpi > 600:
        parser.error(f"--dpi must be between 20 and 600, got {args.dpi}")
    out = Path(args.out)
    runs = []
    try:
        check_out(out)
        for arg in args.runs:
            try:
                runs.append(Run(arg))
            except OSError as e:
                # A read that fails part-way carries no file name.
                raise BadInput(f"{e.filename or arg}: cannot read: {e.strerror or e}") from None
        refuse_same_names(runs)
        # Written through a link, as savefig(out) would write.
        target = Path(os.path.realpath(out))
        refuse_inputs(out, target, runs)
        for run in runs:
            print(run.summary())
        plot(runs, out, target, args.dpi)
    except BadInput as e:
        print(f"plot_run.py: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"plot_run.py: {out}: cannot write: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"plot_run.py: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
