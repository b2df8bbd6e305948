"""deepcam-data verify: a good data set passes in both forms (h5 and npy),
and each kind of bad file is reported on one line naming the file and the
problem, with a summary and a non-zero exit."""

import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import run_host, write_run

H, W = 32, 48


def run(exe, *args):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def good_sets(deepcam_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("verify")
    h5_set = base / "h5"
    ok(run(deepcam_data, "synth", "--out", h5_set, "--train", 5, "--validation", 2, "--height", H, "--width", W,
           "--seed", 5))
    npy_set = base / "npy"
    ok(run(deepcam_data, "convert", h5_set, npy_set))
    return h5_set, npy_set


def copy_of(root, tmp_path):
    out = tmp_path / root.name
    shutil.copytree(root, out)
    return out


def bad(deepcam_data, root, *expected_lines):
    """verify fails; each expected line (a tuple of fragments, the first a
    path) is one line of its output; the summary counts the problems."""
    proc = run(deepcam_data, "verify", root, "--threads", 3)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    problems = [line for line in lines if not line.startswith("verify: ")]
    for fragments in expected_lines:
        fragments = [str(f) for f in fragments]
        matching = [line for line in problems if line.startswith(fragments[0] + ":") and
                    all(f in line for f in fragments)]
        assert matching, f"no line with {fragments} in:\n{proc.stdout}"
    assert len(problems) == len(expected_lines), proc.stdout
    n = len(expected_lines)
    assert f"{n} problem{'s' if n > 1 else ''} in " in lines[-1], proc.stdout
    assert proc.stderr.startswith("deepcam-data: verify: ") and f"{n} problem" in proc.stderr, proc.stderr
    return proc


def first(root, pattern):
    return sorted(Path(root).glob(pattern))[0]


def test_good_sets_pass(deepcam_data, good_sets):
    h5_set, npy_set = good_sets
    proc = ok(run(deepcam_data, "verify", h5_set))
    assert "train: 5 h5 samples, validation: 2 h5 samples" in proc.stdout
    assert "16 channels" in proc.stdout and "no problems" in proc.stdout
    proc = ok(run(deepcam_data, "verify", npy_set, "--threads", 1))
    assert "train: 5 npy samples, validation: 2 npy samples" in proc.stdout and "no problems" in proc.stdout


def test_npy_written_by_numpy_in_other_dtypes_and_orders_passes(deepcam_data, good_sets, tmp_path):
    # Every file replaced by numpy's own: big-endian float64 data in Fortran
    # order, uint8 labels; verify reads any standard .npy.
    root = copy_of(good_sets[1], tmp_path)
    for p in root.glob("*/data-*.npy"):
        np.save(p, np.asfortranarray(np.load(p).astype(">f8")))
    for p in root.glob("*/label-*.npy"):
        np.save(p, np.load(p).astype(np.uint8))
    ok(run(deepcam_data, "verify", root))


def test_truncated_npy(deepcam_data, good_sets, tmp_path):
    root = copy_of(good_sets[1], tmp_path)
    data = first(root, "train/data-*.npy")
    os.truncate(data, data.stat().st_size - 100)
    label = first(root, "validation/label-*.npy")
    os.truncate(label, 20)
    bad(deepcam_data, root, (data, "truncated", "header promises 98304 bytes"),
        (label, "truncated .npy file"))


def test_bytes_after_the_data_are_refused_as_training_refuses_them(deepcam_data, good_sets, tmp_path):
    # numpy reads past them, so a header whose dtype does not describe the file (uint8 over int32 labels,
    # every byte 0, 1 or 2) passed as other values, and the readers trained on them.
    root = copy_of(good_sets[1], tmp_path)
    data = first(root, "train/data-*.npy")
    size = data.stat().st_size
    with open(data, "ab") as f:
        f.write(b"\0" * 7)
    label = first(root, "validation/label-*.npy")
    values = np.load(label)
    wrong = np.lib.format.header_data_from_array_1_0(values.astype(np.uint8))
    raw = label.read_bytes()
    body = raw[len(raw) - values.nbytes:]
    with open(label, "wb") as f:
        np.lib.format.write_array_header_1_0(f, wrong)
        f.write(body)
    bad(deepcam_data, root,
        (data, "7 bytes follow the 98304 bytes of float32 data of shape (32, 48, 16) its header describes",
         f"the file has {size + 7} bytes, not {size}"),
        (label, f"{values.nbytes - values.size} bytes follow the {values.size} bytes of uint8 data"))
    # The npy reader refuses both: the data file when it learns the shape, the labels when it reads them.
    run = write_run(tmp_path / "run.toml", root, tmp_path / "out", reader={"name": "npy"})
    r = run_host(run, "--quiet")
    assert r.returncode == 2 and f"{data}: 7 bytes follow" in r.stderr, r.stderr[-2000:]
    os.truncate(data, size)
    r = run_host(run, "--quiet", "--set", f"run.output_dir={tmp_path / 'out2'}")
    assert r.returncode == 2 and f"{label}: {values.nbytes - values.size} bytes follow" in r.stderr, r.stderr[-2000:]


def test_a_file_name_with_control_characters_is_shown_escaped_on_its_one_line(deepcam_data, good_sets, tmp_path):
    # An ESC in a damaged sample's name cleared the terminal (ESC [2J), and a line break split its line.
    # U+009B, a C1 control, is ESC [ to a terminal: in UTF-8 the bytes c2 9b.
    root = copy_of(good_sets[0], tmp_path)
    odd = root / "train" / "data-2106-01-01-00-\x1b[2J\u009b2J\nx.h5"
    odd.write_bytes(b"not an HDF5 file")
    proc = run(deepcam_data, "verify", root, "--threads", 1)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "\x1b" not in proc.stdout + proc.stderr and "\u009b" not in proc.stdout + proc.stderr, \
        repr(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("verify: ")]
    escaped = str(odd).replace("\x1b", "\\x1b").replace("\n", "\\x0a").replace("\u009b", "\\xc2\\x9b")
    assert len(lines) == 1 and lines[0].startswith(escaped + ": "), repr(proc.stdout)


def test_header_promising_more_than_the_file_holds(deepcam_data, good_sets, tmp_path):
    root = copy_of(good_sets[1], tmp_path)
    data = first(root, "train/data-*.npy")
    raw = data.read_bytes()
    # Same header length, a larger first axis.
    patched = raw.replace(f"'shape': ({H}, {W}, 16)".encode(), f"'shape': ({H + 1}, {W}, 16)".encode(), 1)
    assert patched != raw
    data.write_bytes(patched)
    bad(deepcam_data, root, (data, f"header promises {(H + 1) * W * 16 * 4} bytes"))


def test_unsupported_dtypes(deepcam_data, good_sets, tmp_path):
    root = copy_of(good_sets[1], tmp_path)
    labels = sorted(root.glob("train/label-*.npy"))
    np.save(labels[0], np.load(labels[0]).astype(np.complex64))
    np.save(labels[1], np.load(labels[1]).astype(object), allow_pickle=True)
    np.save(labels[2], np.load(labels[2]).astype("U2"))
    bad(deepcam_data, root, (labels[0], "dtype '<c8' is not supported"), (labels[1], "Python objects"),
        (labels[2], "dtype '<U2' is not supported"))


def test_files_without_their_pair(deepcam_data, good_sets, tmp_path):
    root = copy_of(good_sets[1], tmp_path)
    data = first(root, "train/data-*.npy")
    label_of_data = data.with_name("label-" + data.name[len("data-"):])
    label_of_data.unlink()
    label = first(root, "validation/label-*.npy")
    data_of_label = label.with_name("data-" + label.name[len("label-"):])
    data_of_label.unlink()
    bad(deepcam_data, root, (data, "no label file", label_of_data.name),
        (label, "no data file", data_of_label.name))


def test_values(deepcam_data, good_sets, tmp_path):
    root = copy_of(good_sets[1], tmp_path)
    datas = sorted(root.glob("train/data-*.npy"))
    labels = sorted(root.glob("train/label-*.npy"))
    a = np.load(datas[0])
    a[3, 7, 2] = np.nan
    a[5, 0, 0] = np.inf
    np.save(datas[0], a)
    b = np.load(datas[1])
    b[0, 1, 15] = -np.inf
    np.save(datas[1], b)
    c = np.load(labels[2])
    c[1, 5] = 3
    c[2, 0] = -1
    np.save(labels[2], c)
    d = np.load(labels[3]).astype(np.float32)
    d[4, 4] = 0.5
    np.save(labels[3], d)
    bad(deepcam_data, root,
        (datas[0], "NaN at (row 3, column 7, channel 2) and 1 more non-finite values"),
        (datas[1], "Inf at (row 0, column 1, channel 15)"),
        (labels[2], "value 3 at (row 1, column 5) and 1 more labels outside them"),
        # float32 labels are read as the readers read them (whole numbers): their dtype is no problem
        (labels[3], "element (4, 4) is 0.5, which is not a whole number"))


def data_of(label):
    return label.with_name("data-" + label.name[len("label-"):])


def test_shapes_must_agree(deepcam_data, good_sets, tmp_path):
    root = copy_of(good_sets[1], tmp_path)
    data = first(root, "validation/data-*.npy")
    label = data.with_name("label-" + data.name[len("data-"):])
    np.save(data, np.load(data)[:, :40])
    np.save(label, np.load(label)[:, :40])
    other = sorted(root.glob("train/data-*.npy"))[1]
    other_label = other.with_name("label-" + other.name[len("data-"):])
    np.save(other_label, np.load(other_label)[:30])
    bad(deepcam_data, root, (data, "data (32, 40, 16) float32", "differs from the 5 other npy samples'",
                             "data (32, 48, 16) float32"),
        (other_label, "has shape (30, 48)", "must be (height, width) of the data"))


def test_samples_storing_other_dtypes_pass_as_the_readers_read_them(deepcam_data, good_sets, tmp_path):
    """The readers convert each file's stored types; verify refused a set whose samples differ only in them,
    and with it the numpy form convert writes of such a set (each pair keeps its sample's label dtype)."""
    root = copy_of(good_sets[0], tmp_path)
    files = sorted(root.glob("train/data-*.h5"))
    for path, data_dtype, label_dtype in ((files[0], "<f4", "u1"), (files[1], ">f8", ">i2")):
        with h5py.File(path, "r") as f:
            data, labels = f["climate/data"][...], f["climate/labels_0"][...]
        with h5py.File(path, "w") as f:
            f["climate/data"] = data.astype(data_dtype)
            f["climate/labels_0"] = labels.astype(label_dtype)
    ok(run(deepcam_data, "verify", root))
    npy_set = tmp_path / "npy"
    ok(run(deepcam_data, "convert", root, npy_set))
    assert np.load(npy_set / "train" / ("label-" + files[0].name[len("data-"):-3] + ".npy")).dtype == np.uint8
    ok(run(deepcam_data, "verify", npy_set))
    # Shapes still must agree: a batch stacks the samples.
    label = sorted(npy_set.glob("train/label-*.npy"))[2]
    np.save(label, np.load(label)[:, :40])
    np.save(data_of(label), np.load(data_of(label))[:, :40])
    bad(deepcam_data, npy_set, (data_of(label), "data (32, 40, 16) float32, labels (32, 40) int32 differs from the 6 "
                                                "other npy samples'", "data (32, 48, 16) float32"))



@pytest.mark.parametrize("dtype", ["int32", "uint8"])
def test_integer_npy_data_that_verify_passes_the_npy_reader_reads(deepcam_data, good_sets, tmp_path, dtype):
    """verify passes integer data (the readers convert each file's own dtype); the npy reader refused it."""
    from helpers import plugin_env, write_run
    root = copy_of(good_sets[1], tmp_path)
    data = first(root, "train/data-*.npy")
    info = np.iinfo(dtype)
    np.save(data, np.clip(np.rint(np.load(data)), info.min, info.max).astype(dtype))
    # Statistics that hold the clipped values, as verify wants them.
    ok(run(deepcam_data, "stats", root))
    ok(run(deepcam_data, "verify", root))
    # In batches of one, so that the epoch reads every training sample, the converted file among them.
    config = write_run(tmp_path / "run.toml", root, tmp_path / "out", run={"train_batch_size": 1},
                       reader={"name": "npy", "threads": 1})
    r = subprocess.run([str(deepcam_data), "read", str(config)], capture_output=True, text=True, env=plugin_env(),
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "dtype" not in r.stderr, r.stderr

def test_stats(deepcam_data, good_sets, tmp_path):
    root = copy_of(good_sets[1], tmp_path)
    (root / "stats.h5").unlink()
    bad(deepcam_data, root, (root / "stats.h5", "no such file", "deepcam-data stats"))
    with h5py.File(root / "stats.h5", "w") as f:
        f["climate/count"] = 10
        for name in ("mean", "sqmean", "minval", "maxval"):
            f[f"climate/{name}"] = np.zeros(12)
    proc = bad(deepcam_data, root, *[(root / "stats.h5", f"climate/{n} has 12 values", "16 channels")
                                     for n in ("mean", "sqmean", "minval", "maxval")])
    assert "4 problems in 1 file" in proc.stdout


def rewrite_stats(root, **fields):
    """stats.h5 of `root` with `fields` (name: value) in place of its own."""
    with h5py.File(root / "stats.h5", "r") as f:
        stats = {name: f[f"climate/{name}"][()] for name in ("count", "mean", "sqmean", "minval", "maxval")}
    stats.update(fields)
    (root / "stats.h5").unlink()
    with h5py.File(root / "stats.h5", "w") as f:
        for name, value in stats.items():
            f[f"climate/{name}"] = value


def with_channel(values, channel, value):
    values = np.array(values, dtype=np.float64)
    values[channel] = value
    return values


STATS_FIELDS = {
    "count-zero": (lambda s: {"count": 0}, "dataset climate/count is 0, expected the number of pixels"),
    "count-negative": (lambda s: {"count": -5}, "dataset climate/count is -5, expected the number of pixels"),
    "count-nan": (lambda s: {"count": np.nan}, "dataset climate/count is nan, expected the number of pixels"),
    "count-per-channel": (lambda s: {"count": np.full(16, 10)}, "dataset climate/count has shape (16), expected "
                                                                "one value"),
    "mean-nan": (lambda s: {"mean": with_channel(s["mean"], 3, np.nan)},
                 "dataset climate/mean: channel 3 is nan, expected a finite value"),
    "sqmean-inf": (lambda s: {"sqmean": with_channel(s["sqmean"], 4, np.inf)},
                   "dataset climate/sqmean: channel 4 is inf, expected a finite value"),
    "negative-variance": (lambda s: {"sqmean": with_channel(s["sqmean"], 2, s["mean"][2] ** 2 - 1.0)},
                          "channel 2: sqmean "),
}


@pytest.mark.parametrize("case", list(STATS_FIELDS))
def test_stats_fields_training_does_not_read_are_still_statistics(deepcam_data, good_sets, tmp_path, case):
    """verify refused a missing mean but passed a NaN one, a negative variance, a count of 0 or below."""
    root = copy_of(good_sets[0], tmp_path)
    with h5py.File(root / "stats.h5", "r") as f:
        stats = {name: f[f"climate/{name}"][()] for name in ("mean", "sqmean")}
    change, says = STATS_FIELDS[case]
    rewrite_stats(root, **change(stats))
    proc = bad(deepcam_data, root, (root / "stats.h5", says))
    if case == "negative-variance":
        assert "(a negative variance)" in proc.stdout, proc.stdout


def test_stats_of_another_channel_order_or_range_is_named_per_channel(deepcam_data, good_sets, tmp_path):
    """stats.h5 holds the training files' minimum and maximum per channel. One whose channels 1 and 7 trade
    places (another channel layout), or whose channel 3's range is a thousandth of the data's, normalised the
    inputs to 1e8 without a word from training or verify; verify names each such channel now."""
    root = copy_of(good_sets[0], tmp_path)
    with h5py.File(root / "stats.h5", "r") as f:
        lo, hi = f["climate/minval"][...], f["climate/maxval"][...]
    order = np.arange(16)
    order[[1, 7]] = [7, 1]
    lo, hi = lo[order], hi[order]
    hi[3] = lo[3] + (hi[3] - lo[3]) / 1000
    rewrite_stats(root, minval=lo, maxval=hi)
    fragments = "% of the training files' values lie outside its [minval, maxval]", f"deepcam-data stats {root}"
    bad(deepcam_data, root, *[(root / "stats.h5", f"channel {c}: ", *fragments) for c in (1, 3, 7)])


@pytest.mark.parametrize("form", ["h5", "npy"])
def test_stats_of_part_of_the_training_files_pass(deepcam_data, good_sets, tmp_path, form):
    """A stats.h5 made from four of the five training files leaves a few values of the fifth outside its range:
    no problem (the official data set's may be such a one). Neither are validation values outside it."""
    root = copy_of(good_sets[0 if form == "h5" else 1], tmp_path)
    files = sorted(root.glob(f"train/data-*.{form}"))
    arrays = []
    for f in files:
        if form == "h5":
            with h5py.File(f, "r") as h:
                arrays.append(h["climate/data"][...])
        else:
            arrays.append(np.load(f))
    part = np.stack(arrays[:4]).reshape(-1, 16)
    rewrite_stats(root, minval=part.min(axis=0), maxval=part.max(axis=0))
    whole = np.stack(arrays).reshape(-1, 16)
    assert (whole < part.min(axis=0)).any() or (whole > part.max(axis=0)).any()
    proc = ok(run(deepcam_data, "verify", root))
    assert "no problems" in proc.stdout, proc.stdout


def test_unreadable_and_empty_files(deepcam_data, good_sets, tmp_path):
    root = copy_of(good_sets[1], tmp_path)
    datas = sorted(root.glob("train/data-*.npy"))
    datas[0].write_bytes(b"")
    expected = [(datas[0], "not a .npy file")]
    if os.geteuid() != 0:  # root reads files whatever their mode
        datas[1].chmod(0)
        expected.append((datas[1], "cannot open", "Permission denied"))
    else:  # a directory where a file should be is unreadable for anyone
        datas[1].unlink()
        datas[1].mkdir()
        expected.append((datas[1], "is a directory"))
    try:
        bad(deepcam_data, root, *expected)
    finally:
        if datas[1].is_file():
            datas[1].chmod(0o644)


def test_h5_problems(deepcam_data, good_sets, tmp_path):
    root = copy_of(good_sets[0], tmp_path)
    files = sorted(root.glob("train/data-*.h5"))
    files[0].write_bytes(files[0].read_bytes()[:2000])
    with h5py.File(files[1], "r+") as f:
        f["climate/data"][2, 3, 4] = np.nan
    with h5py.File(files[2], "r+") as f:
        f["climate/labels_0"][0, 9] = 7
    with h5py.File(files[3], "r+") as f:
        del f["climate/labels_0"]
    bad(deepcam_data, root, (files[0], "HDF5"), (files[1], "NaN at (row 2, column 3, channel 4)"),
        (files[2], "climate/labels_0", "value 7 at (row 0, column 9)"),
        (files[3], "climate/labels_0", "no such dataset"))


def test_every_h5_file_the_reader_reads_is_checked_whatever_its_name(deepcam_data, good_sets, tmp_path):
    # The hdf5 reader, as the reference, reads every *.h5 of a split, not only data-*.h5.
    root = copy_of(good_sets[0], tmp_path)
    broken = root / "train" / "broken.h5"
    broken.write_bytes(first(root, "train/data-*.h5").read_bytes()[:2000])
    bad(deepcam_data, root, (broken, "HDF5"))
    broken.unlink()
    shutil.copy(first(root, "train/data-*.h5"), root / "train" / "extra.h5")
    proc = ok(run(deepcam_data, "verify", root))
    assert "train: 6 h5 samples" in proc.stdout, proc.stdout


def test_a_folder_in_both_forms_is_checked_in_both(deepcam_data, good_sets, tmp_path):
    root = copy_of(good_sets[0], tmp_path)
    ok(run(deepcam_data, "convert", root, root))  # in place: npy beside h5
    proc = ok(run(deepcam_data, "verify", root))
    assert "train: 5 h5 samples and 5 npy samples" in proc.stdout
    label = first(root, "train/label-*.npy")
    c = np.load(label)
    c[0, 0] = 9
    np.save(label, c)
    bad(deepcam_data, root, (label, "value 9"))


def test_command_line(deepcam_data, tmp_path):
    proc = run(deepcam_data, "verify")
    assert proc.returncode == 2 and "one argument" in proc.stderr
    proc = run(deepcam_data, "verify", tmp_path, "--verify")
    assert proc.returncode == 2 and "unknown option --verify" in proc.stderr
    proc = run(deepcam_data, "verify", tmp_path / "none")
    assert proc.returncode == 1 and "no such directory" in proc.stderr
    (tmp_path / "train").mkdir()
    proc = run(deepcam_data, "verify", tmp_path)
    assert proc.returncode == 1 and "no folder in it holds samples" in proc.stderr


def test_a_root_that_is_a_file_is_not_called_missing(deepcam_data, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = run(deepcam_data, "verify", afile)
    assert proc.returncode == 1
    assert f"deepcam-data: {afile}: a file, not a directory; verify checks a data set root" in proc.stderr, \
        proc.stderr


def test_leftover_temporaries(deepcam_data, good_sets, tmp_path):
    # What a writer killed mid-file leaves (npy::write and the HDF5 writer).
    root = copy_of(good_sets[1], tmp_path)
    leftover = root / "train" / ".data-2106-01-01-00-1.npy.tmp4242-0"
    leftover.write_bytes(b"\x93NUMPY partial")
    bad(deepcam_data, root, (leftover, "temporary file left by an interrupted write"))


def test_a_leftover_temporary_of_stats_is_listed_too(deepcam_data, good_sets, tmp_path):
    # verify listed those of the split folders only; stats writes stats.h5's beside it, in the root.
    root = copy_of(good_sets[0], tmp_path)
    leftover = root / ".stats.h5.tmp4242-0"
    leftover.write_bytes(b"partial")
    bad(deepcam_data, root, (leftover, "temporary file left by an interrupted write"))


def normalised(root, channel, value):
    """SPEC 1.4's normalisation of `value` on `channel`, in float32 as training computes it."""
    with h5py.File(root / "stats.h5", "r") as s:
        lo, hi = s["climate/minval"][channel], s["climate/maxval"][channel]
    with np.errstate(over="ignore"):
        return np.float32(1 / (hi - lo)) * (np.float32(value) - np.float32(lo))


@pytest.mark.parametrize("form", ["h5", "npy"])
def test_a_finite_value_that_overflows_once_normalised_is_reported(deepcam_data, good_sets, tmp_path, form):
    """Training refuses a sample whose value, finite as stored, normalises to infinity with stats.h5's
    range (a float32 overflow); verify passed it. A value as large that stays finite passes."""
    root = copy_of(good_sets[0 if form == "h5" else 1], tmp_path)
    channel = 10  # synth's narrowest range: the largest scale
    assert np.isinf(normalised(root, channel, 1e35)) and np.isfinite(normalised(root, channel, 1e30))
    files = sorted(root.glob(f"train/data-*.{form}"))
    for path, value in ((files[0], 1e35), (files[1], 1e30)):
        if form == "h5":
            with h5py.File(path, "r+") as f:
                f["climate/data"][1, 2, channel] = value
        else:
            data = np.load(path)
            data[1, 2, channel] = value
            np.save(path, data)
    bad(deepcam_data, root, (files[0], "1e+35 at (row 1, column 2, channel 10) normalises to inf with stats.h5's "
                                       "range; data must be finite once normalised"))
