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
