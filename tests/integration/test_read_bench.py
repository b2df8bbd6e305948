"""deepcam-data read: the reader of a run file alone. Its JSON line must hold
every field, consistent with each other and with the data set on disk
(samples = the split's size per epoch, bytes = the sizes of the files read);
the consumer's time must show in the wall time and not in the wait; a bad
run file or command line gives one error line and no JSON."""

import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch

from helpers import DATA_TOOL, convert, plugin_env, run_data, synth, write_run

FIELDS = {"reader", "source", "split", "epochs", "batch_size", "batches", "samples", "samples_per_epoch",
          "bytes", "seconds", "samples_per_s", "gb_per_s", "wait_seconds", "wait_fraction", "wait_ms_per_batch",
          "first_wait_seconds", "steady_wait_fraction", "with_validation", "validation_batches", "validation_samples",
          "consume_ms", "read_ms_per_batch", "build_seconds", "peak_rss_bytes", "base_rss_bytes"}
TRAIN, VALIDATION = 8, 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("read_bench")
    h5 = synth(root / "h5", train=TRAIN, validation=VALIDATION)
    convert(h5, root / "npy")
    return root


def read(*args):
    return run_data("read", *args, timeout=300)


def measure(*args):
    r = read(*args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    result = json.loads(lines[0])
    assert set(result) == FIELDS
    return result


def split_bytes(root, split, pattern):
    files = sorted((root / split).glob(pattern))
    assert files
    return sum(f.stat().st_size for f in files)


def check_consistent(r, epochs, per_epoch, batch_size, file_bytes, validation=None):
    """validation: (samples, batch size, file bytes) of the validation pass
    after each epoch (--with-validation), counted in batches, samples and bytes."""
    v_samples, v_batch_size, v_bytes = validation or (0, 1, 0)
    assert r["epochs"] == epochs
    assert r["samples_per_epoch"] == per_epoch
    assert r["with_validation"] == (validation is not None)
    assert r["validation_samples"] == epochs * v_samples
    assert r["validation_batches"] == epochs * math.ceil(v_samples / v_batch_size)
    assert r["samples"] == epochs * (per_epoch + v_samples)
    assert r["batches"] == epochs * math.ceil(per_epoch / batch_size) + r["validation_batches"]
    assert r["bytes"] == epochs * (file_bytes + v_bytes)
    assert r["seconds"] > 0
    assert r["samples_per_s"] == pytest.approx(r["samples"] / r["seconds"], rel=1e-9)
    assert r["gb_per_s"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9, rel=1e-9)
    assert 0 < r["wait_seconds"] <= r["seconds"]
    assert r["wait_fraction"] == pytest.approx(r["wait_seconds"] / r["seconds"], rel=1e-9)
    assert r["wait_ms_per_batch"] == pytest.approx(1e3 * r["wait_seconds"] / r["batches"], rel=1e-9)
    assert 0 < r["first_wait_seconds"] <= r["wait_seconds"]
    steady = r["seconds"] - r["first_wait_seconds"]
    assert r["steady_wait_fraction"] == pytest.approx((r["wait_seconds"] - r["first_wait_seconds"]) / steady,
                                                      rel=1e-9, abs=1e-12)
    assert r["peak_rss_bytes"] >= r["base_rss_bytes"] > 0


def test_hdf5_train_two_epochs(tmp_path, data):
    run = write_run(tmp_path / "run.toml", data / "h5", tmp_path / "out")
    r = measure(run, "--epochs", 2)
    assert (r["reader"], r["source"], r["split"], r["batch_size"]) == ("hdf5", "", "train", 2)
    check_consistent(r, 2, TRAIN, 2, split_bytes(data / "h5", "train", "*.h5"))
    # Without a consumer the reader is all there is: most of the pass is the wait for it (not all: starting
    # an epoch and checking a batch count too, and 0.9 failed once, at 0.88, on a loaded CI machine).
    assert r["consume_ms"] == 0 and r["read_ms_per_batch"] == 0
    assert r["wait_fraction"] > 0.5
    assert not (tmp_path / "out").exists(), "reading alone writes no run output"


def test_a_training_epoch_drops_the_last_incomplete_batch_as_training_does(tmp_path, data):
    # 8 samples in batches of 3: training steps twice an epoch (the engine, as the reference's DataLoader,
    # drops the 2 left over); it read them as a third batch. Validation reads every sample.
    run = write_run(tmp_path / "run.toml", data / "h5", tmp_path / "out", run={"train_batch_size": 3})
    r = measure(run, "--epochs", 2, "--with-validation")
    assert (r["batch_size"], r["samples_per_epoch"]) == (3, 6)
    assert (r["validation_batches"], r["validation_samples"]) == (2 * 2, 2 * VALIDATION)
    assert (r["batches"], r["samples"]) == (2 * 2 + 4, 2 * 6 + 2 * VALIDATION)
    train_bytes = split_bytes(data / "h5", "train", "*.h5")
    assert r["bytes"] == pytest.approx(2 * (train_bytes * 6 / TRAIN + split_bytes(data / "h5", "validation", "*.h5")),
                                       rel=1e-6)
    # Fewer training samples than a batch: the engine's refusal, exit 2.
    line = one_error(read(run, "--set", f"run.train_batch_size={TRAIN + 1}"), 2)
    assert "train_batch_size" in line and f"more than the {TRAIN} training samples" in line


def test_npy_validation_counts_data_and_label_files(tmp_path, data):
    run = write_run(tmp_path / "run.toml", data / "npy", tmp_path / "out",
                    reader={"name": "npy", "io": "direct", "threads": 2})
    r = measure(run, "--split", "validation", "--set", "run.validation_batch_size=2")
    assert (r["reader"], r["split"], r["batch_size"]) == ("npy", "validation", 2)
    # The last batch holds the one sample left.
    check_consistent(r, 1, VALIDATION, 2, split_bytes(data / "npy", "validation", "*.npy"))


def test_consumer_time_is_not_waiting(tmp_path, data):
    run = write_run(tmp_path / "run.toml", data / "npy", tmp_path / "out",
                    reader={"name": "prefetch", "depth": 2, "threads": 2},
                    **{"reader.source": {"name": "npy", "io": "mmap", "threads": 1}})
    r = measure(run, "--consume-ms", 30)
    assert (r["reader"], r["source"]) == ("prefetch", "npy")
    check_consistent(r, 1, TRAIN, 2, split_bytes(data / "npy", "train", "*.npy"))
    assert r["consume_ms"] == 30
    assert r["seconds"] >= r["batches"] * 0.030
    assert r["wait_seconds"] <= r["seconds"] - r["batches"] * 0.030 + 1e-3


def test_consume_matched_uses_the_measured_read_time(tmp_path, data):
    run = write_run(tmp_path / "run.toml", data / "h5", tmp_path / "out")
    r = measure(run, "--consume-matched", "--epochs", 2)
    # The calibration epoch comes first and is not counted.
    check_consistent(r, 2, TRAIN, 2, split_bytes(data / "h5", "train", "*.h5"))
    assert r["read_ms_per_batch"] > 0
    assert r["consume_ms"] == r["read_ms_per_batch"]
    assert r["seconds"] >= r["batches"] * r["consume_ms"] / 1e3


def test_with_validation_reads_validation_after_each_training_epoch(tmp_path, data):
    # As the engine calls the reader: the prefetch reader reads the next
    # epoch ahead across these calls, and must still deliver every batch.
    run = write_run(tmp_path / "run.toml", data / "npy", tmp_path / "out",
                    reader={"name": "prefetch", "depth": 2, "threads": 2},
                    **{"reader.source": {"name": "npy", "io": "mmap", "threads": 1}})
    r = measure(run, "--with-validation", "--epochs", 3, "--consume-ms", 20, "--set", "run.validation_batch_size=2")
    check_consistent(r, 3, TRAIN, 2, split_bytes(data / "npy", "train", "*.npy"),
                     (VALIDATION, 2, split_bytes(data / "npy", "validation", "*.npy")))
    assert r["validation_batches"] == 3 * 2  # 3 samples in batches of 2
    assert r["seconds"] >= r["batches"] * 0.020
    assert r["wait_seconds"] <= r["seconds"] - r["batches"] * 0.020 + 1e-3

    # A plain reader, and the calibration epoch (training only) not counted.
    run = write_run(tmp_path / "h5.toml", data / "h5", tmp_path / "out")
    r = measure(run, "--with-validation", "--consume-matched", "--set", "run.validation_batch_size=3")
    check_consistent(r, 1, TRAIN, 2, split_bytes(data / "h5", "train", "*.h5"),
                     (VALIDATION, 3, split_bytes(data / "h5", "validation", "*.h5")))
    assert r["consume_ms"] == r["read_ms_per_batch"] > 0


def one_error(r, status):
    assert r.returncode == status, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("deepcam-data: ")
    return lines[0]


def test_bad_run_file_is_one_line_naming_file_and_key(tmp_path, data):
    # A bad configuration: exit 2, as deepcam-host; 1 is for bad data.
    run = write_run(tmp_path / "run.toml", data / "h5", tmp_path / "out", reader={"thread": 2})
    line = one_error(read(run), 2)
    assert str(run) in line and "thread" in line and "threads" in line  # the "did you mean"

    line = one_error(read(write_run(tmp_path / "ok.toml", data / "h5", tmp_path / "out"),
                          "--set", "reader.threads=0"), 2)
    assert "threads" in line

    line = one_error(read(tmp_path / "missing.toml"), 2)
    assert "missing.toml" in line


def test_a_reader_plugin_s_refusal_of_its_table_is_a_bad_run_file_and_of_the_data_bad_data(tmp_path, data):
    # The prefetch reader refusing a key of its source's table exited 1, as bad data; deepcam-host exits 2.
    run = write_run(tmp_path / "run.toml", data / "npy", tmp_path / "out",
                    reader={"name": "prefetch", "threads": 1, "depth": 2},
                    **{"reader.source": {"name": "npy", "shuffle_mode": "gpu"}})
    line = one_error(read(run), 2)
    assert f"{run}:" in line and "[reader.source] shuffle_mode: the prefetch reader decides the training order" in \
        line, line
    line = one_error(read(run, "--set", "reader.source.shuffle_mode=node"), 2)
    assert line.startswith("deepcam-data: --set reader.source.shuffle_mode=node: the prefetch reader"), line
    # A refusal of the data from the same factory stays bad data.
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "validation").mkdir()
    (tmp_path / "empty" / "stats.h5").write_bytes((data / "npy" / "stats.h5").read_bytes())
    bad = write_run(tmp_path / "bad.toml", tmp_path / "empty", tmp_path / "out", reader={"name": "npy", "threads": 1})
    line = one_error(read(bad), 1)
    assert str(tmp_path / "empty") in line, line


def test_missing_data_root_names_it(tmp_path):
    run = write_run(tmp_path / "run.toml", tmp_path / "nowhere", tmp_path / "out")
    line = one_error(read(run), 2)  # the run file's [data] root key, as deepcam-host says
    assert "nowhere" in line


@pytest.mark.parametrize("args, text", [
    ([], "run file"),
    (["--split", "test"], "--split"),
    (["--epochs", "0"], "--epochs"),
    (["--consume-ms", "-1"], "--consume-ms"),
    # strtod's readings beside decimals: hexadecimal (16), blanks and a '+' before the number.
    (["--consume-ms", "0x10"], "--consume-ms expects milliseconds between 0 and 3600000, got '0x10'"),
    (["--consume-ms", " 5"], "--consume-ms"),
    (["--consume-ms", "+7"], "--consume-ms"),
    (["--consume-ms", "5", "--consume-matched"], "exclude"),
    (["--bogus"], "--bogus"),
    (["--split", "validation", "--with-validation"], "--with-validation"),
])
def test_bad_command_line(tmp_path, data, args, text):
    if args:
        args = [write_run(tmp_path / "run.toml", data / "h5", tmp_path / "out")] + args
    line = one_error(read(*args), 2)
    assert text in line


def test_several_run_files_are_merged_left_to_right(tmp_path, data):
    # As deepcam-host RUN.toml MORE.toml... merges them; it took one run file only ("one run file only", exit 2).
    run = write_run(tmp_path / "run.toml", data / "h5", tmp_path / "out")  # hdf5, batches of 2
    four, one, npy = tmp_path / "four.toml", tmp_path / "one.toml", tmp_path / "npy.toml"
    four.write_text("[run]\ntrain_batch_size = 4\n")
    one.write_text("[run]\ntrain_batch_size = 1\n")
    # A table naming another plugin replaces the earlier one whole (hdf5's keys go with it).
    npy.write_text(f'[data]\nroot = "{data / "npy"}"\n[reader]\nname = "npy"\n')
    r = measure(run, four, npy)
    assert (r["reader"], r["batch_size"]) == ("npy", 4)
    check_consistent(r, 1, TRAIN, 4, split_bytes(data / "npy", "train", "*.npy"))
    r = measure(run, four, one)  # the later file's value
    assert (r["reader"], r["batch_size"], r["batches"]) == ("hdf5", 1, TRAIN)
    r = measure(run, one, "--set", "run.train_batch_size=8", four)  # --set after every file, wherever it is given
    assert (r["batch_size"], r["batches"]) == (8, 1)
    # A bad key in a later file is named by that file and line, exit 2.
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nseed = 1\n\n[reader]\nthread = 2\n")
    line = one_error(read(run, bad), 2)
    assert f"{bad}:5" in line and "thread" in line, line
    help_text = subprocess.run([str(DATA_TOOL), "--help"], capture_output=True, text=True, check=True).stdout
    assert "deepcam-data read RUN.toml... [options]" in help_text and "merged left" in help_text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("reader", ["hdf5", "prefetch"])
def test_cuda_without_a_gpu_is_a_bad_run_file(tmp_path, data, reader):
    # The prefetch reader's refusal exited 1, the status of bad data, blaming the run file's [reader]; the
    # hdf5 reader read on. deepcam-host refuses such a run file with status 2, naming who set the device.
    keys = {"reader": {"name": "prefetch"}, "reader.source": {"name": "npy"}} if reader == "prefetch" else {}
    root = data / ("npy" if reader == "prefetch" else "h5")
    run = write_run(tmp_path / "run.toml", root, tmp_path / "out", **keys)
    line = one_error(read(run, "--set", "run.device=cuda"), 2)
    assert line == 'deepcam-data: --set run.device=cuda: no CUDA device is available', line
    run = write_run(tmp_path / "gpu.toml", root, tmp_path / "out", run={"device": "cuda"}, **keys)
    line = one_error(read(run), 2)
    assert f'{run}:' in line and '[run] device = "cuda": no CUDA device is available' in line, line


@pytest.mark.parametrize("args, staged", [([], TRAIN), (["--with-validation"], TRAIN + VALIDATION),
                                           (["--split", "validation"], VALIDATION)])
def test_a_staging_reader_stages_the_splits_read_reads_only(tmp_path, data, args, staged):
    # Both splits were staged whatever --split said, as for a training run.
    stage = tmp_path / "stage"
    stage.mkdir()
    run = write_run(tmp_path / "run.toml", data / "h5", tmp_path / "out",
                    reader={"name": "prefetch", "depth": 2, "threads": 1, "stage_dir": str(stage)},
                    **{"reader.source": {"name": "hdf5", "threads": 1}})
    r = read(run, *args)
    assert r.returncode == 0, r.stderr
    assert f"deepcam-data: staged {staged} files" in r.stderr, r.stderr
    assert list(stage.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_removes_what_the_reader_staged(tmp_path, data, sig):
    """read ended at once on SIGTERM or SIGINT, leaving the prefetch reader's staged copies (a shard in
    /dev/shm); it now stops between batches and its reader removes them, as deepcam-host's does."""
    stage = tmp_path / "stage"
    stage.mkdir()
    run = write_run(tmp_path / "run.toml", data / "h5", tmp_path / "out",
                    reader={"name": "prefetch", "depth": 2, "threads": 1, "stage_dir": str(stage)},
                    **{"reader.source": {"name": "hdf5", "threads": 1}})
    p = subprocess.Popen([str(DATA_TOOL), "read", str(run), "--epochs", "1000", "--consume-ms", "50"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=plugin_env(),
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(stage.glob("deepcam-stage-*/train/*")):
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.1)
        time.sleep(1.0)  # reading
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -sig, err  # ended by the signal, as a shell expects
    assert f"read stopped by {sig.name}: nothing measured; the reader's staged copies are removed" in err, err
    assert list(stage.iterdir()) == []


def test_a_thread_limit_is_named_as_the_machine_s_not_as_the_plugin_s(tmp_path, data):
    """Worker threads that the process limit (ulimit -u) refuses: the FileReader's pool failed as "the reader
    plugin 'hdf5' failed: Resource temporarily unavailable (a bug in the plugin)", status 3."""
    import os
    import shutil
    import tempfile
    from pathlib import Path
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("the limit holds for a user other than root: needs root and setpriv to become nobody")
    # Outside pytest's folders, which only root may enter.
    work = Path(tempfile.mkdtemp(prefix="deepcam-nproc-"))
    try:
        root = work / "h5"
        shutil.copytree(data / "h5", root)
        run = write_run(work / "run.toml", root, work / "out", reader={"name": "hdf5", "threads": 4})
        for path in (work, root, *root.rglob("*"), run):
            path.chmod(0o755 if path.is_dir() else 0o644)
        r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "bash", "-c",
                            f'ulimit -u 3; exec "{DATA_TOOL}" read "{run}"'], capture_output=True, text=True,
                           env=dict(plugin_env(), OMP_NUM_THREADS="1"), timeout=300)
    finally:
        shutil.rmtree(work)
    assert r.returncode == 1, r.stderr
    assert r.stderr == ("deepcam-data: hdf5 reader: cannot start 4 worker threads: Resource temporarily unavailable; "
                        "give it fewer threads, or raise the process limit (ulimit -u)\n"), r.stderr


def test_a_stop_signal_ends_a_long_consumer_hold_at_once(tmp_path, data):
    """--consume-ms allows an hour a batch, and the stop was looked at only between batches: a SIGTERM
    in the hold went unheeded until it ended (a batch system's SIGKILL came first)."""
    run = write_run(tmp_path / "run.toml", data / "h5", tmp_path / "out", reader={"threads": 1})
    p = subprocess.Popen([str(DATA_TOOL), "read", str(run), "--consume-ms", "600000"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=plugin_env(), start_new_session=True)
    try:
        time.sleep(3)  # built, and holding its first batch
        assert p.poll() is None, p.stderr.read()
        signalled = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGTERM, err
    assert "read stopped by SIGTERM: nothing measured" in err, err
    assert took < 10, f"{took:.1f} s"


def test_a_stop_signal_ends_the_wait_for_a_run_file_on_a_pipe(tmp_path):
    """A FIFO given as the run file, with no writer yet: the open, then the read, blocked, deaf to SIGTERM
    (deepcam-data takes stop signals on a thread of its own)."""
    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)
    p = subprocess.Popen([str(DATA_TOOL), "read", str(fifo)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=plugin_env(), start_new_session=True)
    try:
        time.sleep(2)
        assert p.poll() is None, p.stderr.read()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGTERM, err
    # No reader was built: nothing staged to remove, as the line used to say.
    assert err == (f"deepcam-data: read: stopped by Terminated while reading the run file {fifo}; nothing was "
                   "read\n"), err


def test_a_run_file_that_never_ends_is_refused_past_16_mib(tmp_path):
    r = subprocess.run(["bash", "-c", f'exec "{DATA_TOOL}" read <(yes "# a comment")'], capture_output=True,
                       text=True, env=plugin_env(), timeout=120)
    line = one_error(r, 2)
    assert "more than 16 MiB, which no run file is" in line, line
