"""The prefetch reader's staging (stage_dir) through the host: a sample the
source reader refuses is named by the user's file, not only by its staged
copy, which is removed when the run ends."""

import os
import re
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from helpers import DATA_TOOL, HOST, clean_env, convert, plugin_env, run_host, synth, write_run

SAMPLE = "2106-01-01-03-1"  # a training sample of synth's set


@pytest.fixture(scope="module")
def h5_set(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("staging") / "h5", train=4, validation=2)


def with_nan_h5(h5_set, out):
    subprocess.run(["cp", "-r", str(h5_set), str(out)], check=True)
    bad = out / "train" / f"data-{SAMPLE}.h5"
    with h5py.File(bad, "r+") as f:
        f["climate/data"][10, 20, 3] = np.nan
    return out, bad


def with_nan_npy(h5_set, out):
    convert(h5_set, out, "--quiet")
    bad = out / "train" / f"data-{SAMPLE}.npy"
    data = np.load(bad)
    data[10, 20, 3] = np.nan
    np.save(bad, data)
    return out, bad


# The source reader and the name it gives the data in its message.
@pytest.mark.parametrize("source,dataset", [("hdf5", "climate/data"), ("npy", "data")])
def test_a_refused_staged_sample_names_the_users_file(tmp_path, h5_set, source, dataset):
    root, bad = (with_nan_h5 if source == "hdf5" else with_nan_npy)(h5_set, tmp_path / "data")
    stage = tmp_path / "stage"
    stage.mkdir()
    run = write_run(tmp_path / "run.toml", root, tmp_path / "out",
                    reader={"name": "prefetch", "depth": 2, "threads": 2, "stage_dir": str(stage)},
                    **{"reader.source": {"name": source, "threads": 1}})
    r = run_host(run)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("deepcam-host:") and "holds nan" in l]
    assert len(lines) == 1, r.stderr
    # The user's file first; the copy, where it was read, beside it.
    assert lines[0].startswith(f"deepcam-host: {bad} (staged copy {stage}/deepcam-stage-"), lines[0]
    assert f"/train/{bad.name}): {dataset} at (10, 20, 3) holds nan" in lines[0], lines[0]
    assert list(stage.iterdir()) == [], "the staged copies are removed after the error"


def test_benchmark_stages_nothing_and_evaluate_and_predict_only_validation(tmp_path, h5_set):
    """--benchmark only asks for the sample shape, --evaluate and --predict read validation only: all three
    copied the rank's whole training shard first (terabytes for a full set in /dev/shm)."""
    stage = tmp_path / "stage"
    stage.mkdir()
    run = write_run(tmp_path / "run.toml", h5_set, tmp_path / "out", run={"max_epochs": 1, "target_iou": 1.0},
                    reader={"name": "prefetch", "depth": 2, "threads": 2, "stage_dir": str(stage)},
                    **{"reader.source": {"name": "hdf5", "threads": 1}})
    r = run_host(run, "--quiet")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "deepcam-host: staged 6 files" in r.stderr, r.stderr[-3000:]  # 4 training and 2 validation samples
    ckpt = tmp_path / "out" / "checkpoint-epoch1.pt"
    r = run_host(run, "--benchmark", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "staged" not in r.stderr, r.stderr[-3000:]
    r = run_host(run, "--evaluate", ckpt, "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "deepcam-host: staged 2 files" in r.stderr, r.stderr[-3000:]
    r = run_host(run, "--predict", ckpt, "--out", tmp_path / "pred")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "deepcam-host: staged 2 files" in r.stderr, r.stderr[-3000:]
    assert list(stage.iterdir()) == []
    # --samples 1: the first validation sample only, not the whole split for one picture.
    r = run_host(run, "--predict", ckpt, "--out", tmp_path / "pred1", "--samples", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "deepcam-host: staged 1 file (" in r.stderr, r.stderr[-3000:]
    assert "wrote the predictions of 1 validation sample to" in r.stderr, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "pred1").iterdir()) == ["sample-000000.npy", "sample-000000.png"]
    assert list(stage.iterdir()) == []


def test_ranks_started_by_nproc_name_themselves_as_the_program(tmp_path, h5_set):
    """--nproc started its ranks as /proc/self/exe, so lines that name the running program said "exe:" (the
    staging lines, a plugin's internal error) and ps showed /proc/self/exe."""
    stage = tmp_path / "stage"
    stage.mkdir()
    run = write_run(tmp_path / "run.toml", h5_set, tmp_path / "out",
                    run={"max_epochs": 1, "target_iou": 1.0, "train_batch_size": 1},
                    reader={"name": "prefetch", "depth": 2, "threads": 1, "stage_dir": str(stage)},
                    **{"reader.source": {"name": "hdf5", "threads": 1}})
    r = run_host("--nproc", 2, run, "--quiet")
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "[rank 0] deepcam-host: staged " in r.stderr, r.stderr[-3000:]  # the node's staging, by its rank 0
    assert "exe:" not in r.stderr, r.stderr[-3000:]


# Staging stopped by a signal. A full-size sample (56 MB) linked under many names: staging copies each
# link byte by byte, while the links take no room. Before, a signal waited for the whole shard to be
# copied and for one training step: minutes for a real shard, past a batch system's kill.
LINKS = 60


@pytest.fixture(scope="module")
def linked_set(tmp_path_factory):
    root = synth(tmp_path_factory.mktemp("linked") / "h5", train=1, validation=1, height=768, width=1152)
    (one,) = (root / "train").iterdir()
    for n in range(LINKS - 1):
        os.link(one, root / "train" / f"data-2107-{1 + n // 28:02d}-{1 + n % 28:02d}-00-1.h5")
    return root


def staging_run(tmp_path, root, **run):
    stage = tmp_path / "stage"
    stage.mkdir()
    path = write_run(tmp_path / "run.toml", root, tmp_path / "out",
                     run={"max_epochs": 1, "target_iou": 1.0, "train_batch_size": 1, **run},
                     reader={"name": "prefetch", "depth": 2, "threads": 1, "stage_dir": str(stage),
                             "shuffle_mode": "node"},
                     **{"reader.source": {"name": "hdf5", "threads": 1}})
    return path, stage


def signal_once_staging(command, stage, sig, env):
    """Starts `command`, sends `sig` once the first training copy appears in `stage` (whole or partial),
    and returns the exit status and stderr."""
    p = subprocess.Popen([str(c) for c in command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(stage.glob("deepcam-stage-*/train/*")):
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.005)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, err


def test_a_stop_signal_while_the_staged_copies_are_removed_leaves_neither_them_nor_another_status(tmp_path):
    """The stop signals' default action was put back before the engine and the process were torn down: a
    SIGTERM after the run had ended (a batch system's time limit) killed the process while its reader removed
    the staged copies, leaving them, and turned status 0 into 143."""
    root = synth(tmp_path / "h5", train=2, validation=1, height=16, width=16)
    (one,) = (root / "validation").iterdir()
    for n in range(1999):
        os.link(one, root / "validation" / f"data-2108-{1 + n // 250:02d}-{1 + n % 250:03d}-00-1.h5")
    stage = tmp_path / "stage"
    stage.mkdir()
    trained = tmp_path / "trained"
    path = write_run(tmp_path / "train.toml", root, trained,
                     run={"max_epochs": 1, "target_iou": 1.0, "validation_batch_size": 500})
    assert run_host(path, "--quiet").returncode == 1
    path = write_run(tmp_path / "run.toml", root, tmp_path / "out", run={"validation_batch_size": 500},
                     reader={"name": "prefetch", "depth": 2, "threads": 1, "stage_dir": str(stage)},
                     **{"reader.source": {"name": "hdf5", "threads": 1}})
    p = subprocess.Popen([str(HOST), str(path), "--quiet", "--evaluate", str(trained / "checkpoint-epoch1.pt")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=plugin_env())
    try:
        for line in p.stdout:
            if line.startswith("eval_loss "):
                p.send_signal(signal.SIGTERM)  # the scores printed: the engine is being torn down
                break
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    assert list(stage.iterdir()) == [], list(stage.rglob("*"))[:5]


STOPPED = r"staging the train files into {}/deepcam-stage-[^ ]+ stopped by {} after (\d+) of {} samples"


def test_a_stop_signal_ends_staging_and_the_run_before_it_starts(tmp_path, linked_set):
    run, stage = staging_run(tmp_path, linked_set)
    status, err = signal_once_staging([HOST, run, "--quiet"], stage, signal.SIGTERM, plugin_env())
    assert status == 128 + signal.SIGTERM, err[-3000:]
    m = re.search("^deepcam-host: " + STOPPED.format(re.escape(str(stage)), "SIGTERM", LINKS) +
                  "; the run had not started: what it staged is removed, and it keeps no log or config.toml$", err, re.M)
    assert m and int(m[1]) < LINKS, err[-3000:]
    assert list(stage.iterdir()) == []
    assert not (tmp_path / "out").exists(), list((tmp_path / "out").iterdir())


def test_a_stop_signal_ends_shared_staging_on_every_rank(tmp_path, linked_set):
    """Two ranks of a node share one staging directory (shuffle_mode "node"); the launcher passes the
    signal on to both, and each stops at once with the staging's own message."""
    run, stage = staging_run(tmp_path, linked_set)
    status, err = signal_once_staging([HOST, "--nproc", 2, run, "--quiet"], stage, signal.SIGINT, clean_env())
    assert status == 128 + signal.SIGINT, err[-3000:]
    for rank in (0, 1):
        m = re.search(rf"^\[rank {rank}\] deepcam-host: " + STOPPED.format(re.escape(str(stage)), "SIGINT", LINKS // 2),
                      err, re.M)
        assert m and int(m[1]) < LINKS // 2, err[-3000:]
    assert list(stage.iterdir()) == []
    assert not (tmp_path / "out").exists(), list((tmp_path / "out").iterdir())


def test_a_stop_signal_ends_read_while_it_stages(tmp_path, linked_set):
    run, stage = staging_run(tmp_path, linked_set)
    status, err = signal_once_staging([DATA_TOOL, "read", run], stage, signal.SIGTERM, plugin_env())
    assert status == -signal.SIGTERM, err[-3000:]  # ended by the signal, as a shell expects
    m = re.search("^deepcam-data: read: " + STOPPED.format(re.escape(str(stage)), "SIGTERM", LINKS) +
                  "; nothing measured; the reader's staged copies are removed$", err, re.M)
    assert m and int(m[1]) < LINKS, err[-3000:]
    assert list(stage.iterdir()) == []


def test_a_shared_staging_directory_whose_node_rank_0_was_killed_is_removed_by_the_last_rank(tmp_path):
    """Node-rank 0 makes the node's shared directory (shuffle_mode "node"), and only its own end removed it:
    killed (SIGKILL, the OOM killer), it left the node's whole shard in /dev/shm while the other ranks ended
    through their error path."""
    root = synth(tmp_path / "h5", train=8, validation=2, height=64, width=96)
    run, stage = staging_run(tmp_path, root, max_epochs=100, threads=1)
    p = subprocess.Popen([str(HOST), "--nproc", "2", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env=clean_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        for line in p.stderr:
            if "epoch 1 validation" in line:  # staged, and training
                break
            assert time.monotonic() < deadline, line
        (area,) = stage.iterdir()
        owner = int(area.name.split("-")[2])
        os.kill(owner, signal.SIGKILL)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode not in (0, None), err[-3000:]
    assert list(stage.iterdir()) == [], (list(stage.rglob("*"))[:5], err[-3000:])
