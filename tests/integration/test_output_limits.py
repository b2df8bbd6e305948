"""The run's output under limits (issue 9 section 3): a file-size limit
(ulimit -f) or a full disk while writing a checkpoint or the MLPerf log is a
clear error (exit 2) that leaves no half-written file and no temporary
file; every output name is checked before training starts."""

import os
import resource
import stat
import subprocess

import pytest

from helpers import HOST, plugin_env, read_events, run_host, synth, write_run

RUN = {"max_epochs": 1, "target_iou": 1.0, "logging_frequency": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("limits") / "data", train=4, validation=2, seed=4)


def run_limited(run, limit_bytes, *args):
    """The host under `ulimit -f` (RLIMIT_FSIZE) of `limit_bytes`."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([str(HOST), str(run), *map(str, args)], capture_output=True, text=True,
                          env=plugin_env(), timeout=600, preexec_fn=limit)


def whole_lines(log):
    """Every line of the log is complete JSON (read_events asserts it)."""
    text = log.read_text()
    assert text.endswith("\n"), text[-200:]
    return read_events(log)


def leftovers(out):
    return sorted(p.name for p in out.iterdir() if ".tmp-" in p.name or ".partial-" in p.name)


def test_a_checkpoint_over_the_file_size_limit_is_a_clear_error(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={**RUN, "checkpoint_every": 1})
    # Under the limit the run writes a checkpoint far larger than its log.
    free = tmp_path / "free"
    assert run_host(run, "--set", f"run.output_dir={free}").returncode == 1
    size = (free / "checkpoint-epoch1.pt").stat().st_size
    log_size = (free / "mlperf.log").stat().st_size
    assert size > 4 * log_size
    r = run_limited(run, size // 2)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])  # not killed by SIGXFSZ
    assert (f"{out / 'checkpoint-epoch1.pt'}: cannot write: File too large (the file would exceed the file-size "
            f"limit, ulimit -f") in r.stderr, r.stderr[-2000:]
    assert "internal error" not in r.stderr
    assert not (out / "checkpoint-epoch1.pt").exists()
    assert leftovers(out) == []
    events = whole_lines(out / "mlperf.log")
    assert events[-1]["key"] == "run_stop" and events[-1]["metadata"]["status"] == "aborted"


def test_the_end_checkpoint_over_the_limit_adds_no_second_run_stop(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run=RUN)  # the checkpoint after run_stop
    free = tmp_path / "free"
    assert run_host(run, "--set", f"run.output_dir={free}").returncode == 1
    r = run_limited(run, (free / "checkpoint-epoch1.pt").stat().st_size // 2)
    assert r.returncode == 2 and "File too large" in r.stderr, r.stderr[-2000:]
    keys = [e["key"] for e in whole_lines(out / "mlperf.log")]
    assert keys.count("run_stop") == 1 and keys[-1] == "run_stop"
    assert leftovers(out) == [] and not (out / "checkpoint-epoch1.pt").exists()


def test_the_log_over_the_file_size_limit_keeps_whole_lines(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={**RUN, "checkpoint_every": -1})
    free = tmp_path / "free"
    assert run_host(run, "--set", f"run.output_dir={free}").returncode == 1
    config = (free / "config.toml").stat().st_size
    log = (free / "mlperf.log").stat().st_size
    # The limit is per file: config.toml fits, the log stops at its last lines
    # (after run_start, so that the record is kept).
    limit = log - 150
    assert config < limit
    r = run_limited(run, limit)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert f"{out / 'mlperf.log'}: cannot write: File too large" in r.stderr, r.stderr[-2000:]
    assert "the log keeps the lines written whole before it" in r.stderr
    assert "internal error" not in r.stderr
    events = whole_lines(out / "mlperf.log")
    assert 0 < len(events) and (out / "mlperf.log").stat().st_size <= limit
    assert [e["key"] for e in events[:2]] == ["submission_benchmark", "submission_org"]
    assert "run_start" in [e["key"] for e in events]  # cut after run_start, as the limit was set


def test_config_over_the_file_size_limit_is_a_clear_error_leaving_nothing(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run=RUN)
    r = run_limited(run, 100)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{out / 'config.toml'}: cannot write: File too large" in r.stderr, r.stderr[-2000:]
    assert not out.exists()


# --- every output name before training --------------------------------------

def refused_before_training(r, out):
    assert r.returncode == 2, r.stderr[-2000:]
    assert "epoch 1 step" not in r.stderr and "epoch_start" not in r.stdout
    assert not (out / "mlperf.log").exists()


def test_a_log_file_in_a_missing_folder_is_refused_before_training(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run=RUN, mlperf={"log_file": "logs/mlperf.log"})
    r = run_host(run)
    refused_before_training(r, out)
    assert f"{tmp_path / 'run.toml'}:" in r.stderr and "[mlperf] log_file: the folder" in r.stderr
    assert f"{out / 'logs'} of {out / 'logs' / 'mlperf.log'} does not exist" in r.stderr, r.stderr
    assert not out.exists()  # nothing left behind
    (out / "logs").mkdir(parents=True)
    assert run_host(run).returncode == 1
    assert (out / "logs" / "mlperf.log").is_file()


def test_a_log_file_that_is_a_folder_is_refused(tmp_path, data):
    out = tmp_path / "out"
    (out / "mlperf.log").mkdir(parents=True)
    r = run_host(write_run(tmp_path / "run.toml", data, out, run=RUN))
    assert r.returncode == 2 and f"{out / 'mlperf.log'} is a folder" in r.stderr, r.stderr


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, data):
    out = tmp_path / "out"
    out.write_text("a file")
    r = run_host(write_run(tmp_path / "run.toml", data, out, run=RUN))
    assert r.returncode == 2
    assert "[run] output_dir: " in r.stderr and f"{out} exists and is not a folder" in r.stderr, r.stderr


def test_a_checkpoint_name_taken_by_a_folder_is_refused_before_training(tmp_path, data):
    out = tmp_path / "out"
    (out / "checkpoint-epoch1.pt").mkdir(parents=True)
    r = run_host(write_run(tmp_path / "run.toml", data, out, run=RUN))
    refused_before_training(r, out)
    assert f"{out / 'checkpoint-epoch1.pt'} is not a file, and this run writes its checkpoints under that name" \
        in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["device", "fifo"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_log_file_that_is_a_device_or_a_pipe_is_refused_and_left_as_it_is(tmp_path, data, kind, overwrite):
    """The record is renamed over the log's name: with overwrite = true a device or FIFO there was replaced
    by a regular file; without it, /dev/full was named as the record of an earlier run."""
    out = tmp_path / "out"
    out.mkdir()
    log = out / "mlperf.log"
    if kind == "device":
        # Through a link of its own: a run that replaced the name replaces the link, never the device.
        log.symlink_to("/dev/full")
    else:
        os.mkfifo(log)
    run = write_run(tmp_path / "run.toml", data, out, run=dict(RUN, overwrite=overwrite))
    r = run_host(run)
    assert r.returncode == 2 and "epoch_start" not in r.stdout, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["mlperf.log"]
    assert f"[mlperf] log_file (default): {log} is not a regular file (a device, pipe or socket), and the run " \
           "would replace it with its MLPerf log; name another file" in r.stderr, r.stderr
    assert "earlier run" not in r.stderr
    assert log.is_symlink() and stat.S_ISCHR(os.stat(log).st_mode) if kind == "device" else \
        stat.S_ISFIFO(os.stat(log).st_mode)


def test_a_config_toml_that_is_a_pipe_is_refused_and_left_as_it_is(tmp_path, data):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "config.toml")
    r = run_host(write_run(tmp_path / "run.toml", data, out, run=dict(RUN, overwrite=True)))
    refused_before_training(r, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.toml"]
    assert f"[run] output_dir: {out / 'config.toml'} is not a regular file" in r.stderr, r.stderr
    assert stat.S_ISFIFO(os.stat(out / "config.toml").st_mode)


def test_a_config_toml_that_is_a_folder_is_called_a_folder(tmp_path, data):
    out = tmp_path / "out"
    (out / "config.toml").mkdir(parents=True)
    r = run_host(write_run(tmp_path / "run.toml", data, out, run=RUN))
    refused_before_training(r, out)
    assert f"[run] output_dir: {out / 'config.toml'} is a folder, and the run would replace it with its resolved " \
           "configuration; choose another output_dir" in r.stderr, r.stderr
    assert (out / "config.toml").is_dir()


def test_an_output_dir_that_cannot_be_made_leaves_no_folder_above_it_that_the_run_made(tmp_path, data):
    """A name too long for the file system: create_directories made a/b, then failed on the last folder;
    a/b stayed behind."""
    out = tmp_path / "a" / "b" / ("x" * 300)
    r = run_host(write_run(tmp_path / "run.toml", data, out, run=RUN))
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"[run] output_dir: cannot create {out}: File name too long" in r.stderr, r.stderr
    assert not (tmp_path / "a").exists()


def test_a_run_that_fails_leaves_no_folder_it_made_above_its_output_dir(tmp_path, data):
    out = tmp_path / "a" / "b" / "out"
    run = write_run(tmp_path / "run.toml", data, out, run=RUN, mlperf={"log_file": "mlperf.log/"})
    r = run_host(run)
    assert r.returncode == 2 and '[mlperf] log_file = "mlperf.log/": names no file' in r.stderr, r.stderr
    assert not (tmp_path / "a").exists()
    # A folder that was there stays, empty or not.
    (tmp_path / "a").mkdir()
    r = run_host(run)
    assert r.returncode == 2 and (tmp_path / "a").is_dir() and not (tmp_path / "a" / "b").exists()
