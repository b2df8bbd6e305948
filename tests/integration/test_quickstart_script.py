"""scripts/quickstart.sh, run as a copy in a temporary checkout: build/ and .venv/ are links to the
real ones and scripts/setup.sh is a stand-in that does nothing (the real one would set up and
build). The rest is the real quickstart, its data set included. One such checkout trains to the
target once (seconds on 2 cores); each test runs the script again in a copy of it. The runs meant
to fail stop after one epoch (--set run.max_epochs=1, which the script passes on to deepcam-host)."""

import shutil
import subprocess

import pytest

from helpers import BUILD_DIR, REPO_ROOT, clean_env


def checkout(tmp_path):
    top = tmp_path / "top"
    (top / "scripts").mkdir(parents=True)
    (top / "configs").mkdir()
    shutil.copy2(REPO_ROOT / "scripts/quickstart.sh", top / "scripts/quickstart.sh")
    setup = top / "scripts/setup.sh"
    setup.write_text("#!/bin/sh\n# stand-in: the test runs against the build that is there\nexit 0\n")
    setup.chmod(0o755)
    shutil.copy2(REPO_ROOT / "configs/quickstart.toml", top / "configs/quickstart.toml")
    (top / "build").symlink_to(BUILD_DIR)
    (top / ".venv").symlink_to(REPO_ROOT / ".venv")
    return top


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkout whose first quickstart wrote the data set and reached its target:
    runs/quickstart/mlperf.log passes the checker. Each test works on its own copy, so that a run
    meant to fail has a passing log beside it that it must not check."""
    top = checkout(tmp_path_factory.mktemp("trained"))
    rc, out, err = quickstart(top)
    assert rc == 0 and "SUCCESS" in last_lines(out), f"{rc}\n{out}\n{err}"
    assert (top / "runs/quickstart/mlperf.log").is_file()
    return top


def copy_of(top, tmp_path):
    copy = tmp_path / "top"
    shutil.copytree(top, copy, symlinks=True)  # build/ and .venv/ stay links
    return copy


def quickstart(top, *args):
    r = subprocess.run([str(top / "scripts/quickstart.sh"), "--quiet", *map(str, args)], capture_output=True,
                       text=True, env=clean_env(OMP_NUM_THREADS=1), timeout=600)
    return r.returncode, r.stdout, r.stderr


def last_lines(stdout, n=4):
    return "\n".join(stdout.splitlines()[-n:])


def test_a_diverged_run_exits_with_the_hosts_status_and_shows_the_verdict(trained, tmp_path):
    top = copy_of(trained, tmp_path)
    rc, out, err = quickstart(top, "--set", "optimizer.lr=1e30", "--set", "run.max_epochs=1")
    assert "training diverged" in err, err
    assert rc == 4, f"{rc}\n{out}\n{err}"
    assert "quickstart: training took" in out, f"{out}\n{err}"
    assert "FAILED" in last_lines(out) and "Logging output also at" not in last_lines(out), out


def test_a_run_short_of_the_target_exits_1_and_shows_the_verdict(trained, tmp_path):
    top = copy_of(trained, tmp_path)
    rc, out, err = quickstart(top, "--set", "run.max_epochs=1")
    assert rc == 1, f"{rc}\n{out}\n{err}"
    lines = last_lines(out)
    assert "quickstart: training took" in lines and "FAILED" in lines, f"{out}\n{err}"
    assert "Logging output also at" not in lines, out


def test_bad_arguments_exit_with_the_hosts_status_without_checking_an_old_log(trained, tmp_path):
    top = copy_of(trained, tmp_path)
    rc, out, err = quickstart(top, "--set", "run.no_such_key=1")
    assert rc == 2, f"{rc}\n{out}\n{err}"
    assert "SUCCESS" not in out and "quickstart: training took" in out, out


def test_the_log_checked_is_that_of_the_run_the_quickstart_started(trained, tmp_path):
    """A first quickstart reaches its target, so runs/quickstart/mlperf.log passes the checker; the
    next ones send their run elsewhere and stop short of the target: each must check its own log
    and fail, not the first one's and pass."""
    top = copy_of(trained, tmp_path)

    other = tmp_path / "other"
    rc, out, err = quickstart(top, "--set", f"run.output_dir={other}", "--set", "run.max_epochs=1")
    assert rc == 1, f"{rc}\n{out}\n{err}"
    lines = last_lines(out)
    assert "FAILED" in lines and "SUCCESS" not in lines, f"{out}\n{err}"
    assert f"(log: {other / 'mlperf.log'})" in lines, lines

    rc, out, err = quickstart(top, "--set", "mlperf.log_file=second.log", "--set", "run.max_epochs=1")
    assert rc == 1, f"{rc}\n{out}\n{err}"
    lines = last_lines(out)
    assert "FAILED" in lines and "SUCCESS" not in lines, f"{out}\n{err}"
    assert "second.log)" in lines, lines
    assert (top / "runs/quickstart/second.log").is_file()
