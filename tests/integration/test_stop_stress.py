"""scripts/stop_stress.sh: a bad argument is a usage error, and a run of it stops a training run
with SIGTERM, cleanly, and reports the count; over a stand-in deepcam-host, bad stops are counted
and the first one that leaves a core ends the script. (It was written to measure a heap corruption that
one stop in 20 to 200 showed; test_stop_signal_thread.py tests its cause.)"""

import os
import subprocess

import pytest

from helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "stop_stress.sh"


@pytest.mark.parametrize("args", [["ten"], ["0"], ["1", "0"], ["1", "1", "1"]])
def test_a_bad_count_is_a_usage_error(args):
    # 0 stops ended on an unbound variable (status 1); 0 ranks ran one and reported 0.
    r = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "STOPS and RANKS are whole numbers of at least 1" in r.stderr, r.stderr


def test_one_stop_of_one_rank_is_made_cleanly_and_counted_and_a_second_run_in_its_work_too(tmp_path):
    # The second run refused to start: synth refuses the finished set the first one left.
    for _ in range(2):
        r = subprocess.run([str(SCRIPT), "1", "1"], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, WORK=str(tmp_path)))
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.rstrip().splitlines()[-1] == "stop_stress: 0 bad of 1 stops (1 rank(s))", r.stdout
        assert (tmp_path / "data" / "stats.h5").is_file()  # its data set, in WORK


def fake_tree(tmp_path):
    """The script in a tree of its own, whose deepcam-data does nothing and whose deepcam-host
    stays up until SIGTERM and then ends with 134 (SIGABRT's status: a bad stop), first writing
    the file FAKE_CORE names in its working folder, as a dumped core would be."""
    top = tmp_path / "top"
    (top / "scripts").mkdir(parents=True)
    (top / "build" / "core").mkdir(parents=True)
    (top / "configs").mkdir()
    (top / "configs" / "quickstart.toml").write_text("")
    script = top / "scripts" / "stop_stress.sh"
    script.write_text(SCRIPT.read_text())
    data = top / "build" / "core" / "deepcam-data"
    data.write_text("#!/usr/bin/env bash\nexit 0\n")
    host = top / "build" / "core" / "deepcam-host"
    host.write_text("#!/usr/bin/env bash\n"
                    "trap 'exit 134' TERM\n"
                    "[ -n \"${FAKE_CORE:-}\" ] && : > \"$FAKE_CORE\"\n"
                    "while :; do sleep 0.1; done\n")
    for f in (script, data, host):
        f.chmod(0o755)
    return script


def run_fake(tmp_path, stops, core=""):
    work = tmp_path / "work"
    r = subprocess.run([str(fake_tree(tmp_path)), str(stops), "1"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, WORK=str(work), FAKE_CORE=core))
    return r, work


def test_bad_stops_are_counted_and_the_script_goes_on_while_no_core_is_dumped(tmp_path):
    r, work = run_fake(tmp_path, 2)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stop 1: exit status 134" in r.stdout and "stop 2: exit status 134" in r.stdout, r.stdout
    assert r.stdout.rstrip().splitlines()[-1] == "stop_stress: 2 bad of 2 stops (1 rank(s))", r.stdout
    assert (work / "bad-1.txt").is_file() and (work / "bad-2.txt").is_file()


def test_a_dumped_core_ends_the_script_at_that_stop_and_is_left_in_work(tmp_path):
    for name in ("core", "core.4242"):
        r, work = run_fake(tmp_path / name, 3, core=name)
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"stop_stress: a core was dumped in {work}; stopping here" in r.stdout, r.stdout
        assert r.stdout.rstrip().splitlines()[-1] == "stop_stress: 1 bad of 1 stops (1 rank(s))", r.stdout
        assert (work / name).is_file()
