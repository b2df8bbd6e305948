"""scripts/plot_run.py: the curves of two quickstart runs in one PNG that
opens, has the size asked for, is not blank, and draws both runs; a log or
--out it cannot use is named in one line with exit status 2, no traceback."""

import importlib.util
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers import REPO_ROOT, read_events, run_host, synth

SCRIPT = REPO_ROOT / "scripts" / "plot_run.py"
# matplotlib's first two cycle colours, one per run
RUN_COLOURS = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)]


@pytest.fixture(scope="module")
def plot_data(tmp_path_factory):
    # 16 training samples: 4 batches an epoch at the quickstart's batch of 4.
    return synth(tmp_path_factory.mktemp("plot-data") / "data", train=16, validation=4, height=64, width=96, seed=5)


def quickstart_run(data, out, *settings):
    r = run_host(REPO_ROOT / "configs/quickstart.toml", "--quiet", "--set", f"data.root={data}", "--set",
                 f"run.output_dir={out}", "--set", "run.logging_frequency=1", *settings)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return out


@pytest.fixture(scope="module")
def two_runs(plot_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("plot-runs")
    return [quickstart_run(plot_data, root / f"run-{seed}", "--set", f"run.seed={seed}", "--set", "run.max_epochs=3")
            for seed in (3, 4)]


@pytest.fixture(scope="module")
def accumulating_run(plot_data, tmp_path_factory):
    """2 epochs of 4 batches at gradient_accumulation_frequency 2: 4 optimizer steps, the learning rate ten
    times smaller after the 3rd (milestones count optimizer steps)."""
    return quickstart_run(plot_data, tmp_path_factory.mktemp("plot-k2") / "k2", "--set", "run.max_epochs=2",
                          "--set", "run.gradient_accumulation_frequency=2", "--set", "scheduler.milestones=[3]")


def plot(*args, preexec_fn=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec_fn)


def refused(r, *names):
    """Exit status 2, one line of stderr naming each of `names`, no traceback."""
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for name in names:
        assert str(name) in r.stderr, r.stderr


def colour_pixels(image, rgb, tolerance=12):
    return int((np.abs(image[:, :, :3].astype(int) - np.array(rgb)).max(axis=2) <= tolerance).sum())


def test_curves_of_two_runs(two_runs, tmp_path):
    out = tmp_path / "curves.png"
    r = plot(*two_runs, "--out", out, "--dpi", 80)
    assert r.returncode == 0, r.stdout + r.stderr
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (12 * 80, 12 * 80)
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10, "the image is blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    # Every run is drawn on each of the 8 panels: many pixels of its colour.
    for rgb in RUN_COLOURS:
        assert colour_pixels(pixels, rgb) > 8 * 50, rgb
    # Each of the 8 panels (4 rows, 2 columns) has lines in a run's colour
    # (where both runs have the same values, as their learning rates, the
    # second run's line covers the first).
    h, w = pixels.shape[:2]
    for row in range(4):
        for col in range(2):
            panel = pixels[int(h * (0.04 + 0.24 * row)):int(h * (0.04 + 0.24 * (row + 1))),
                           col * w // 2:(col + 1) * w // 2]
            assert sum(colour_pixels(panel, rgb) for rgb in RUN_COLOURS) > 20, (row, col)
    assert not list(tmp_path.glob(".curves.png.*")), "a temporary file was left"

    # The printed summary: one line per run, figures from its log.
    lines = [l for l in r.stdout.splitlines() if l.startswith("run-")]
    assert len(lines) == 2, r.stdout
    for d, line in zip(two_runs, lines):
        events = read_events(d / "mlperf.log")
        best = max(e["value"] for e in events if e["key"] == "eval_accuracy")
        steps = max(e["metadata"]["step_num"] for e in events if e["key"] == "train_loss")
        assert line.startswith(f"{d.name}: {steps} steps, 3 epochs"), line
        assert f"best eval IoU {best:.4f}" in line, line


def test_bad_input_is_named(two_runs, tmp_path):
    r = plot(tmp_path / "nowhere", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "nowhere: no MLPerf log" in r.stderr, r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "mlperf.log").write_text((two_runs[0] / "mlperf.log").read_text() + ':::MLLOG {"key": broken\n')
    r = plot(bad, "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "mlperf.log:" in r.stderr and "not a JSON log line" in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_log_whose_last_line_is_being_written_is_plotted_without_it(two_runs, tmp_path):
    # A run in progress (or a copy taken mid-write) was refused whole: "not a JSON log line".
    text = (two_runs[0] / "mlperf.log").read_text()
    whole = text.splitlines(keepends=True)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "mlperf.log").write_text(text[:-40])
    r = plot(cut, "--out", tmp_path / "x.png")
    assert r.returncode == 0, r.stderr
    assert (f"plot_run.py: note: {cut / 'mlperf.log'}:{len(whole)}: the last line is cut short (a log being "
            "written); plotted without it") in r.stderr, r.stderr
    assert Image.open(tmp_path / "x.png").size[0] > 0
    # The same line cut short mid-file is still an error: only the last one may be being written.
    (cut / "mlperf.log").write_text("".join(whole[:-2]) + whole[-2][:-40] + "\n" + whole[-1])
    refused(plot(cut, "--out", tmp_path / "y.png"), f"{cut / 'mlperf.log'}:{len(whole) - 1}:")


def test_a_run_with_no_curve_yet_is_noted_beside_others_and_refused_alone(two_runs, tmp_path):
    """A run that just began (its log ends at run_start) plotted with a finished one: the whole command failed,
    drawing neither. It is listed, with a note, and draws no curve; alone, or with another such run, it is
    refused, naming each log."""
    lines = (two_runs[0] / "mlperf.log").read_text().splitlines(keepends=True)
    begun = [tmp_path / name for name in ("begun", "begun-too")]
    for folder in begun:
        folder.mkdir()
        (folder / "mlperf.log").write_text("".join(lines[:next(n for n, line in enumerate(lines)
                                                               if '"key": "run_start"' in line) + 1]))
    r = plot(two_runs[1], begun[0], "--out", tmp_path / "x.png")
    assert r.returncode == 0, r.stderr
    assert (f"plot_run.py: note: {begun[0] / 'mlperf.log'}: no train_loss, train_accuracy, eval_accuracy or "
            "learning_rate lines yet; it draws no curve") in r.stderr, r.stderr
    assert re.search(r"^begun: 0 steps, 0 epochs, no train loss, no eval IoU, time to train not finished "
                     r"\(running\)$", r.stdout, re.M), r.stdout
    assert Image.open(tmp_path / "x.png").size[0] > 0
    refused(plot(*begun, "--out", tmp_path / "y.png"), begun[0] / "mlperf.log", begun[1] / "mlperf.log",
            "nothing to plot")
    assert not (tmp_path / "y.png").exists()


def test_bad_out_is_named(two_runs, tmp_path):
    (tmp_path / "afile").write_text("x")
    refused(plot(two_runs[0], "--out", tmp_path / "afile" / "x.png"), tmp_path / "afile")
    (tmp_path / "adir.png").mkdir()
    refused(plot(two_runs[0], "--out", tmp_path / "adir.png"), tmp_path / "adir.png")
    assert not list((tmp_path / "adir.png").iterdir())

    # RLIMIT_FSIZE stands in for a full disk; Python ignores SIGXFSZ, so the write fails with EFBIG.
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = tmp_path / "small.png"
    r = plot(two_runs[0], "--out", out, "--dpi", 40, preexec_fn=limit_file_size)
    refused(r, out)
    assert "File too large" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.png", "afile"], "a temporary file was left"


def test_png_mode_follows_umask(two_runs, tmp_path):
    out = tmp_path / "curves.png"
    r = plot(two_runs[0], "--out", out, "--dpi", 40, preexec_fn=lambda: os.umask(0o027))
    assert r.returncode == 0, r.stdout + r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640, oct(out.stat().st_mode)


def test_bad_config_or_log_values_are_named(two_runs, tmp_path):
    log = (two_runs[0] / "mlperf.log").read_text()
    for name, config in (("binary", b"\xff\xfe[run]\n"), ("not-a-table", b"run = 5\n"),
                         ("text-target", b'[run]\ntarget_iou = "high"\n')):
        run = tmp_path / name
        run.mkdir()
        (run / "mlperf.log").write_text(log)
        (run / "config.toml").write_bytes(config)
        refused(plot(run, "--out", tmp_path / "x.png"), run / "config.toml")
    run = tmp_path / "text-time"
    run.mkdir()
    (run / "mlperf.log").write_text(log.replace('"time_ms": ', '"time_ms": "', 1)
                                    .replace(', "event_type"', '", "event_type"', 1))
    refused(plot(run, "--out", tmp_path / "x.png"), run / "mlperf.log")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_unreadable_log_is_named(two_runs, tmp_path):
    log = tmp_path / "mlperf.log"
    log.write_text((two_runs[0] / "mlperf.log").read_text())
    log.chmod(0)
    refused(plot(log, "--out", tmp_path / "x.png"), log)


def test_a_log_that_cannot_be_read_is_named_under_root(tmp_path):
    # Root ignores file modes; a folder in the log's place is unreadable for anyone.
    run = tmp_path / "run"
    (run / "mlperf.log").mkdir(parents=True)
    refused(plot(run / "mlperf.log", "--out", tmp_path / "x.png"), run / "mlperf.log")
    assert not (tmp_path / "x.png").exists()


def copy_run(run, to):
    to.mkdir()
    for name in ("mlperf.log", "config.toml"):
        (to / name).write_bytes((run / name).read_bytes())
    return to


def test_an_out_that_is_an_input_is_refused(two_runs, tmp_path):
    # It wrote the PNG over the run's log (exit 0), which the next plot then refused.
    run = copy_run(two_runs[0], tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in ("mlperf.log", "config.toml")}
    (tmp_path / "log-link.png").symlink_to(run / "mlperf.log")
    os.link(run / "config.toml", tmp_path / "config-hardlink.png")
    for args, out in (([run], run / "mlperf.log"), ([run], run / "config.toml"),
                      ([run / "mlperf.log"], run / "mlperf.log"), ([two_runs[1], run], run / "config.toml"),
                      ([run], tmp_path / "log-link.png"), ([run], tmp_path / "config-hardlink.png")):
        r = plot(*args, "--out", out)
        refused(r, out)
        assert "reads" in r.stderr, r.stderr
    assert {name: (run / name).read_bytes() for name in before} == before
    assert (tmp_path / "log-link.png").is_symlink()
    assert not [p for p in tmp_path.rglob(".*")], "a temporary file was left"


def test_an_out_that_is_a_link_is_written_through(two_runs, tmp_path):
    # As matplotlib's savefig(path) and PIL's save(path) do: the link stays, its target gets the PNG.
    for target in (tmp_path / "old.png", tmp_path / "new.png"):  # an existing target, a dangling link
        if target.name == "old.png":
            target.write_bytes(b"an older picture")
        link = tmp_path / f"link-to-{target.name}"
        link.symlink_to(target.name)
        r = plot(two_runs[0], "--out", link, "--dpi", 30)
        assert r.returncode == 0, r.stdout + r.stderr
        assert link.is_symlink() and os.readlink(link) == target.name
        with Image.open(target) as im:
            assert im.format == "PNG" and im.size == (12 * 30, 12 * 30)
    assert not list(tmp_path.glob(".*")), "a temporary file was left"


def test_a_number_no_float_holds_is_named_with_its_line(two_runs, tmp_path):
    # A 400-digit value or step_num ended in an OverflowError traceback (exit 1).
    lines = (two_runs[0] / "mlperf.log").read_text().splitlines(keepends=True)
    at = next(k for k, l in enumerate(lines) if '"key": "train_loss"' in l)
    huge = "1" + "0" * 400
    for name, change in (
            ("value", lambda l: re.sub(r'"value": [^,]*', f'"value": {huge}', l)),
            ("step", lambda l: re.sub(r'"step_num": \d+', f'"step_num": {huge}', l)),
            ("time", lambda l: re.sub(r'"time_ms": [^,]*', f'"time_ms": {huge}', l)),
            ("nan", lambda l: re.sub(r'"time_ms": [^,]*', '"time_ms": NaN', l)),
            ("infinity", lambda l: re.sub(r'"step_num": \d+', '"step_num": -Infinity', l)),
            # Beyond Python's 4300 digits: json.loads raised ValueError, not JSONDecodeError.
            ("digits", lambda l: re.sub(r'"value": [^,]*', '"value": ' + "9" * 5000, l))):
        log = tmp_path / f"{name}.log"
        changed = change(lines[at])
        assert changed != lines[at], name
        log.write_text("".join(lines[:at] + [changed] + lines[at + 1:]))
        refused(plot(log, "--out", tmp_path / "x.png"), f"{log}:{at + 1}:")
    assert not (tmp_path / "x.png").exists()


def test_a_diverged_run_s_nan_values_are_drawn_as_gaps_with_a_note(two_runs, tmp_path):
    # A diverged run logs eval_accuracy as NaN (README); the plot refused such a log (exit 2), so the run
    # whose curves were wanted most could not be plotted.
    run = copy_run(two_runs[0], tmp_path / "diverged")
    log = run / "mlperf.log"
    lines = log.read_text().splitlines(keepends=True)
    evals = [k for k, l in enumerate(lines) if '"key": "eval_accuracy"' in l]
    losses = [k for k, l in enumerate(lines) if '"key": "train_loss"' in l]
    lines[evals[-1]] = re.sub(r'"value": [^,]*', '"value": NaN', lines[evals[-1]])
    lines[losses[-1]] = re.sub(r'"value": [^,]*', '"value": Infinity', lines[losses[-1]])
    log.write_text("".join(lines))
    out = tmp_path / "diverged.png"
    r = plot(run, "--out", out, "--dpi", 30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (f"plot_run.py: note: {log}: 1 eval_accuracy value logged as NaN or Infinity (a diverged run's); drawn "
            "as gaps") in r.stderr, r.stderr
    assert f"plot_run.py: note: {log}: 1 train_loss value logged as NaN or Infinity" in r.stderr, r.stderr
    finite = [e["value"] for e in read_events(log) if e["key"] == "eval_accuracy" and e["value"] == e["value"]]
    assert f"best eval IoU {max(finite):.4f}" in r.stdout, r.stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and colour_pixels(np.asarray(im), RUN_COLOURS[0]) > 0


def test_train_loss_is_a_batchs_loss_whatever_the_accumulation(two_runs, tmp_path):
    """The log's train_loss is divided by gradient_accumulation_frequency (as the reference logs it): runs
    of different frequencies drew curves k times apart, and the progress lines print k times the log's."""
    run = tmp_path / "k2"
    run.mkdir()
    text = (two_runs[0] / "mlperf.log").read_text()
    edited = re.sub(r'("key": "gradient_accumulation_frequency", "value": )1\b', r"\g<1>2", text)
    assert edited != text
    (run / "mlperf.log").write_text(edited)
    losses = [e["value"] for e in read_events(two_runs[0] / "mlperf.log") if e["key"] == "train_loss"]
    r = plot(two_runs[0], run, "--out", tmp_path / "curves.png", "--dpi", 40)
    assert r.returncode == 0, r.stdout + r.stderr
    final = {l.split(":")[0]: float(re.search(r"final train loss ([0-9.]+)", l).group(1))
             for l in r.stdout.splitlines() if "final train loss" in l}
    assert final == {two_runs[0].name: pytest.approx(losses[-1], abs=1e-4),
                     "k2": pytest.approx(2 * losses[-1], abs=1e-4)}, r.stdout


def test_two_inputs_of_one_name_are_refused_naming_both(two_runs, tmp_path):
    """README's `scripts/plot_run.py runs/slurm/JOB_*` also matched the JOB_n.out that run.sub writes beside
    each run's folder JOB_n/ (what its ranks printed, the log's lines again): every run was plotted twice
    under one name, exit 0."""
    slurm = tmp_path / "slurm"
    slurm.mkdir()
    for n, run in enumerate(two_runs, 1):
        copy_run(run, slurm / f"777_{n}")
        (slurm / f"777_{n}.out").write_text("deepcam-host: rank 0 of 1\n" + (run / "mlperf.log").read_text())
    out = tmp_path / "curves.png"
    inputs = sorted(slurm.glob("777_*"))  # what the shell's 777_* gives: 777_1, 777_1.out, 777_2, 777_2.out
    r = plot(*inputs, "--out", out)
    refused(r, f"{slurm / '777_1.out'}: is what the ranks of run {slurm / '777_1'} printed", "folder alone",
            "777_*/")
    # The same run twice, and two runs in folders of one name, cannot be told apart in the legend either.
    other = copy_run(two_runs[1], tmp_path / "elsewhere")
    (tmp_path / "b").mkdir()
    renamed = copy_run(two_runs[1], tmp_path / "b" / "777_1")
    for args in ([slurm / "777_1", slurm / "777_1" / "mlperf.log"], [slurm / "777_1", renamed]):
        refused(plot(*args, "--out", out), f"{args[0]} and {args[1]}: both are named 777_1 in the legend")
    assert not out.exists()
    # The folders alone, as README's `runs/slurm/JOB_*/` gives them: each run once.
    assert "scripts/plot_run.py runs/slurm/JOB_*/ --out" in (REPO_ROOT / "README.md").read_text()
    r = plot(*sorted(slurm.glob("777_*/")), other, "--out", out, "--dpi", 30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [l.split(":")[0] for l in r.stdout.splitlines()[:3]] == ["777_1", "777_2", "elsewhere"], r.stdout


def test_a_stdout_that_cannot_be_written_neither_stops_the_figure_nor_blames_out(two_runs, tmp_path):
    """The runs' lines were printed inside the try that caught the figure's OSError: a stdout whose reader
    had quit, or on a full disk, left the PNG unwritten and was reported as `--out: cannot write`; `| head
    -1` ended in a BrokenPipeError traceback."""
    # A reader that quit (EPIPE) is no failure: the figure is written, status 0, nothing on stderr.
    out = tmp_path / "quit.png"
    p = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, [*two_runs, "--out", out, "--dpi", 30])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0 and err == "", err
    assert Image.open(out).format == "PNG"
    # As `| head -1` reads: the first run's line, and no traceback.
    out = tmp_path / "head.png"
    r = subprocess.run(["bash", "-c", '"$@" | head -1; exit "${PIPESTATUS[0]}"', "bash", sys.executable,
                        *map(str, [SCRIPT, *two_runs, "--out", out, "--dpi", 30])], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith(f"{two_runs[0].name}: ") and len(r.stdout.splitlines()) == 1, r.stdout
    assert Image.open(out).format == "PNG"
    # A stdout on a full disk: the figure is written all the same, and the loss is told once, naming
    # standard output and its cause, not --out (status 2, as the C++ tools say it).
    out = tmp_path / "full.png"
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, *map(str, [SCRIPT, two_runs[0], "--out", out, "--dpi", 30])], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("plot_run.py: cannot write to standard output: No space left on device; what it shows "
                        "there is lost\n"), r.stderr
    assert Image.open(out).format == "PNG"
    assert not list(tmp_path.glob(".*")), "a temporary file was left"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_figure_is_written_leaves_the_old_file_and_no_temporary(two_runs, tmp_path, sig):
    # Ctrl-C ended in a KeyboardInterrupt traceback; SIGTERM left the figure's temporary behind.
    out = tmp_path / "curves.png"
    out.write_bytes(b"an older picture")
    # 300 dpi: a figure of 3600 x 3600 pixels, a second or more of drawing after its temporary is opened.
    p = subprocess.Popen([sys.executable, *map(str, [SCRIPT, *two_runs, "--out", out, "--dpi", 300])],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".curves.png.*")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, "it ended before its temporary was seen"
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    # Ended by the signal itself, as the C++ tools end (a shell's $? is 128 + the signal: 130 for SIGINT).
    assert p.returncode == -sig, (p.returncode, err)
    assert err == f"plot_run.py: stopped by {sig.name}: {out} is not written, and no temporary is left\n", err
    assert out.read_bytes() == b"an older picture"
    assert sorted(tmp_path.iterdir()) == [out], "a temporary file was left"


def test_the_step_axis_counts_optimizer_steps(accumulating_run, tmp_path, monkeypatch, capsys):
    """The left panels, labelled "optimizer step", drew the log's step_num, which counts batches: at
    gradient_accumulation_frequency 2 every curve was twice as long, and the learning rate that drops after
    optimizer step 3 (milestones = [3]) dropped at "step" 7."""
    from matplotlib.figure import Figure

    drawn = {}  # panel title -> the run's (x, y)
    save = Figure.savefig

    def spy(fig, *args, **kwargs):
        for ax in fig.axes:
            lines = [line for line in ax.get_lines() if line.get_label() == accumulating_run.name]
            assert len(lines) == 1, ax.get_title()
            drawn[ax.get_title()] = (ax.get_xlabel(), list(lines[0].get_xdata()), list(lines[0].get_ydata()))
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    spec = importlib.util.spec_from_file_location("plot_run", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(accumulating_run), "--out", str(tmp_path / "k2.png"), "--dpi", "30"]) == 0

    events = read_events(accumulating_run / "mlperf.log")
    assert [e["value"] for e in events if e["key"] == "gradient_accumulation_frequency"] == [2]
    for key, title in (("train_loss", "train loss"), ("train_accuracy", "train IoU"),
                       ("eval_accuracy", "eval IoU"), ("learning_rate", "learning rate")):
        batches = sorted({e["metadata"]["step_num"] for e in events if e["key"] == key})
        xlabel, x, _ = drawn[f"{title} vs step"]
        assert xlabel == "optimizer step"
        assert x == pytest.approx([b / 2 for b in batches]), title
    _, x, lr = drawn["learning rate vs step"]
    assert x == pytest.approx([0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4])
    # Milestone 3: the first 3 optimizer steps at 0.002, the 4th at a tenth of it. (Between them, the 7th
    # batch, x = 3.5, is logged with the rate set last.)
    assert [rate for step, rate in zip(x, lr) if step <= 3] == [0.002] * 6
    assert lr[x.index(4)] == pytest.approx(0.0002)
    # The printed line counts optimizer steps too, and says how many batches they took.
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"{accumulating_run.name}: 4 steps (8 batches, 2 per step), 2 epochs, "), line


def test_an_out_that_names_a_folder_or_an_unknown_format_is_refused_a_known_one_is_written(two_runs, tmp_path):
    """`--out plots/` (a folder that does not exist) wrote a PNG file named plots, and `--out x.pdf` PNG
    bytes in a .pdf."""
    r = plot(two_runs[0], "--out", f"{tmp_path / 'plots'}/")
    refused(r, f"{tmp_path / 'plots'}/: names a folder; --out names the file to write")
    assert not (tmp_path / "plots").exists()
    # Written in the format the extension names, as matplotlib's savefig infers it.
    for name, starts in (("curves.pdf", b"%PDF-"), ("curves.svg", b"<?xml"), ("curves.png", b"\x89PNG")):
        out = tmp_path / name
        r = plot(two_runs[0], "--out", out, "--dpi", 30)
        assert r.returncode == 0 and f"plot_run.py: wrote {out}" in r.stdout, r.stdout + r.stderr
        assert out.read_bytes().startswith(starts), name
    assert b"<svg" in (tmp_path / "curves.svg").read_bytes()
    # An extension that names no format matplotlib writes is refused, listing those it does.
    r = plot(two_runs[0], "--out", tmp_path / "curves.xyz")
    refused(r, f"{tmp_path / 'curves.xyz'}: --out's extension .xyz names no format matplotlib writes; use one of ",
            ".pdf", ".png", ".svg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.pdf", "curves.png", "curves.svg"]


def test_a_run_folder_s_log_is_where_its_config_toml_puts_it(two_runs, tmp_path):
    """A run whose [mlperf] log_file put its log elsewhere (as package finds it) was refused: "no MLPerf log
    (give a run's output folder, ...)", although a run's output folder was given."""
    run = copy_run(two_runs[0], tmp_path / "run")
    config = run / "config.toml"
    text = config.read_text()
    assert 'log_file = "mlperf.log"' in text
    elsewhere = tmp_path / "logs" / "run.log"
    elsewhere.parent.mkdir()
    (run / "mlperf.log").rename(elsewhere)
    # Absolute, and relative to the run's folder.
    for log_file in (str(elsewhere), "../logs/run.log"):
        config.write_text(text.replace('log_file = "mlperf.log"', f'log_file = "{log_file}"'))
        r = plot(run, "--out", tmp_path / "curves.png", "--dpi", 30)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.startswith("run: 12 steps, 3 epochs, "), r.stdout  # named by its folder
        # The log it reads is one --out must not replace.
        r = plot(run, "--out", elsewhere)
        refused(r, elsewhere, "is a file the plot reads")
    # Not there: the message names config.toml's setting and where it points.
    elsewhere.unlink()
    refused(plot(run, "--out", tmp_path / "x.png"),
            f"plot_run.py: {run}: no MLPerf log at {run / '../logs/run.log'}, where {config}'s [mlperf] log_file = "
            '"../logs/run.log" puts it')
    assert not (tmp_path / "x.png").exists()
