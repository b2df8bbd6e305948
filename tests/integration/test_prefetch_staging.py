"""The prefetch reader's staging (stage_dir) through the host: a sample the
source reader refuses is named by the user's file, not only by its staged
copy, which is removed when the run ends."""

import subprocess

import h5py
import numpy as np
import pytest

from helpers import DATA_TOOL, run_host, synth, write_run

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
    subprocess.run([str(DATA_TOOL), "convert", str(h5_set), str(out), "--quiet"], check=True,
                   capture_output=True)
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
