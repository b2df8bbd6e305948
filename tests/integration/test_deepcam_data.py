"""deepcam-data synth and stats, checked from the outside with h5py/numpy:
the layout and format of SPEC 1, that the labels are visible in the fields,
reproducibility, stats.h5 against numpy, and clean failures."""

import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import HOST

CHANNELS = ["TMQ", "U850", "V850", "UBOT", "VBOT", "QREFHT", "PS", "PSL",
            "T200", "T500", "PRECT", "TS", "TREFHT", "Z1000", "Z200", "ZBOT"]
CH = {name: k for k, name in enumerate(CHANNELS)}
NAME = re.compile(r"^data-\d{4}-\d{2}-\d{2}-\d{2}-1\.h5$")
H, W = 64, 96
COUNTS = {"train": 12, "validation": 4, "test": 2}


def run(exe, *args, check=None):
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check is True:
        assert proc.returncode == 0, proc.stderr
    return proc


def synth(exe, out, seed=7, threads=3, counts=COUNTS, height=H, width=W):
    return run(exe, "synth", "--out", out, "--train", counts["train"],
               "--validation", counts["validation"], "--test", counts["test"],
               "--height", height, "--width", width, "--seed", seed, "--threads", threads, check=True)


def sample_files(root, split):
    return sorted((Path(root) / split).glob("*.h5"))


def load(path):
    with h5py.File(path, "r") as f:
        return f["climate/data"][...], f["climate/labels_0"][...]


def hidden_files(root):
    return [p for p in Path(root).rglob(".*")]


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines, "no error message"
    last = lines[-1]
    assert last.startswith("deepcam-data: "), proc.stderr
    for fragment in fragments:
        assert str(fragment) in last, proc.stderr


@pytest.fixture(scope="module")
def dataset(deepcam_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "set"
    synth(deepcam_data, root)
    return root


@pytest.fixture(scope="module")
def samples(dataset):
    """(split, path, data, labels) of every file of the set."""
    out = []
    for split in COUNTS:
        for path in sample_files(dataset, split):
            data, labels = load(path)
            out.append((split, path, data, labels))
    return out


def test_help(deepcam_data):
    proc = run(deepcam_data, "--help", check=True)
    assert "synth" in proc.stdout and "stats" in proc.stdout and "--seed" in proc.stdout
    # As deepcam-host --version: the same version (it was an unknown command).
    proc = run(deepcam_data, "--version", check=True)
    host = subprocess.run([str(HOST), "--version"], capture_output=True, text=True, timeout=60).stdout
    assert re.fullmatch(r"deepcam-data (\S+) \(LibTorch \S+\)\n", proc.stdout), proc.stdout
    assert host.startswith(f"deepcam-host {proc.stdout.split()[1]} "), host
    # `help convert`, as git's, prints the one help; anything else after --help was ignored.
    assert run(deepcam_data, "help", "convert", check=True).stdout == run(deepcam_data, "--help").stdout
    for extra in (["extra"], ["synth", "convert"]):
        proc = run(deepcam_data, "--help", *extra)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert f"--help takes nothing after it but a command (given: {' '.join(extra)})" in proc.stderr, proc.stderr


def test_layout_and_names(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == ["stats.h5", "test", "train", "validation"]
    all_names = []
    for split, n in COUNTS.items():
        names = [p.name for p in (dataset / split).iterdir()]
        assert len(names) == n
        assert all(NAME.match(name) for name in names), names
        all_names += names
    assert len(set(all_names)) == len(all_names), "names repeat across splits"
    assert sorted(all_names) == sorted(p.name for s in COUNTS for p in sample_files(dataset, s))
    assert hidden_files(dataset) == []


def test_datasets_shapes_and_types(samples):
    assert len(samples) == sum(COUNTS.values())
    for _, path, _, _ in samples:
        with h5py.File(path, "r") as f:
            assert sorted(f.keys()) == ["climate"]
            assert sorted(f["climate"].keys()) == ["data", "labels_0"]
            data, labels = f["climate/data"], f["climate/labels_0"]
            assert data.shape == (H, W, 16) and data.dtype == np.float32
            assert labels.shape == (H, W)
            assert labels.dtype.itemsize == 4 and labels.dtype.kind == "i"


def test_label_values_and_fractions(samples):
    labels = np.stack([s[3] for s in samples])
    assert set(np.unique(labels)) == {0, 1, 2}
    cyclone, river = (labels == 1).mean(), (labels == 2).mean()
    assert 0.002 <= cyclone <= 0.03, cyclone
    assert 0.04 <= river <= 0.15, river
    assert cyclone < river
    assert all((l == 2).any() for l in labels), "every image has a river"
    with_cyclone = np.mean([(l == 1).any() for l in labels])
    assert 0.2 <= with_cyclone <= 0.8, with_cyclone


def test_channel_magnitudes(samples):
    data = np.stack([s[2] for s in samples]).astype(np.float64)
    assert np.isfinite(data).all()
    mean = {name: data[..., k].mean() for name, k in CH.items()}
    lo = {name: data[..., k].min() for name, k in CH.items()}
    hi = {name: data[..., k].max() for name, k in CH.items()}
    assert 9.9e4 < mean["PSL"] < 1.03e5 and 9.0e4 < lo["PSL"] and hi["PSL"] < 1.06e5
    assert 9.0e4 < mean["PS"] < mean["PSL"]
    assert 0 <= lo["TMQ"] and hi["TMQ"] <= 80 and 10 < mean["TMQ"] < 45
    for t in ("T200", "T500", "TS", "TREFHT"):
        assert 190 < lo[t] and hi[t] < 320, t
    assert mean["T200"] < mean["T500"] < mean["TS"]
    assert 1.0e4 < lo["Z200"] and hi["Z200"] < 1.4e4
    assert -1000 < lo["Z1000"] and hi["Z1000"] < 600
    assert 20 < mean["ZBOT"] < 150
    assert 0 <= lo["PRECT"] and 5e-9 < mean["PRECT"] < 2e-7 and hi["PRECT"] < 5e-6
    assert 0 < lo["QREFHT"] and hi["QREFHT"] < 0.04
    for wind in ("U850", "V850", "UBOT", "VBOT"):
        assert np.abs(data[..., CH[wind]]).max() < 90, wind
        assert data[..., CH[wind]].std() > 1, wind


def test_events_are_visible_in_the_fields(samples):
    n_cyclone_images = 0
    for _, path, data, labels in samples:
        tmq, psl, prect = data[..., CH["TMQ"]], data[..., CH["PSL"]], data[..., CH["PRECT"]]
        background = labels == 0
        river = labels == 2
        assert tmq[river].mean() > tmq[background].mean() + 10, path
        assert prect[river].mean() > 2 * prect[background].mean(), path
        cyclone = labels == 1
        if cyclone.any():
            n_cyclone_images += 1
            assert psl[cyclone].mean() < psl[~cyclone].mean() - 1500, path
            assert tmq[cyclone].mean() > tmq[~cyclone].mean() + 15, path
            # rotation: the winds inside a vortex are strong
            speed = np.hypot(data[..., CH["U850"]], data[..., CH["V850"]])
            assert speed[cyclone].max() > 20, path
    assert n_cyclone_images > 0


def test_same_seed_same_bytes_any_threads(deepcam_data, dataset, tmp_path):
    again = tmp_path / "again"
    synth(deepcam_data, again, threads=1)
    for split in COUNTS:
        a, b = sample_files(dataset, split), sample_files(again, split)
        assert [p.name for p in a] == [p.name for p in b]
        for pa, pb in zip(a, b):
            da, la = load(pa)
            db, lb = load(pb)
            assert da.tobytes() == db.tobytes() and la.tobytes() == lb.tobytes(), pa.name
            assert pa.read_bytes() == pb.read_bytes(), pa.name
    assert (dataset / "stats.h5").read_bytes() == (again / "stats.h5").read_bytes()


def test_different_seed_differs(deepcam_data, dataset, tmp_path):
    other = tmp_path / "other"
    synth(deepcam_data, other, seed=8, counts={"train": 2, "validation": 1, "test": 0})
    for split in ("train", "validation"):
        for pa, pb in zip(sample_files(dataset, split), sample_files(other, split)):
            da, la = load(pa)
            db, lb = load(pb)
            assert not np.array_equal(da, db)
            assert not np.array_equal(la, lb)


def test_content_depends_on_split_and_index_only(deepcam_data, dataset, tmp_path):
    # Fewer training files shift the validation names, not their content.
    fewer = tmp_path / "fewer"
    synth(deepcam_data, fewer, counts={"train": 2, "validation": 2, "test": 0})
    for pa, pb in zip(sample_files(dataset, "train")[:2], sample_files(fewer, "train")):
        assert np.array_equal(load(pa)[0], load(pb)[0])
    for pa, pb in zip(sample_files(dataset, "validation")[:2], sample_files(fewer, "validation")):
        assert np.array_equal(load(pa)[0], load(pb)[0])


def read_stats(path):
    with h5py.File(path, "r") as f:
        g = f["climate"]
        assert g["count"].shape == ()
        return {k: g[k][()] for k in ("count", "mean", "sqmean", "minval", "maxval")}


def test_stats_match_numpy(dataset):
    data = np.stack([load(p)[0] for p in sample_files(dataset, "train")]).astype(np.float64)
    data = data.reshape(-1, 16)
    stats = read_stats(dataset / "stats.h5")
    assert int(stats["count"]) == COUNTS["train"] * H * W == data.shape[0]
    for key in ("mean", "sqmean", "minval", "maxval"):
        assert stats[key].shape == (16,), key
    np.testing.assert_allclose(stats["mean"], data.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats["sqmean"], (data * data).mean(axis=0), rtol=1e-10)
    np.testing.assert_array_equal(stats["minval"], data.min(axis=0))
    np.testing.assert_array_equal(stats["maxval"], data.max(axis=0))


def copy_set(dataset, tmp_path, keep_stats=False):
    root = tmp_path / "copy"
    shutil.copytree(dataset, root)
    if not keep_stats:
        (root / "stats.h5").unlink()
    return root


def test_stats_command_recreates_stats(deepcam_data, dataset, tmp_path):
    root = copy_set(dataset, tmp_path)
    run(deepcam_data, "stats", root, check=True)
    a, b = read_stats(dataset / "stats.h5"), read_stats(root / "stats.h5")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert hidden_files(root) == []


def test_stats_on_truncated_file_fails_cleanly(deepcam_data, dataset, tmp_path):
    root = copy_set(dataset, tmp_path)
    victim = sample_files(root, "train")[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = run(deepcam_data, "stats", root)
    assert_one_line_error(proc, victim.name)
    assert not (root / "stats.h5").exists()
    assert hidden_files(root) == []


def test_stats_keeps_old_stats_on_failure(deepcam_data, dataset, tmp_path):
    root = copy_set(dataset, tmp_path, keep_stats=True)
    before = (root / "stats.h5").read_bytes()
    sample_files(root, "train")[0].write_bytes(b"not hdf5 at all")
    proc = run(deepcam_data, "stats", root)
    assert_one_line_error(proc, sample_files(root, "train")[0].name, "not an HDF5 file")
    assert (root / "stats.h5").read_bytes() == before
    assert hidden_files(root) == []


def write_sample(path, data, labels=None):
    with h5py.File(path, "w") as f:
        f["climate/data"] = data
        if labels is not None:
            f["climate/labels_0"] = labels


@pytest.mark.parametrize("case", ["nan", "inf", "missing", "shape", "size", "channels", "empty"])
def test_stats_bad_input_fails_cleanly(deepcam_data, tmp_path, case):
    root = tmp_path / "bad"
    (root / "train").mkdir(parents=True)
    good = np.ones((8, 12, 16), np.float32)
    labels = np.zeros((8, 12), np.int32)
    write_sample(root / "train" / "data-2106-01-01-00-1.h5", good, labels)
    bad = root / "train" / "data-2106-01-01-03-1.h5"
    expect = [bad.name]
    if case == "nan":
        data = good.copy()
        data[3, 5, 7] = np.nan
        write_sample(bad, data, labels)
        expect += ["climate/data", "NaN"]
    elif case == "inf":
        data = good.copy()
        data[0, 1, 2] = -np.inf
        write_sample(bad, data, labels)
        expect += ["climate/data", "Inf"]
    elif case == "missing":
        with h5py.File(bad, "w") as f:
            f["climate/labels_0"] = labels
        expect += ["climate/data"]
    elif case == "shape":
        write_sample(bad, np.ones((8, 12), np.float32), labels)
        expect += ["climate/data", "(8, 12)"]
    elif case == "size":
        # Counted in without a word, though the readers refuse the set.
        write_sample(bad, np.ones((16, 12, 16), np.float32), np.zeros((16, 12), np.int32))
        expect += ["climate/data: has shape (16, 12, 16), but", "data-2106-01-01-00-1.h5 has (8, 12, 16)"]
    elif case == "channels":
        write_sample(bad, np.ones((8, 12, 15), np.float32), labels)
        expect += ["climate/data: has shape (8, 12, 15), but", "data-2106-01-01-00-1.h5 has (8, 12, 16)"]
    else:
        bad.write_bytes(b"")
    proc = run(deepcam_data, "stats", root)
    assert_one_line_error(proc, *expect)
    assert not (root / "stats.h5").exists()
    assert hidden_files(root) == []


def test_stats_reads_other_numeric_types(deepcam_data, tmp_path):
    # Reads go through HDF5 type conversion: float64 and int16 samples work.
    root = tmp_path / "types"
    (root / "train").mkdir(parents=True)
    a = np.arange(4 * 6 * 16, dtype=np.float64).reshape(4, 6, 16) / 7
    b = np.arange(4 * 6 * 16, dtype=np.int16).reshape(4, 6, 16) - 100
    write_sample(root / "train" / "data-a.h5", a)
    write_sample(root / "train" / "data-b.h5", b)
    run(deepcam_data, "stats", root, check=True)
    stats = read_stats(root / "stats.h5")
    both = np.concatenate([a.astype(np.float32).reshape(-1, 16), b.reshape(-1, 16)]).astype(np.float64)
    assert int(stats["count"]) == 48
    np.testing.assert_allclose(stats["mean"], both.mean(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(stats["maxval"], both.max(axis=0))


def test_stats_of_a_set_in_the_numpy_form_only(deepcam_data, dataset, tmp_path):
    # A set written by numpy (convert's output, one file rewritten as
    # big-endian float64 in Fortran order): the same statistics as its
    # source's, since the npy reader reads it as the same float32 values.
    root = tmp_path / "npy"
    run(deepcam_data, "convert", dataset, root, check=True)
    (root / "stats.h5").unlink()
    first = sorted((root / "train").glob("data-*.npy"))[0]
    np.save(first, np.asfortranarray(np.load(first).astype(">f8")))
    run(deepcam_data, "stats", root, check=True)
    a, b = read_stats(dataset / "stats.h5"), read_stats(root / "stats.h5")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert hidden_files(root) == []

    # What the npy reader refuses, stats refuses, naming the file.
    data = np.load(first)
    data[2, 3, 4] = np.nan
    np.save(first, data)
    (root / "stats.h5").unlink()
    assert_one_line_error(run(deepcam_data, "stats", root), str(first), "NaN at (row 2, column 3, channel 4")
    first.unlink()
    label = first.with_name("label-" + first.name[len("data-"):])
    assert_one_line_error(run(deepcam_data, "stats", root), str(label))
    label.unlink()
    for p in (root / "train").glob("*.npy"):
        p.unlink()
    assert_one_line_error(run(deepcam_data, "stats", root), "no training files (*.h5, or data-*.npy")
    assert not (root / "stats.h5").exists() and hidden_files(root) == []


def test_stats_without_train_dir_fails(deepcam_data, tmp_path):
    proc = run(deepcam_data, "stats", tmp_path / "nothing")
    assert_one_line_error(proc, "nothing")
    # The root is named for what it is, as verify and convert name it: "FILE/train: no such directory" sent
    # the user looking for a folder inside a file.
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run(deepcam_data, "stats", tmp_path / "file"),
                          f"{tmp_path / 'file'}: a file, not a directory; a data set root holds train/")
    assert_one_line_error(run(deepcam_data, "stats", tmp_path / "nothing"),
                          f"{tmp_path / 'nothing'}: no such directory; a data set root holds train/")


def test_an_output_folder_given_as_a_link_to_nothing_is_named_so(deepcam_data, dataset, tmp_path):
    # Making the folder's train/ said "cannot create the directory: File exists".
    dangling = tmp_path / "out"
    dangling.symlink_to(tmp_path / "gone")
    proc = run(deepcam_data, "synth", "--out", dangling, "--train", 1, "--validation", 1, "--height", 16,
               "--width", 16)
    assert_one_line_error(proc, f"{dangling}: a symbolic link to {tmp_path / 'gone'} that leads to nothing; synth "
                                "writes the data set into the folder --out names")
    proc = run(deepcam_data, "convert", dataset, dangling)
    assert_one_line_error(proc, f"{dangling}: a symbolic link to {tmp_path / 'gone'} that leads to nothing; "
                                "convert writes")
    proc = run(deepcam_data, "convert", dataset, f"{dangling}/")  # lstat follows a link named with a '/'
    assert_one_line_error(proc, f"{dangling}/: a symbolic link to {tmp_path / 'gone'} that leads to nothing; "
                                "convert writes")
    # On the way to the folder (it said "File exists" and "Not a directory").
    proc = run(deepcam_data, "convert", dataset, dangling / "sub")
    assert_one_line_error(proc, f"{dangling}/sub: on its way, {dangling} is a symbolic link to {tmp_path / 'gone'} "
                                "that leads to nothing; convert writes")
    (tmp_path / "file").write_text("x")
    proc = run(deepcam_data, "synth", "--out", tmp_path / "file" / "set", "--height", 16, "--width", 16)
    assert_one_line_error(proc, f"{tmp_path}/file/set: on its way, {tmp_path}/file is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]
    # A link to a folder is followed, as before.
    (tmp_path / "gone").mkdir()
    synth(deepcam_data, dangling, counts={"train": 1, "validation": 1, "test": 0}, height=16, width=16)
    assert (tmp_path / "gone" / "stats.h5").is_file()


def test_stats_calls_a_train_that_is_a_file_one(deepcam_data, tmp_path):
    # As verify and convert call a root that is a file: "no such directory" sent the user looking for it.
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "train").write_text("not a folder")
    proc = run(deepcam_data, "stats", tmp_path / "set")
    assert_one_line_error(proc, f"{tmp_path / 'set' / 'train'}: a file, not a directory")


def test_synth_to_unwritable_path_fails_cleanly(deepcam_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run(deepcam_data, "synth", "--out", blocker / "set", "--train", 1, "--validation", 1,
               "--height", 32, "--width", 48)
    assert_one_line_error(proc, blocker)
    assert blocker.read_text() == "x"


def test_a_synth_that_fails_before_its_first_sample_leaves_no_folder_it_made(deepcam_data, tmp_path):
    """A sample that does not fit in memory left --out and its empty split folders (and any parent folder made
    for it) behind."""
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))  # the CUDA libraries map a few GB
    kept = tmp_path / "kept"
    (kept / "train").mkdir(parents=True)
    for out in (tmp_path / "a" / "b" / "set", f"{tmp_path}/i/../j/set/", kept):  # "i/../j" makes i too
        proc = subprocess.run([str(deepcam_data), "synth", "--out", str(out), "--train", "1", "--validation", "1",
                               "--height", "16384", "--width", "16384", "--threads", "1"], capture_output=True,
                              text=True, timeout=600, preexec_fn=limit_memory)
        assert proc.returncode == 1 and proc.stderr == "deepcam-data: out of memory\n", proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    # Folders that were there before it stay.
    assert [p.name for p in kept.iterdir()] == ["train"]


def test_synth_failure_removes_temporary_file(deepcam_data, tmp_path):
    # A directory where the first sample goes makes the final rename fail.
    root = tmp_path / "set"
    target = root / "train" / "data-2106-01-01-00-1.h5"
    target.mkdir(parents=True)
    proc = run(deepcam_data, "synth", "--out", root, "--train", 1, "--validation", 1,
               "--height", 32, "--width", 48, "--threads", 1)
    assert_one_line_error(proc, target.name)
    assert target.is_dir() and list(target.iterdir()) == []
    assert hidden_files(root) == []
    assert not (root / "stats.h5").exists()


def limit_file_size(limit):
    """RLIMIT_FSIZE stands in for a full disk: the tool ignores SIGXFSZ (it used to die of it, leaving its
    temporaries), and write() fails with EFBIG."""
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("command", ["synth", "stats"])
def test_a_full_disk_is_an_error_not_a_crash_at_exit(deepcam_data, dataset, tmp_path, command):
    # HDF5 kept a file whose close failed half-open and crashed closing it at exit (SIGSEGV).
    if command == "synth":
        root, limit = tmp_path / "set", 50_000  # a sample at 32 x 48 is about 100 KB
        args = ["synth", "--out", root, "--train", 2, "--validation", 1, "--height", 32, "--width", 48]
    else:
        root, limit = tmp_path / "copy", 2_000  # stats.h5 is a few KB
        shutil.copytree(dataset, root)
        (root / "stats.h5").unlink()
        args = ["stats", root]
    proc = subprocess.run([str(deepcam_data), *map(str, args)], capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_file_size(limit))
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    # The file named as it was to be called, not as its hidden temporary, and the cause as every writer
    # says it: HDF5's own message held buffer addresses and "bytes actually written = 18446744073709551615".
    last = proc.stderr.splitlines()[-1]
    assert re.fullmatch(rf"deepcam-data: {re.escape(str(root))}/(train/data-[0-9-]+\.h5|stats\.h5): (dataset "
                        r"climate/\w+: cannot write|cannot close the file \(its data may not be written\)): File too "
                        r"large \(the file would exceed the file-size limit, ulimit -f, or the largest file the file "
                        r"system holds\)", last), last
    assert hidden_files(root) == [] and not (root / "stats.h5").exists()


def stop_when_written(args, folder, pattern, sig, files=2, preexec_fn=None):
    """Runs a deepcam-data command, sends it `sig` once `files` files matching `pattern` are in `folder`, and
    returns the ended process and its stderr."""
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)
    deadline = time.monotonic() + 120
    while len(list(Path(folder).glob(pattern))) < files:
        assert proc.poll() is None, "it finished before the signal: give it more files"
        assert time.monotonic() < deadline, "no files written in 120 s"
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_synth_stopped_by_a_signal_leaves_whole_files_and_no_temporary(deepcam_data, tmp_path, sig):
    # It used to die at once, leaving the temporaries of the samples it was writing.
    root = tmp_path / "set"
    train = 3000
    proc, err = stop_when_written([deepcam_data, "synth", "--out", root, "--train", train, "--validation", 1,
                                   "--height", 16, "--width", 16, "--threads", 2], root / "train", "*.h5", sig)
    # Ended by the signal itself, as a shell or Slurm expects of a stopped program.
    assert proc.returncode == -sig, (proc.returncode, err)
    assert f"deepcam-data: stopped by {sig.name}: the files finished before it are in place, no temporary is " \
           "left" in err, err
    assert hidden_files(root) == []
    written = sample_files(root, "train")
    assert 2 <= len(written) < train
    for path in written:  # each one whole
        data, labels = load(path)
        assert data.shape == (16, 16, 16) and labels.shape == (16, 16)
    assert not (root / "stats.h5").exists()


def test_synth_started_ignoring_sigint_keeps_ignoring_it(deepcam_data, tmp_path):
    # As a shell's background job (cmd &) or nohup starts it: the stop handler must not take SIGINT back.
    root = tmp_path / "set"
    proc, err = stop_when_written([deepcam_data, "synth", "--out", root, "--train", 300, "--validation", 1,
                                   "--height", 16, "--width", 16, "--threads", 2], root / "train", "*.h5",
                                  signal.SIGINT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0, err
    assert "stopped" not in err
    assert len(sample_files(root, "train")) == 300 and (root / "stats.h5").exists()


def test_synth_refuses_foreign_samples(deepcam_data, tmp_path):
    root = tmp_path / "set"
    (root / "train").mkdir(parents=True)
    (root / "train" / "data-1999-01-01-00-1.h5").write_bytes(b"")
    proc = run(deepcam_data, "synth", "--out", root, "--train", 1, "--validation", 1,
               "--height", 32, "--width", 48)
    assert_one_line_error(proc, "data-1999-01-01-00-1.h5")


def test_synth_refuses_an_out_that_holds_what_it_would_not_write(deepcam_data, dataset, tmp_path):
    """synth into a split folder of a set (its samples beside train/ and stats.h5 there), or over a finished
    set with another seed (the set's npy pairs then stale), wrote and exited 0."""
    root = tmp_path / "set"
    shutil.copytree(dataset, root)
    (root / "notes.txt").write_text("x")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    args = ["--train", 1, "--validation", 1, "--height", 16, "--width", 16]
    proc = run(deepcam_data, "synth", "--out", root / "train", *args)
    assert proc.returncode == 1
    assert_one_line_error(proc, f"{root / 'train'}: holds data-2106-01-01-00-1.h5, which this run would not write; "
                                "use an empty --out directory")
    proc = run(deepcam_data, "synth", "--out", root, "--seed", 9, *args)
    assert proc.returncode == 1
    assert_one_line_error(proc, f"{root}: holds stats.h5: a finished data set;")
    (root / "stats.h5").unlink()
    proc = run(deepcam_data, "synth", "--out", root, *args)
    assert_one_line_error(proc, f"{root}: holds notes.txt, which this run would not write")
    del before[root / "stats.h5"]
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (root / "train").iterdir()) == [p.name for p in sample_files(dataset, "train")]


def test_synth_run_again_finishes_a_stopped_one(deepcam_data, tmp_path):
    # What a stopped synth leaves (the samples finished before it, no stats.h5, which is written last) is
    # finished by the same command, as the README says.
    root = tmp_path / "set"
    args = ["synth", "--out", root, "--train", 4, "--validation", 2, "--height", 16, "--width", 16, "--seed", 4]
    run(deepcam_data, *args, check=True)
    whole = {p.relative_to(root): p.read_bytes() for p in root.rglob("*.h5") if p.name != "stats.h5"}
    (root / "stats.h5").unlink()
    sample_files(root, "train")[3].unlink()
    shutil.rmtree(root / "validation")
    run(deepcam_data, *args, check=True)
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*.h5") if p.name != "stats.h5"} == whole
    assert (root / "stats.h5").is_file()


def test_an_unknown_command_is_refused_with_help_too(deepcam_data):
    # It printed the help and exited 0, as if the command existed.
    proc = run(deepcam_data, "read-bench", "--help")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert_one_line_error(proc, "unknown command 'read-bench'")


@pytest.mark.parametrize("args", [
    ["synth"],
    ["synth", "--out", "x", "--train", "0"],
    ["synth", "--out", "x", "--validation", "0"],  # a set every other command would refuse; synth wrote it
    ["synth", "--out", "x", "--height", "12abc"],
    ["synth", "--out", "x", "--frobnicate", "1"],
    ["synth", "--out"],
    ["stats"],
    ["stats", "a", "b"],
    ["transmogrify"],
    [],
])
def test_bad_arguments(deepcam_data, tmp_path, args):
    proc = subprocess.run([str(deepcam_data), *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("deepcam-data: ")
    assert list(tmp_path.iterdir()) == []


# Digits past 64 bits were called "expects an integer".
@pytest.mark.parametrize("count, says", [
    ("99999999999999999999", "--train must be between 1 and 10000000, got 99999999999999999999"),
    ("-99999999999999999999", "--train must be between 1 and 10000000, got -99999999999999999999"),
    ("1e3", "--train expects an integer, got '1e3'"),
])
def test_a_count_past_64_bits_is_out_of_range_not_no_integer(deepcam_data, tmp_path, count, says):
    proc = run(deepcam_data, "synth", "--out", tmp_path / "x", "--train", count)
    assert proc.returncode == 2 and proc.stderr.startswith(f"deepcam-data: {says}; "), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_default_resolution_smoke(deepcam_data, tmp_path):
    root = tmp_path / "full"
    run(deepcam_data, "synth", "--out", root, "--train", 1, "--validation", 1, "--seed", 3, check=True)
    for split in ("train", "validation"):
        (path,) = sample_files(root, split)
        with h5py.File(path, "r") as f:
            assert f["climate/data"].shape == (768, 1152, 16)
            assert f["climate/labels_0"].shape == (768, 1152)
        assert path.stat().st_size >= 768 * 1152 * 16 * 4
    data, labels = load(sample_files(root, "train")[0])
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels == 2).any()
    stats = read_stats(root / "stats.h5")
    assert int(stats["count"]) == 768 * 1152
    np.testing.assert_allclose(stats["mean"], data.reshape(-1, 16).astype(np.float64).mean(axis=0), rtol=1e-10)


def set_with_a_bad_sample(root):
    """A set whose second training file stats cannot read: an error that names it means stats read the
    training files before it found what it says."""
    (root / "train").mkdir(parents=True)
    write_sample(root / "train" / "data-2106-01-01-00-1.h5", np.ones((8, 12, 16), np.float32))
    (root / "train" / "data-2106-01-01-03-1.h5").write_bytes(b"not hdf5 at all")
    return root


@pytest.mark.parametrize("kind", ["a directory", "a FIFO"])
def test_stats_refuses_a_stats_h5_it_cannot_replace_before_reading(deepcam_data, tmp_path, kind):
    # It read every training file (hours on a full set) and then failed to rename over it.
    root = set_with_a_bad_sample(tmp_path / "set")
    target = root / "stats.h5"
    if kind == "a directory":
        (target / "x").mkdir(parents=True)
    else:
        os.mkfifo(target)
    proc = run(deepcam_data, "stats", root)
    assert proc.returncode == 1
    assert_one_line_error(proc, f"{target}: is {kind}, not a file;")
    assert "data-2106-01-01-03-1.h5" not in proc.stderr
    assert hidden_files(root) == []
    assert target.is_dir() if kind == "a directory" else stat.S_ISFIFO(target.stat().st_mode)


def test_stats_refuses_a_root_it_cannot_write_before_reading(deepcam_data):
    # As a user who cannot write the root (root writes anywhere: then as nobody, in a folder of /tmp,
    # since pytest's tmp_path is private to root).
    base = Path(tempfile.mkdtemp(prefix="stats-read-only-"))
    root = set_with_a_bad_sample(base / "set")
    try:
        base.chmod(0o755)
        root.chmod(0o555)
        user = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
        proc = subprocess.run([str(deepcam_data), "stats", str(root)], capture_output=True, text=True,
                              timeout=600, **user)
        assert proc.returncode == 1
        assert_one_line_error(proc, f"{root / 'stats.h5'}: cannot write it here:", "Permission denied")
        assert "data-2106-01-01-03-1.h5" not in proc.stderr
        assert sorted(p.name for p in root.iterdir()) == ["train"]
    finally:
        root.chmod(0o755)
        shutil.rmtree(base)


def warnings_of(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("deepcam-data: warning: ")]


def test_stats_warns_of_each_channel_training_refuses(deepcam_data, tmp_path):
    # It wrote, silently and with exit 0, a stats.h5 that training and verify refuse.
    rng = np.random.default_rng(0)
    good = rng.normal(size=(16, 16, 16)).astype(np.float32)
    narrow, wide = good.copy(), good.copy()
    narrow[..., CH["PSL"]] = 42  # constant: maxval not above minval
    narrow[..., CH["PS"]] = 0  # the scale 1 / (maxval - minval) overflows float32
    narrow[0, 0, CH["PS"]] = 1e-40
    wide[..., CH["V850"]] = -3e38  # maxval - minval overflows float32: maxval normalises to inf
    wide[0, 0, CH["V850"]] = 3e38
    for name, data, bad, refusal in (("narrow", narrow, ["PS", "PSL"], "channel {} has climate/minval"),
                                     ("wide", wide, ["V850"], "channel {}) normalises to inf")):
        root = tmp_path / name
        for split in ("train", "validation"):
            (root / split).mkdir(parents=True)
            write_sample(root / split / "data-2106-01-01-00-1.h5", data, np.zeros((16, 16), np.int32))
        for quiet in ([], ["--quiet"]):
            proc = run(deepcam_data, "stats", root, *quiet)
            assert proc.returncode == 0, proc.stderr
            warnings = warnings_of(proc)
            assert len(warnings) == len(bad), proc.stderr
            for line, channel in zip(warnings, bad):
                assert f"{root / 'stats.h5'}: channel {CH[channel]} " in line, line
                assert (f"training refuses it unless channel {CH[channel]} ({channel}) is left out of [data] "
                        "channels") in line, line
        np.testing.assert_array_equal(read_stats(root / "stats.h5")["maxval"], data.reshape(-1, 16).max(axis=0))
        # The channels verify refuses, and only those.
        proc = run(deepcam_data, "verify", root)
        assert proc.returncode == 1
        for c in range(16):
            assert (refusal.format(c) in proc.stdout) == (CHANNELS[c] in bad), (c, proc.stdout)
    assert warnings_of(run(deepcam_data, "stats", copy_set_of(tmp_path, good), check=True)) == []


def copy_set_of(tmp_path, data):
    root = tmp_path / "good"
    (root / "train").mkdir(parents=True)
    write_sample(root / "train" / "data-2106-01-01-00-1.h5", data)
    return root


def test_stats_names_a_float64_value_beyond_float32s_range(deepcam_data, tmp_path):
    # It said "Inf at ...", a value the file does not hold: HDF5 converts it to float32 for the sums.
    root = tmp_path / "f64"
    (root / "train").mkdir(parents=True)
    data = np.ones((16, 16, 16))
    data[2, 3, 4] = -1e300
    write_sample(root / "train" / "data-2106-01-01-00-1.h5", data)
    proc = run(deepcam_data, "stats", root)
    assert proc.returncode == 1
    assert_one_line_error(proc, "data-2106-01-01-00-1.h5: dataset climate/data: -1e+300 at (row 2, column 3, "
                                "channel 4 (VBOT)) is beyond float32's range")
    assert "Inf" not in proc.stderr
    assert not (root / "stats.h5").exists() and hidden_files(root) == []


def test_verify_and_convert_say_a_float64_inf_may_be_a_value_beyond_float32s_range(deepcam_data, tmp_path):
    # They said "Inf at ...", of a file that holds 7.75e300 there.
    root = tmp_path / "set"
    synth(deepcam_data, root, counts={"train": 2, "validation": 1, "test": 0}, height=16, width=16)
    sample = sample_files(root, "train")[0]
    data, labels = load(sample)
    data = data.astype(np.float64)
    data[2, 3, 4] = 7.75e300
    write_sample(sample, data, labels)
    says = (f"{sample}: dataset climate/data: Inf, or a float64 beyond float32's range, at (row 2, column 3, "
            "channel 4); data must be finite in float32, the type training reads it in")
    proc = run(deepcam_data, "verify", root)
    assert proc.returncode == 1 and says in proc.stdout, proc.stdout + proc.stderr
    proc = run(deepcam_data, "convert", root, tmp_path / "npy")
    assert proc.returncode == 1 and f"{says}; not converted" in proc.stderr, proc.stderr
    # A float32 file's Inf is an Inf.
    data[2, 3, 4] = 0
    data = data.astype(np.float32)
    data[2, 3, 4] = np.inf
    write_sample(sample, data, labels)
    proc = run(deepcam_data, "verify", root)
    assert proc.returncode == 1 and f"{sample}: dataset climate/data: Inf at (row 2, column 3, channel 4); data " \
        "must be finite\n" in proc.stdout, proc.stdout


def test_an_empty_or_odd_word_on_the_command_line_is_refused_naming_it(deepcam_data, dataset, tmp_path):
    """stats "" (an unset shell variable) took the current folder and rewrote ./stats.h5; a path with an
    ESC was printed raw on the closing line ("... to DIR")."""
    before = (dataset / "stats.h5").stat().st_mtime_ns
    proc = subprocess.run([str(deepcam_data), "stats", ""], capture_output=True, text=True, timeout=60, cwd=dataset)
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc, "stats: argument 1 is empty; give what it stands for")
    assert (dataset / "stats.h5").stat().st_mtime_ns == before
    proc = run(deepcam_data, "verify", dataset, "--threads", "")
    assert proc.returncode == 2
    assert_one_line_error(proc, "verify: argument 3 (after --threads) is empty")
    odd = tmp_path / "set\x1b[31m"
    proc = run(deepcam_data, "synth", "--out", odd, "--train", 1, "--validation", 1, "--height", 16, "--width", 16)
    assert proc.returncode == 2 and "\x1b" not in proc.stderr, repr(proc.stderr)
    assert_one_line_error(proc, f'synth: argument 2 (after --out) ("{tmp_path}/set\\u001b[31m") holds the control '
                                "character 0x1b at byte")
    assert not odd.exists()
    # An option where a value stands: synth made a folder named --quiet, and was not quiet.
    proc = subprocess.run([str(deepcam_data), "synth", "--out", "--quiet", "--train", "1", "--validation", "1"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, "synth: --out needs a value, and --quiet is an option")
    assert not (tmp_path / "--quiet").exists()
