"""The run's record as a long MLPerf run needs it: config.toml and the log
under their final names from run_start and streamed line by line, every log
line echoed to stdout (not with --quiet), SIGTERM and SIGINT ending the run
with run_stop "aborted", checkpoint_every = -1, and the time to train."""

import os
import resource
import signal
import subprocess
import time
import tomllib

import pytest
import torch

from helpers import HOST, mlperf_check, plugin_env, read_events, run_host, synth, write_run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("rec") / "data", train=8, validation=2, seed=29)


def test_log_lines_are_echoed_to_stdout_unless_quiet(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={"checkpoint_every": -1})
    r = run_host(run)
    assert r.returncode in (0, 1), r.stderr
    echoed = [l for l in r.stdout.splitlines() if l.startswith(":::MLLOG ")]
    assert echoed == (out / "mlperf.log").read_text().splitlines()
    assert not list(out.glob("checkpoint-*"))  # checkpoint_every = -1: none at all
    assert "time to train (run_start to run_stop)" in r.stderr and "wall time" in r.stderr
    quiet = run_host(run, "--quiet", "--set", f"run.output_dir={tmp_path / 'quiet'}")
    assert quiet.returncode in (0, 1) and ":::MLLOG" not in quiet.stdout


def test_the_last_checkpoint_is_written_after_run_stop(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={"max_epochs": 1})
    # Standard output (the log's echo, flushed per line) and standard error (unbuffered) in one pipe:
    # its lines stand in the order they were written. (Not the file's mtime against run_stop's
    # time_ms: the file system stamps times from a clock that lags by up to a tick.)
    r = subprocess.run([str(HOST), str(run)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=plugin_env(), timeout=900)
    assert r.returncode in (0, 1), r.stdout
    lines = r.stdout.splitlines()
    stop = next(i for i, l in enumerate(lines) if l.startswith(":::MLLOG ") and '"key": "run_stop"' in l)
    saved = [i for i, l in enumerate(lines) if l == f"deepcam-host: saved {out / 'checkpoint-epoch1.pt'}"]
    assert saved and saved[0] > stop, r.stdout
    assert (out / "checkpoint-epoch1.pt").is_file()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_the_run_with_an_aborted_record(tmp_path, data, sig):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out,
                    run={"max_epochs": 100000, "target_iou": 1.0, "checkpoint_every": 1, "logging_frequency": 1})
    p = subprocess.Popen([str(HOST), str(run), "--quiet"], env=plugin_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    log = out / "mlperf.log"
    deadline = time.monotonic() + 120
    # The log is there under its final name, growing, while the run goes on.
    while time.monotonic() < deadline:
        if log.exists() and sum(e["key"] == "epoch_stop" for e in read_events(log)) >= 2:
            break
        time.sleep(0.2)
    assert p.poll() is None, p.stderr.read()
    assert (out / "config.toml").exists()
    p.send_signal(sig)
    status = p.wait(timeout=60)
    stderr = p.stderr.read()
    assert status == 128 + sig, stderr
    assert f"stopped by {signal.strsignal(sig)}" in stderr
    events = read_events(log)
    assert events[-1]["key"] == "run_stop" and events[-1]["metadata"]["status"] == "aborted"
    # The signal stops the epoch it lands in; one that lands in an epoch's
    # validation or checkpoint lets that epoch end and be saved first.
    keys = [e["key"] for e in events]
    if keys[-2] == "save_stop":
        assert keys[-4:] == ["epoch_stop", "save_start", "save_stop", "run_stop"], keys
        assert events[-2]["metadata"]["epoch_num"] == events[-4]["metadata"]["epoch_num"], events[-4:]
    else:
        assert keys[-2] == "epoch_stop", keys
        # An epoch the signal cut short (no validation) says so; one that
        # ended before the stop does not.
        cut_short = keys[-3] != "eval_stop"
        assert events[-2]["metadata"].get("status") == ("aborted" if cut_short else None), events[-3:]
    names = [f.name for f in out.iterdir()]
    assert not [n for n in names if ".tmp-" in n or ".partial-" in n], names
    for ckpt in out.glob("checkpoint-epoch*.pt"):
        assert set(torch.load(ckpt)) >= {"step", "epoch", "model", "optimizer"}
    # The record is a well-formed MLPerf log of an aborted run: the checker
    # finds only that the accuracy target was not reached.
    status, output = mlperf_check(log)
    problems = [l for l in output.splitlines() if l.startswith(("WARNING", "ERROR"))]
    assert status != 0 and problems == ["WARNING -  Failed checks for eval_accuracy : v['value'] >= 0.82 and "
                                        "v['value'] <= 1.", "ERROR - FAILED"], output


def test_a_reader_of_its_output_that_quits_neither_ends_the_run_nor_cuts_its_record(tmp_path, data):
    """`deepcam-host run.toml | head`, or `| tee` that Ctrl-C ended first: the next line echoed after the
    reader quit ended the run by SIGPIPE, with no word and no run_stop in its log."""
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out,
                    run={"max_epochs": 100000, "target_iou": 1.0, "logging_frequency": 1})
    p = subprocess.Popen([str(HOST), str(run)], env=plugin_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        for line in p.stdout:
            if '"key": "run_start"' in line:
                break
        # Both pipes closed, as by a reader that exits.
        p.stdout.close()
        p.stderr.close()
        log = out / "mlperf.log"
        deadline = time.monotonic() + 120
        # (The log takes its name just after run_start is echoed.)
        while not log.exists() or sum(e["key"] == "epoch_stop" for e in read_events(log)) < 2:
            assert p.poll() is None, f"the run ended with status {p.returncode} once its output was closed"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 128 + signal.SIGINT
    finally:
        p.kill()
        p.wait()
    events = read_events(log)
    assert events[-1]["key"] == "run_stop" and events[-1]["metadata"]["status"] == "aborted", events[-3:]


@pytest.fixture(scope="module")
def long_validation(tmp_path_factory):
    # A validation long enough (dozens of batches) for the test to stop the run inside it.
    return synth(tmp_path_factory.mktemp("rec-val") / "data", train=4, validation=64, seed=31)


def signal_in_validation(run, epoch_num):
    """Runs `run`, stops it (SIGSTOP) as its echo shows epoch `epoch_num`'s eval_start, sends SIGTERM, lets it
    go on; its status and its output."""
    p = subprocess.Popen([str(HOST), str(run)], env=plugin_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if '"key": "eval_start"' in line and f'"epoch_num": {epoch_num}' in line:
                os.kill(p.pid, signal.SIGSTOP)
                os.kill(p.pid, signal.SIGTERM)
                os.kill(p.pid, signal.SIGCONT)
                break
        lines.extend(p.stdout)
        return p.wait(timeout=120), "".join(lines)
    finally:
        if p.poll() is None:
            p.kill()


def test_a_stop_signal_during_validation_ends_the_run_before_the_next_epoch(tmp_path, long_validation):
    """It used to be seen only at the next epoch's first step, which then trained."""
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", long_validation, out,
                    run={"max_epochs": 3, "target_iou": 1.0, "checkpoint_every": 1})
    status, output = signal_in_validation(run, 1)
    assert status == 128 + signal.SIGTERM, output
    assert "deepcam-host: stopped by Terminated after epoch 1 (step 2), before the next" in output, output
    events = read_events(out / "mlperf.log")
    # The epoch's checkpoint, due (checkpoint_every = 1) and written, between its end and the run's.
    assert [e["key"] for e in events[-5:]] == ["eval_stop", "epoch_stop", "save_start", "save_stop",
                                               "run_stop"], events[-5:]
    assert [e["metadata"]["epoch_num"] for e in events if e["key"] == "eval_accuracy"] == [1]
    assert events[-1]["metadata"] == {**events[-1]["metadata"], "status": "aborted", "epoch_num": 1}
    assert not any(e["key"] == "epoch_start" and e["metadata"]["epoch_num"] == 2 for e in events)
    assert torch.load(out / "checkpoint-epoch1.pt", weights_only=True)["epoch"] == 1  # the whole epoch, saved


def test_a_stop_signal_during_the_last_validation_leaves_the_outcome_and_says_so(tmp_path, long_validation):
    """It used to be dropped without a word."""
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", long_validation, out, run={"max_epochs": 1, "target_iou": 1.0})
    status, output = signal_in_validation(run, 1)
    assert status == 1, output  # the target was not reached: the run's own outcome
    assert ("deepcam-host: Terminated came during the last epoch's validation or checkpoint: the run had ended, "
            "and its outcome stands") in output, output
    assert read_events(out / "mlperf.log")[-1]["key"] == "run_stop"


def test_bad_input_before_training_leaves_no_record(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={"resume": str(tmp_path / "missing.pt")})
    r = run_host(run)
    assert r.returncode == 2, r.stderr
    assert not out.exists()


def test_sigterm_stops_every_rank_at_the_same_step(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out,
                    run={"max_epochs": 100000, "target_iou": 1.0, "logging_frequency": 1, "threads": 1,
                         "checkpoint_every": -1})
    p = subprocess.Popen([str(HOST), "--nproc", "2", str(run), "--quiet"], env=plugin_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "mlperf.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if log.exists() and sum(e["key"] == "epoch_stop" for e in read_events(log)) >= 1:
            break
        time.sleep(0.2)
    assert p.poll() is None, p.stderr.read()
    p.send_signal(signal.SIGTERM)
    status = p.wait(timeout=60)
    stderr = p.stderr.read()
    assert status == 128 + signal.SIGTERM, stderr
    # Both ranks stopped cleanly, at the same step: neither lost the other.
    assert stderr.count("exited with status 143") == 2, stderr
    assert "lost rank" not in stderr, stderr
    events = read_events(log)
    assert [e["key"] for e in events[-2:]] == ["epoch_stop", "run_stop"]
    assert events[-1]["metadata"]["status"] == "aborted"
    cut_short = events[-3]["key"] != "eval_stop"
    assert events[-2]["metadata"].get("status") == ("aborted" if cut_short else None), events[-3:]


def test_progress_lines_come_every_progress_seconds_whatever_the_logging_frequency(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out,
                    run={"max_epochs": 1, "logging_frequency": 0, "progress_seconds": 0.001,
                         "validation_batch_size": 1})
    r = run_host(run, "--quiet")
    assert r.returncode in (0, 1), r.stderr
    # 4 training steps and 2 validation batches, each far longer than 1 ms:
    # lines come by time alone (logging_frequency = 0 prints none).
    train = [l for l in r.stderr.splitlines() if l.startswith("epoch 1 step ")]
    assert len(train) >= 2 and all("loss" in l and "samples/s" in l for l in train), r.stderr
    validation = [l for l in r.stderr.splitlines() if l.startswith("epoch 1 validation: batch ")]
    assert len(validation) >= 1, r.stderr
    quiet = run_host(run, "--quiet", "--set", "run.progress_seconds=0", "--set", f"run.output_dir={tmp_path / 'q'}")
    assert not [l for l in quiet.stderr.splitlines() if l.startswith(("epoch 1 step ", "epoch 1 validation: b"))]


def test_seed_auto_is_drawn_logged_recorded_and_repeatable(tmp_path, data):
    def losses(out):
        return [e["value"] for e in read_events(out / "mlperf.log") if e["key"] == "train_loss"]

    run = write_run(tmp_path / "run.toml", data, tmp_path / "auto", run={"seed": "auto", "max_epochs": 1,
                                                                          "logging_frequency": 1})
    r = run_host("--nproc", 2, run, "--quiet", "--set", "run.threads=1")
    assert r.returncode in (0, 1), r.stderr
    seed = next(e["value"] for e in read_events(tmp_path / "auto" / "mlperf.log") if e["key"] == "seed")
    assert isinstance(seed, int) and seed > 0
    # The resolved config printed at start holds the seed drawn, as config.toml does.
    assert f'seed = {seed}  # "auto": drawn from the clock' in r.stderr
    assert 'seed = "auto"' not in r.stderr
    written = tomllib.loads((tmp_path / "auto" / "config.toml").read_text())
    assert written["run"]["seed"] == seed
    # The recorded config repeats the run bit for bit.
    again = run_host("--nproc", 2, tmp_path / "auto" / "config.toml", "--quiet",
                     "--set", f"run.output_dir={tmp_path / 'again'}")
    assert again.returncode == r.returncode, again.stderr
    assert losses(tmp_path / "auto") and losses(tmp_path / "again") == losses(tmp_path / "auto")


@pytest.mark.parametrize("split,open_intervals", [("train", ["epoch"]), ("validation", ["eval", "epoch"])])
def test_a_run_that_fails_mid_epoch_closes_what_it_had_begun(tmp_path, data, split, open_intervals):
    """A sample file gone bad mid-run (exit 2): the log ended with run_stop alone, leaving the epoch (and the
    evaluation) it was in begun and never ended, and run_stop without its epoch_num, where a stop signal or a
    divergence closes them."""
    broken = tmp_path / "data"
    subprocess.run(["cp", "-r", str(data), str(broken)], check=True)
    last = sorted((broken / split).glob("*.h5"))[-1]  # not the first, which the reader opens to learn the shape
    last.write_bytes(b"not an HDF5 file" * 64)
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", broken, out,
                    run={"max_epochs": 2, "target_iou": 1.0, "logging_frequency": 1})
    r = run_host(run, "--quiet")
    assert r.returncode == 2 and str(last) in r.stderr, r.stderr[-3000:]
    events = read_events(out / "mlperf.log")
    stops = [e for e in events[-len(open_intervals) - 1:]]
    assert [e["key"] for e in stops] == [f"{i}_stop" for i in open_intervals] + ["run_stop"], \
        [e["key"] for e in events[-6:]]
    assert all(e["metadata"]["epoch_num"] == 1 for e in stops)
    # The intervals end at the step training stopped at, the last one logged (every step is): they had
    # their start's step_num, 0, after train_loss events of later steps.
    trained = [e["metadata"]["step_num"] for e in events if e["key"] == "train_loss"]
    assert trained == list(range(1, len(trained) + 1)) and trained, trained
    assert [e["metadata"]["step_num"] for e in stops[:-1]] == [len(trained)] * len(open_intervals)
    # Each cut short, as run_stop says of the run.
    assert all(e["metadata"]["status"] == "aborted" for e in stops), stops
    starts = [e["key"] for e in events if e["event_type"] == "INTERVAL_START"]
    ends = [e["key"] for e in events if e["event_type"] == "INTERVAL_END"]
    assert sorted(k[:-len("_start")] for k in starts) == sorted(k[:-len("_stop")] for k in ends)
    # A well-formed log of an aborted run: the checker finds only the accuracy target not reached.
    status, output = mlperf_check(out / "mlperf.log")
    problems = [l for l in output.splitlines() if l.startswith(("WARNING", "ERROR"))]
    assert status != 0 and problems[-1] == "ERROR - FAILED" and all("eval_accuracy" in p for p in problems[:-1]), \
        output


def test_a_save_that_fails_is_logged_as_cut_short_not_as_done(tmp_path, data):
    # The file-size limit (deepcam-host ignores SIGXFSZ) lets the log grow and stops the first checkpoint, as
    # a full disk would: its save_stop said nothing and read as a save done.
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={"max_epochs": 2, "target_iou": 1.0, "checkpoint_every": 1})
    r = subprocess.run([str(HOST), str(run), "--quiet"], capture_output=True, text=True, env=plugin_env(),
                       timeout=600, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000)))
    assert r.returncode == 2 and f"{out / 'checkpoint-epoch1.pt'}: cannot write: File too large" in r.stderr, \
        r.stderr[-2000:]
    events = read_events(out / "mlperf.log")
    assert [e["key"] for e in events[-3:]] == ["save_start", "save_stop", "run_stop"]
    assert events[-2]["metadata"]["status"] == "aborted" and events[-1]["metadata"]["status"] == "aborted"
    assert not list(out.glob("checkpoint-*"))


def test_a_log_removed_while_the_run_writes_it_is_no_success(tmp_path, data):
    # The run went on writing to the removed file and ended with status 0, naming a log that was not there.
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out,
                    run={"max_epochs": 4, "target_iou": 1.0, "checkpoint_every": -1, "logging_frequency": 1})
    p = subprocess.Popen([str(HOST), str(run), "--quiet"], env=plugin_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    log = out / "mlperf.log"
    deadline = time.monotonic() + 120
    while not log.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert log.exists(), "the run ended before its log took its name"
    log.unlink()
    _, err = p.communicate(timeout=600)
    assert p.returncode == 2, err[-2000:]
    assert err.splitlines()[-1] == (f"deepcam-host: {log}: the MLPerf log was removed or replaced while the run "
                                    "wrote it: this run's record is lost"), err[-2000:]
    assert "wall time" not in err
