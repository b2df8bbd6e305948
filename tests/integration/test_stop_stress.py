"""scripts/stop_stress.sh: a bad argument is a usage error, and a run of it stops a training run
with SIGTERM, cleanly, and reports the count. (It was written to measure a heap corruption that
one stop in 20 to 200 showed; test_stop_signal_thread.py tests its cause.)"""

import os
import subprocess

from helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "stop_stress.sh"


def test_a_bad_count_is_a_usage_error():
    r = subprocess.run([str(SCRIPT), "ten"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "STOPS and RANKS are whole numbers" in r.stderr, r.stderr


def test_one_stop_of_one_rank_is_made_cleanly_and_counted(tmp_path):
    r = subprocess.run([str(SCRIPT), "1", "1"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, WORK=str(tmp_path)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().splitlines()[-1] == "stop_stress: 0 bad of 1 stops (1 rank(s))", r.stdout
    assert (tmp_path / "data" / "stats.h5").is_file()  # its data set, in WORK
