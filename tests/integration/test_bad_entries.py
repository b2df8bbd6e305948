"""Entries among the samples that are not files (a FIFO, a socket, a
directory, a symbolic link loop, a dangling link, each named like a sample),
unpaired npy files, and data roots training cannot use: deepcam-host (both
readers) and deepcam-data (verify, convert, stats) refuse each the same way,
naming the entry, and never open a FIFO (every run has a timeout: a blocking
open would hang it)."""

import contextlib
import os
import shutil
import socket

import h5py
import numpy as np
import pytest

from helpers import run_data, run_host, write_run

H, W = 32, 48
TIMEOUT = 120  # far above what any of these runs takes; a blocked open hits it
KINDS = ["fifo", "socket", "directory", "link_loop", "dangling_link"]


def data_tool(*args):
    return run_data(*args, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-entries")
    h5_set, npy_set = base / "h5", base / "npy"
    proc = data_tool("synth", "--out", h5_set, "--train", 3, "--validation", 2, "--height", H, "--width", W,
                     "--seed", 4)
    assert proc.returncode == 0, proc.stderr
    proc = data_tool("convert", h5_set, npy_set)
    assert proc.returncode == 0, proc.stderr
    return {"hdf5": h5_set, "npy": npy_set}


def copy_of(root, tmp_path):
    out = tmp_path / root.name
    shutil.copytree(root, out, symlinks=True)
    return out


@contextlib.contextmanager
def cwd(path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def make_entry(path, kind):
    """An entry at `path` that is not a regular file."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        # Bound by its name within the folder: a socket's path is limited to
        # 108 bytes, pytest's folders are long.
        with cwd(path.parent):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path.name)
            s.close()
    elif kind == "directory":
        path.mkdir()
    elif kind == "link_loop":
        os.symlink(path.name, path)  # points at itself
    elif kind == "dangling_link":
        os.symlink(path.parent / "nothing-here", path)
    return path


def bad_entry(root, form, kind):
    """A bad entry in train/ named like a sample; for npy, a good label file
    beside it, so that only the entry itself is wrong."""
    train = root / "train"
    if form == "hdf5":
        return make_entry(train / "data-2200-01-01-00-1.h5", kind)
    shutil.copy(sorted(train.glob("label-*.npy"))[0], train / "label-2200-01-01-00-1.npy")
    return make_entry(train / "data-2200-01-01-00-1.npy", kind)


def host_refuses(tmp_path, root, form, *fragments):
    run = write_run(tmp_path / "run.toml", root, tmp_path / "out", reader={"name": form, "threads": 2})
    r = run_host(run, timeout=TIMEOUT)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "internal error" not in r.stderr, r.stderr
    for f in fragments:
        assert str(f) in r.stderr, r.stderr
    return r


def verify_reports(root, *fragments):
    """verify of `root` exits 1 (deepcam-data's status for bad data) with one
    line starting with fragments[0] and holding the others."""
    proc = data_tool("verify", root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(f"{fragments[0]}:")]
    assert lines and all(str(f) in lines[0] for f in fragments), proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["hdf5", "npy"])
def test_an_entry_that_is_not_a_file_is_named_by_the_readers_and_verify(sets, tmp_path, form, kind):
    root = copy_of(sets[form], tmp_path)
    entry = bad_entry(root, form, kind)
    host_refuses(tmp_path, root, form, f"{entry}: ")
    proc = verify_reports(root, entry)
    # The entry is the only problem: its label file is not reported unpaired.
    assert "1 problem in 1 file" in proc.stdout, proc.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_convert_and_stats_name_an_entry_that_is_not_a_file(sets, tmp_path, kind):
    root = copy_of(sets["hdf5"], tmp_path)
    entry = bad_entry(root, "hdf5", kind)
    out = tmp_path / "npy"
    proc = data_tool("convert", root, out)
    assert proc.returncode == 1, proc.stderr
    assert any(line.startswith(f"deepcam-data: {entry}: ") for line in proc.stderr.splitlines()), proc.stderr
    assert "1 of 6 samples failed" in proc.stderr, proc.stderr
    # The good samples are converted; stats.h5 waits until all are.
    assert len(list(out.glob("*/data-*.npy"))) == 5
    assert not (out / "stats.h5").exists()
    proc = data_tool("stats", root)
    assert proc.returncode == 1 and proc.stderr.startswith(f"deepcam-data: {entry}: "), proc.stderr


@pytest.mark.parametrize("form", ["hdf5", "npy"])
def test_a_sample_whose_name_holds_a_newline_is_named_escaped_on_one_line(sets, tmp_path, form):
    """A good sample renamed with a newline in its name: every message naming it printed the name raw,
    split over two lines. It is refused where the split is listed, by training, verify and stats, the
    newline shown as \\x0a, as other control characters are."""
    root = copy_of(sets[form], tmp_path)
    train = root / "train"
    first = sorted(train.glob("data-*"))[0]
    odd = first.with_name(first.name.replace("data-", "data-odd\n", 1))
    first.rename(odd)
    if form == "npy":  # its label file named alike, so that the pair is whole
        label = train / first.name.replace("data-", "label-", 1)
        label.rename(train / odd.name.replace("data-", "label-", 1))
    shown = str(odd).replace("\n", "\\x0a")
    message = f"{shown}: the sample file's name holds the control character 0x0a at byte 9; rename it"
    r = host_refuses(tmp_path, root, form, message)
    assert any(line.startswith("deepcam-host: ") and message in line for line in r.stderr.splitlines()), r.stderr
    verify_reports(root, shown, "0x0a at byte 9")
    if form == "hdf5":
        proc = data_tool("stats", root)
        assert proc.returncode == 1 and f"deepcam-data: {message}" in proc.stderr, proc.stderr


def test_a_label_file_without_its_data_file_is_refused_by_training_as_by_verify(sets, tmp_path):
    root = copy_of(sets["npy"], tmp_path)
    label = sorted((root / "train").glob("label-*.npy"))[1]
    data = label.parent / label.name.replace("label-", "data-")
    data.unlink()
    host_refuses(tmp_path, root, "npy", f"{label}: no data file {data.name} beside it")
    verify_reports(root, label, "no data file", data.name)


def test_a_data_file_without_its_label_file_is_refused_by_training_as_by_verify(sets, tmp_path):
    root = copy_of(sets["npy"], tmp_path)
    data = sorted((root / "validation").glob("data-*.npy"))[0]
    label = data.parent / data.name.replace("data-", "label-")
    label.unlink()
    host_refuses(tmp_path, root, "npy", f"{data}: no label file {label.name} beside it")
    verify_reports(root, data, "no label file", label.name)


@pytest.mark.parametrize("form", ["hdf5", "npy"])
def test_an_empty_train_folder_is_refused_by_training_and_verify(sets, tmp_path, form):
    root = copy_of(sets[form], tmp_path)
    for f in (root / "train").iterdir():
        f.unlink()
    host_refuses(tmp_path, root, form, root / "train", "the train split")
    verify_reports(root, root / "train", "no samples", "train split")


@pytest.mark.parametrize("form", ["hdf5", "npy"])
def test_a_split_folder_or_root_that_is_a_link_loop_is_named_as_one(sets, tmp_path, form):
    """train/ (or the root) a link to itself was "no such directory", where a sample or stats.h5 that loops
    is called a symbolic link loop: the user looked for a folder that is there."""
    root = copy_of(sets[form], tmp_path)
    shutil.rmtree(root / "train")
    (root / "train").symlink_to(root / "train")
    host_refuses(tmp_path, root, form, f"{root / 'train'}: a symbolic link loop, not a directory")
    verify_reports(root, root / "train", "a symbolic link loop, not a directory")
    looped = tmp_path / "looped"
    looped.symlink_to(looped)
    r = run_data("verify", looped)
    assert r.returncode != 0 and f"{looped}: a symbolic link loop, not a directory" in r.stderr, r.stderr


@pytest.mark.parametrize("form", ["hdf5", "npy"])
def test_a_missing_validation_folder_is_refused_by_training_and_verify(sets, tmp_path, form):
    root = copy_of(sets[form], tmp_path)
    shutil.rmtree(root / "validation")
    host_refuses(tmp_path, root, form, f"{root / 'validation'}: no such directory")
    verify_reports(root, root / "validation", "no such directory")


@pytest.mark.parametrize("bound,value", [("maxval", np.inf), ("minval", -np.inf), ("maxval", np.nan)])
def test_stats_with_a_bound_not_finite_is_refused_by_training_before_it_starts(sets, tmp_path, bound, value):
    """1 / (inf - min) is a finite 0: the channel would normalise to zeros, and -inf to NaNs."""
    root = copy_of(sets["hdf5"], tmp_path)
    stats = root / "stats.h5"
    with h5py.File(stats, "r+") as f:
        values = f[f"climate/{bound}"][...]
        values[3] = value
        f[f"climate/{bound}"][...] = values
    host_refuses(tmp_path, root, "hdf5", f"{stats}: channel 3 has climate/minval", "both must be finite")
    assert not (tmp_path / "out").exists()  # refused before the run's record was written
    verify_reports(root, stats, "channel 3", "both must be finite")


@pytest.mark.parametrize("form", ["hdf5", "npy"])
def test_stats_with_max_equal_to_min_is_refused_by_training_and_verify(sets, tmp_path, form):
    root = copy_of(sets[form], tmp_path)
    stats = root / "stats.h5"
    with h5py.File(stats, "r+") as f:
        maxval = f["climate/maxval"][...]
        maxval[3] = f["climate/minval"][3]
        f["climate/maxval"][...] = maxval
    host_refuses(tmp_path, root, form, f"{stats}: channel 3 has climate/minval", "max must exceed min")
    verify_reports(root, stats, "channel 3", "max must exceed min")
    # Training checks the channels it selects; without channel 3 it runs.
    run = write_run(tmp_path / "run2.toml", root, tmp_path / "out2", reader={"name": form, "threads": 2},
                    data={"root": str(root), "channels": [0, 1, 2]}, run={"max_epochs": 1})
    r = run_host(run, timeout=600)
    assert r.returncode in (0, 1), r.stdout + r.stderr
