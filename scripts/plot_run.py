#!/usr/bin/env python3
"""Curves of one or more deepcam-host runs from their MLPerf logs.

    scripts/plot_run.py RUN_DIR... [--out curves.png] [--dpi 100]

Each RUN_DIR is a run's output folder or its log. In a folder the log is
where its config.toml's [mlperf] log_file puts it (relative to the folder, or
absolute), as `deepcam-data package` finds it; mlperf.log without one.
One figure: train loss, train IoU, eval IoU and learning rate (rows), against
the optimizer step (left) and against wall time since run_start (right); the
log's step_num counts batches, so a batch is drawn at step_num /
gradient_accumulation_frequency. Every run is one colour on every panel, named
in the legend by its folder, with its target IoU (from its config.toml) dotted
on the eval IoU panels. The figure is written in the format --out's extension
names, as matplotlib's savefig infers it (.png, .pdf, .svg, ...; PNG without
an extension). It also prints one line per run: optimizer steps (and batches,
where a step takes more than one), epochs, final train loss, best eval IoU,
time to train.

A run is named by its folder (a log given itself: by the folder of an
mlperf.log, a log of another name by that name without its suffix). Two
inputs of one name are refused, naming both: the
legend could not tell them apart. The usual cause is a glob that matches
both a run's folder JOB_n/ and the JOB_n.out that scripts/slurm/run.sub
writes beside it (what the run's ranks printed, the log's lines again):
give the folders alone, runs/slurm/JOB_*/.

A plotted value logged as NaN or Infinity (a diverged run logs its
eval_accuracy as NaN) is a gap in its curve, with a note naming the log.
Exit status 2 with one line naming the file (and line) for a missing,
unreadable or malformed log or config.toml (a number no float holds, NaN or
Infinity where the plot needs a number: time_ms, step_num, epoch_num,
target_iou; a gradient_accumulation_frequency that is no positive integer),
two inputs of one name, or a --out that cannot be written, names a folder (one
that exists, or any with a trailing slash), has an extension that names no
format matplotlib writes, or is one of the files it reads (a log or
config.toml, also through a link); 0 otherwise.
The figure is written to a temporary name (removed on any failure, SIGINT and
SIGTERM included) and renamed; it gets the mode any new file gets under the
umask. An --out that is a symbolic link is written through, as matplotlib's
savefig and PIL's save do: the link stays and the file it names gets the figure.
Standard output is treated as the C++ tools treat theirs: a reader that quit
(`| head -1`) is no failure; a write that fails otherwise (a full disk under a
redirect) neither stops the figure nor is taken for --out's: it is reported
once, at the end, with exit status 2. SIGINT (Ctrl-C) and SIGTERM end it with
one line, by the signal itself, as the C++ tools end (a shell's $? is 130 for
SIGINT, 143 for SIGTERM).
"""

import argparse
import errno
import json
import math
import os
import secrets
import signal
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
ACCUMULATION = "gradient_accumulation_frequency"
NO_LINES = "train_loss, train_accuracy, eval_accuracy or learning_rate lines"  # what a run without curves lacks


class BadInput(Exception):
    pass


class Stopped(BaseException):
    """SIGINT or SIGTERM, raised where the script is, so that the figure's temporary is removed on the way out.
    A BaseException, as KeyboardInterrupt: no handler of an error takes it."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def discard(stream):
    """Points a standard stream that failed at /dev/null: what the failed write left in its buffer is flushed
    at exit, which would fail again and print "Exception ignored ..." (and make the status 120)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError):
        pass


def eprint(line):
    """A line on stderr that never raises: a stderr that cannot be written must not stop the figure, nor turn
    an error into a traceback; the line is lost, the exit status still tells."""
    if sys.stderr is None:  # started with stderr closed (print(file=None) would write to stdout)
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        discard(sys.stderr)


class Stdout:
    """What the script shows on standard output (the runs' lines, the file written). A write that fails is
    kept, not raised: it must not stop the figure, nor be reported as --out's. As the C++ tools' stdout
    (core/tools/std_streams.hpp): a reader that stopped reading (`| head -1`: EPIPE, Python ignores SIGPIPE)
    chose to, which is no failure; another cause (a full disk under a redirect, /dev/full) is reported once,
    at the end, and makes the status 2."""

    def __init__(self):
        self.error = None  # the first failed write's OSError; nothing is written after it

    def print(self, line):
        if sys.stdout is None or self.error is not None:
            return
        try:
            # Line by line, not when the buffer fills: a reader (tee, head) sees each run's line as it comes.
            print(line, file=sys.stdout, flush=True)
        except OSError as e:
            self.error = e
            discard(sys.stdout)

    def finish(self, status):
        """`status`, or 2 if what was printed could not reach stdout for another reason than a reader that
        quit (said in one line on stderr)."""
        if sys.stdout is not None and self.error is None:
            try:
                sys.stdout.flush()  # what argparse printed (--help)
            except OSError as e:
                self.error = e
                discard(sys.stdout)
        if self.error is None or self.error.errno == errno.EPIPE:
            return status
        eprint(f"plot_run.py: cannot write to standard output: {self.error.strerror or self.error}; what it shows "
               "there is lost")
        return status or 2


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
                    eprint(f"plot_run.py: note: {path}:{number}: the last line is cut short (a log being "
                           "written); plotted without it")
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
            # It turns the log's batches into optimizer steps: the host logs a positive integer.
            k = event.get("value")
            if event["key"] == ACCUMULATION and not (isinstance(k, int) and not isinstance(k, bool) and k > 0):
                raise BadInput(f"{path}:{number}: {ACCUMULATION} is {json.dumps(k)}; it must be a positive integer")
            events.append(event)
    return events


def read_config(path):
    """The resolved run file deepcam-host writes in the output folder, checked for what the plot takes from
    it: [run] target_iou and [mlperf] log_file."""
    import tomllib
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: {e}") from None
    run = config.get("run", {})
    target = run.get("target_iou") if isinstance(run, dict) else None
    if not isinstance(run, dict) or not (target is None or is_number(target) and finite(target)):
        raise BadInput(f"{path}: [run] target_iou must be a finite number")
    mlperf = config.get("mlperf", {})
    log_file = mlperf.get("log_file") if isinstance(mlperf, dict) else None
    if not isinstance(mlperf, dict) or not (log_file is None or isinstance(log_file, str)):
        raise BadInput(f"{path}: [mlperf] log_file must be a string")
    return target, log_file


class Run:
    def __init__(self, arg):
        p = Path(arg)
        self.arg = arg
        no_log = f"{arg}: no MLPerf log (give a run's output folder, which holds mlperf.log, or the log)"
        self.target = None
        if p.is_dir():
            self.folder = p
            config = p / "config.toml"
            log_file = None
            if config.is_file():
                self.target, log_file = read_config(config)
            # As package (core/tools/package.cpp) finds it, and the host writes it: relative to the folder,
            # or absolute.
            self.log = p / (log_file if log_file is not None else "mlperf.log")
            if not self.log.is_file():
                if log_file is None:
                    raise BadInput(no_log)
                raise BadInput(f"{arg}: no MLPerf log at {self.log}, where {config}'s [mlperf] log_file = "
                               f"{json.dumps(log_file, ensure_ascii=False)} puts it")
        else:
            self.log = p
            if not p.is_file():
                raise BadInput(no_log)
            self.folder = p.parent if p.name == "mlperf.log" else None
            config = p.parent / "config.toml"
            if config.is_file():
                self.target, _ = read_config(config)
        # "." is named by the folder it is, not "".
        self.name = (Path(os.path.abspath(self.folder)).name if self.folder is not None else self.log.stem) or arg
        # The files read, which --out must not replace.
        self.inputs = [self.log] + ([config] if config.is_file() else [])
        events = read_log(self.log)
        starts = [e["time_ms"] for e in events if e["key"] == "run_start"]
        if not starts:
            raise BadInput(f"{self.log}: no run_start line: the run did not begin training")
        self.run_start = starts[0]
        stops = [e for e in events if e["key"] == "run_stop"]
        self.status = stops[0].get("metadata", {}).get("status") if stops else "running"
        self.time_to_train = (stops[0]["time_ms"] - self.run_start) / 1000 if stops else None
        # step_num counts batches; the optimizer steps once every k of them (the scheduler's milestones count
        # those steps as step_num / k). k is the one logged last before a line: a resume whose
        # resume_weights_only took another k goes on with it, from step_num / k of the schedule.
        # train_loss is logged divided by k, as the reference logs it; the loss of a batch (what the progress
        # lines print) compares runs of every frequency.
        self.k = 1
        self.batches = 0  # the last batch logged
        self.steps = 0  # the optimizer steps made by then
        seen = {key: {} for key in PLOTTED}  # plotted key -> batch -> (step, seconds, value)
        self.epochs = 0
        for e in events:
            if e["key"] == ACCUMULATION:
                self.k = e["value"]
            if e["key"] not in PLOTTED or not isinstance(e.get("value"), (int, float)):
                continue
            meta = e.get("metadata", {})
            batch = meta.get("step_num")
            if not is_number(batch):
                continue
            epoch = meta.get("epoch_num", 0)
            self.epochs = max(self.epochs, epoch if is_number(epoch) else 0)
            if batch >= self.batches:
                self.batches, self.steps = batch, int(batch // self.k)
            value = e["value"] * self.k if e["key"] == "train_loss" else e["value"]
            if not finite(value):
                value = math.nan  # matplotlib leaves a gap at NaN (an infinity would stretch the axis)
            # The engine logs a step's figures again at the end of an epoch: one point per batch.
            seen[e["key"]].setdefault(batch, (batch / self.k, (e["time_ms"] - self.run_start) / 1000, value))
        self.series = {}  # plotted key -> (optimizer steps, seconds since run_start, values)
        for key in PLOTTED:
            points = [seen[key][batch] for batch in sorted(seen[key])]
            self.series[key] = tuple([point[n] for point in points] for n in range(3))
            gaps = sum(math.isnan(v) for v in self.series[key][2])
            if gaps:
                eprint(f"plot_run.py: note: {self.log}: {gaps} {key} value{'s' if gaps > 1 else ''} logged as NaN "
                       "or Infinity (a diverged run's); drawn as gaps")
        # A run that just began, or diverged before its first logging step: among others, it draws no curve.
        self.empty = not any(self.series[key][0] for key in PLOTTED)

    def summary(self):
        loss = self.series["train_loss"][2]
        finite_iou = [v for v in self.series["eval_accuracy"][2] if finite(v)]
        steps = f"{self.steps} steps" + (f" ({self.batches} batches, {self.k} per step)" if self.k > 1 else "")
        final = f"final train loss {loss[-1]:.4f}" if loss else "no train loss"
        best = f"best eval IoU {max(finite_iou):.4f}" if finite_iou else "no eval IoU"
        ttt = f"{self.time_to_train:.1f} s" if self.time_to_train is not None else "not finished"
        return f"{self.name}: {steps}, {self.epochs} epochs, {final}, {best}, time to train {ttt} ({self.status})"


def plot(runs, out, target, form, dpi):
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
        write_figure(fig, out, target, form, dpi)
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
        for printed, other in ((earlier, run), (run, earlier)):
            if printed.log.suffix == ".out" and other.folder is not None and \
                    Path(os.path.abspath(printed.log)).with_suffix("") == Path(os.path.abspath(other.folder)):
                raise BadInput(f"{printed.arg}: is what the ranks of run {other.arg} printed, its log lines "
                               f"again; give the run's folder alone (a glob of run folders ends in a slash: "
                               f"{run.name.rstrip('0123456789')}*/)")
        raise BadInput(f"{earlier.arg} and {run.arg}: both are named {run.name} in the legend; give each run "
                       "once (of two runs whose folders share a name, give one through a link of another name)")


def check_out(arg):
    """Refuses, before any plotting, an --out that names a folder or lies under a file."""
    if not arg:
        raise BadInput("--out names no file; give the file to write (as curves.png)")
    # Path drops a trailing slash: "plots/" wrote a file named plots.
    if arg.endswith(os.sep) or os.path.basename(arg) in (".", ".."):
        raise BadInput(f"{arg}: names a folder; --out names the file to write (as {arg.rstrip(os.sep)}/curves.png)")
    out = Path(arg)
    if out.is_dir():
        raise BadInput(f"{out}: is a folder; --out names the file to write (as {out / 'curves.png'})")
    for folder in out.parents:
        if folder.exists():
            if not folder.is_dir():
                raise BadInput(f"{out}: cannot write: {folder} is not a folder")
            break
    return out


def out_format(out):
    """The format --out's extension names, as savefig infers it (png without one); one matplotlib does not
    write is refused. Checked after refuse_inputs: an --out that is the log says so, not that .log is no
    format."""
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    form = out.suffix[1:].lower() or "png"
    if form not in formats:
        raise BadInput(f"{out}: --out's extension {out.suffix} names no format matplotlib writes; use one of "
                       + ", ".join(f".{name}" for name in sorted(formats)))
    return form


def refuse_inputs(out, target, runs):
    """Refuses an --out whose file (`target`) is one the plot read: by its path, through a link or a hard
    link. Renamed over, the log would be gone; a link to it would be replaced, not written through."""
    for run in runs:
        for path in run.inputs:
            if target.exists() and os.path.samefile(target, path):
                named = "" if os.path.abspath(out) == os.path.abspath(path) else f" ({path})"
                raise BadInput(f"{out}: is a file the plot reads{named}; name another --out")


def write_figure(fig, out, target, form, dpi):
    """The figure in the format `form` to a temporary beside `target`, the file `out` names (through a link,
    if it is one), renamed over it: it is never half-written, even when SIGINT comes, and a link stays a
    link."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.{secrets.token_hex(6)}"
    try:
        # "x", not mkstemp: the mode a plain open() gives (0666 less the umask), not mkstemp's fixed 0600;
        # O_EXCL keeps mkstemp's guarantee that the name is ours. Opened inside the try: a signal that
        # comes just after the open still removes it.
        with open(temp, "xb") as f:
            try:
                fig.savefig(f, dpi=dpi, format=form)
            except RuntimeError as e:  # a format's own tool missing (pgf: xelatex)
                raise BadInput(f"{out}: cannot write {form}: {e}") from None
        os.replace(temp, target)
    except FileExistsError:
        raise  # the temporary's name is another file's: not ours to remove
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def plot_runs(argv, stdout):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's output folder (or its MLPerf log)")
    parser.add_argument("--out", default="curves.png",
                        help="the file to write, in the format its extension names: .png, .pdf, .svg, ... "
                             "(default: curves.png)")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch; the figure is 12 x 12 inches")
    args = parser.parse_args(argv)
    if args.dpi < 20 or args.dpi > 600:
        parser.error(f"--dpi must be between 20 and 600, got {args.dpi}")
    out = args.out
    runs = []
    try:
        out = check_out(args.out)
        for arg in args.runs:
            try:
                runs.append(Run(arg))
            except OSError as e:
                # A read that fails part-way carries no file name.
                raise BadInput(f"{e.filename or arg}: cannot read: {e.strerror or e}") from None
        refuse_same_names(runs)
        empty = [run for run in runs if run.empty]
        if len(empty) == len(runs):
            raise BadInput(f"{', '.join(str(run.log) for run in empty)}: no {NO_LINES}: nothing to plot")
        for run in empty:
            eprint(f"plot_run.py: note: {run.log}: no {NO_LINES} yet; it draws no curve")
        # Written through a link, as savefig(out) would write.
        target = Path(os.path.realpath(out))
        refuse_inputs(out, target, runs)
        form = out_format(out)
        for run in runs:
            stdout.print(run.summary())
        plot(runs, out, target, form, args.dpi)
    except BadInput as e:
        eprint(f"plot_run.py: {e}")
        return 2
    except OSError as e:  # the figure's file: stdout's writes raise none
        eprint(f"plot_run.py: {out}: cannot write: {e.strerror or e}")
        return 2
    except Stopped as e:  # SIGINT or SIGTERM, as __main__ takes them
        eprint(f"plot_run.py: stopped by {e}: {out} is not written, and no temporary is left")
        e.told = True
        raise
    stdout.print(f"plot_run.py: wrote {out}")
    return 0


def main(argv=None):
    stdout = Stdout()
    try:
        status = plot_runs(argv, stdout)
    except SystemExit as e:  # argparse's --help (on stdout) and its usage errors
        status = e.code if isinstance(e.code, int) else 2
    return stdout.finish(status)


def stop(signum, frame):
    # A second one (Ctrl-C pressed again) is ignored: it would cut short the removal of the temporary.
    for taken in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(taken) is stop:
            signal.signal(taken, signal.SIG_IGN)
    raise Stopped(signum)


def end_by(signum):
    """Ends the process by the signal that stopped it, as the C++ tools end: a shell or Slurm, which sees
    how it ended, stops too (a loop over runs is not left going on after Ctrl-C)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, AttributeError):
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum  # if the signal could not end it


if __name__ == "__main__":
    # SIGINT and SIGTERM raise Stopped where the script is, so that the figure's temporary goes. One that
    # was ignored when the script started (a shell script's background job, nohup) stays ignored.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, stop)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop)
    try:
        sys.exit(main())
    except Stopped as e:
        if not getattr(e, "told", False):  # outside plot_runs' try: before the logs were read, after the figure
            eprint(f"plot_run.py: stopped by {e}")
        sys.exit(end_by(e.signum))
