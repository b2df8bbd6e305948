"""scripts/plot_run.py: the curves of two quickstart runs in one PNG that
opens, has the size asked for, is not blank, and draws both runs; a log or
--out it cannot use is named in one line with exit status 2, no traceback."""

import os
import re
import resource
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import REPO_ROOT, read_events, run_host, synth

SCRIPT = REPO_ROOT / "scripts" / "plot_run.py"
# matplotlib's first two cycle colours, one per run
RUN_COLOURS = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot-runs")
    data = synth(root / "data", train=16, validation=4, height=64, width=96, seed=5)
    dirs = []
    for seed in (3, 4):
        out = root / f"run-{seed}"
        r = run_host(REPO_ROOT / "configs/quickstart.toml", "--quiet", "--set", f"data.root={data}", "--set",
                     f"run.output_dir={out}", "--set", f"run.seed={seed}", "--set", "run.max_epochs=3",
                     "--set", "run.logging_frequency=1")
        assert r.returncode in (0, 1), r.stdout + r.stderr
        dirs.append(out)
    return dirs


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
