"""deepcam-data's progress lines: synth, stats, convert and verify print
"done/total unit (N%), rate unit/s, time left" on stderr at the interval
--progress-seconds sets; none with --quiet; and, with stderr not a
terminal, at most one per 30 s by default (none for work this short)."""

import re

import pytest

from helpers import run_data

LINE = re.compile(r"^deepcam-data: (\w+): (\d+)/(\d+) (samples|files) \((\d+)%\), [0-9.]+ \4/s, "
                  r"(\d+ s|\d+ min \d\d s|\d+ h \d\d min) left$")


def progress_lines(stderr, command):
    out = []
    for line in stderr.splitlines():
        m = LINE.match(line)
        if m and m.group(1) == command:
            out.append((int(m.group(2)), int(m.group(3)), m.group(4)))
    return out


def check_lines(lines, total, unit):
    assert lines, "no progress line"
    done = [d for d, _, _ in lines]
    assert all(t == total and u == unit for _, t, u in lines), lines
    assert done == sorted(done) and 0 < done[0] and done[-1] < total, lines


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # Big enough that each sample takes a few milliseconds on one thread.
    out = tmp_path_factory.mktemp("progress") / "set"
    proc = run_data("synth", "--out", out, "--train", 24, "--validation", 4, "--height", 128, "--width", 192,
                    "--threads", 1, "--progress-seconds", "0.001")
    assert proc.returncode == 0, proc.stderr
    check_lines(progress_lines(proc.stderr, "synth"), 28, "samples")
    # synth's statistics re-read the training files, with progress of their own.
    check_lines(progress_lines(proc.stderr, "stats"), 24, "files")
    return out


def test_stats_convert_and_verify_show_done_of_total(root, tmp_path):
    proc = run_data("stats", root, "--progress-seconds", "0.001")
    assert proc.returncode == 0, proc.stderr
    check_lines(progress_lines(proc.stderr, "stats"), 24, "files")
    proc = run_data("convert", root, tmp_path / "npy", "--threads", 1, "--progress-seconds=0.001")
    assert proc.returncode == 0, proc.stderr
    check_lines(progress_lines(proc.stderr, "convert"), 28, "samples")
    proc = run_data("verify", tmp_path / "npy", "--threads", 1, "--progress-seconds", "0.001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_lines(progress_lines(proc.stderr, "verify"), 28, "samples")
    assert "no problems" in proc.stdout


def test_quiet_prints_nothing_but_verify_s_report(root, tmp_path):
    for args in (["synth", "--out", tmp_path / "q", "--train", 6, "--validation", 2, "--height", 128,
                  "--width", 192, "--threads", 1],
                 ["stats", root],
                 ["convert", root, tmp_path / "npy", "--threads", 1],
                 ["verify", tmp_path / "npy", "--threads", 1]):
        proc = run_data(*args, "--quiet", "--progress-seconds", "0.001")
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "", proc.stderr
    assert "no problems" in proc.stdout  # verify's report is its output


def test_no_progress_lines_for_short_work_when_stderr_is_not_a_terminal(root, tmp_path):
    proc = run_data("convert", root, tmp_path / "npy")
    assert proc.returncode == 0, proc.stderr
    assert not progress_lines(proc.stderr, "convert"), proc.stderr
    # One summary line: no line per sample.
    assert proc.stderr.count("\n") == 1 and "28 converted" in proc.stderr, proc.stderr


@pytest.mark.parametrize("value", ["0", "-1", "soon", "", "0x10", " 5", "+5"])
def test_a_bad_interval_is_a_usage_error(root, value):
    proc = run_data("verify", root, "--progress-seconds", value)
    says = "argument 3 (after --progress-seconds) is empty" if value == "" else "--progress-seconds expects seconds"
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
