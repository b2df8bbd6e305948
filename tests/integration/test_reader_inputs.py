"""What the readers hand the model (SPEC 1.4, issue 9 sections 1 and 4, issue
13 sections 1 and 3): the normalised input equals NumPy's float32
`scale * (x - shift)` bit for bit, with the scale computed in the dtype
stats.h5 stores (float32 and float64 stats), for the hdf5 and npy readers and
the prefetch reader over each, channels first and channels_last (then with
channels_last strides: nothing transposed); labels outside {0, 1, 2} or not
whole numbers are an error naming the file, in every reader and stored dtype;
so is an HDF5 dataset created but never written, wholly or in part (HDF5
would read it as zeros), and so is one whose values are not in the file itself
(an external link, a virtual dataset, external raw storage); a warm reader hands out batches from reused buffers (no new pages touched)
while the batch the caller holds stays intact.

The batches come from tests/probes/reader_probe, which builds the reader of a
run file as the engine does and writes each batch to .npy files."""

import json
import shutil
import subprocess

import h5py
import numpy as np
import pytest

from helpers import BUILD_DIR, DATA_TOOL, convert, numpy_scale, plugin_env, synth, write_run

PROBE = BUILD_DIR / "tests" / "reader_probe"
CHANNELS = 16


def probe(run, out, *args):
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run([str(PROBE), str(run), str(out), *map(str, args)], capture_output=True, text=True,
                          env=plugin_env(), timeout=300)


def batches(run, out, *args):
    r = probe(run, out, *args)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def write_stats(root, dtype, minval, maxval):
    with h5py.File(root / "stats.h5", "w") as f:
        f["climate/minval"] = np.asarray(minval, dtype=dtype)
        f["climate/maxval"] = np.asarray(maxval, dtype=dtype)


def expected_batch(files, stats, channels, fmt):
    shift, scale = numpy_scale(stats)
    xs, ys = [], []
    for f in files:
        if fmt == "h5":
            with h5py.File(f, "r") as h:
                x, y = h["climate/data"][...], h["climate/labels_0"][...]
        else:
            x, y = np.load(f), np.load(f.parent / ("label-" + f.name[len("data-"):]))
        x = x[..., channels].astype(np.float32)
        xs.append((scale[channels] * (x - shift[channels])).transpose(2, 0, 1))
        ys.append(y.astype(np.int64))
    return np.stack(xs), np.stack(ys)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One synthetic set as HDF5 and as .npy, each with a float32 and a float64 stats.h5 whose
    min/max make float32 arithmetic differ from float64-then-rounded on some channels."""
    root = tmp_path_factory.mktemp("reader_inputs")
    h5 = synth(root / "synth", train=8, validation=4)
    convert(h5, root / "synth-npy")
    rng = np.random.default_rng(11)
    with h5py.File(h5 / "stats.h5", "r") as f:
        lo0, hi0 = f["climate/minval"][...], f["climate/maxval"][...]
    # Awkward values around the true range: many channels where the two ways differ.
    lo = (lo0 - rng.uniform(0.1, 3.0, CHANNELS)).astype(np.float32)
    hi = (hi0 + rng.uniform(0.1, 3.0, CHANNELS)).astype(np.float32)
    f32 = (np.float32(1.0) / (hi - lo)).astype(np.float32)
    via64 = (1.0 / (hi.astype(np.float64) - lo.astype(np.float64))).astype(np.float32)
    assert (f32 != via64).any(), "the stats must tell float32 arithmetic from float64 arithmetic"
    sets = {}
    for fmt, src in (("h5", h5), ("npy", root / "synth-npy")):
        for dtype in ("float32", "float64"):
            dst = root / f"{fmt}-{dtype}"
            shutil.copytree(src, dst)
            write_stats(dst, dtype, lo, hi)
            sets[fmt, dtype] = dst
    return sets


# name: (files, [reader], [reader.source] or None)
READERS = {
    "hdf5": ("h5", {"name": "hdf5", "threads": 2}, None),
    "npy": ("npy", {"name": "npy", "threads": 2}, None),
    "prefetch-hdf5": ("h5", {"name": "prefetch", "threads": 2, "depth": 2}, {"name": "hdf5", "threads": 1}),
    "prefetch-npy": ("npy", {"name": "prefetch", "threads": 2, "depth": 2}, {"name": "npy", "threads": 1}),
}


def run_file(tmp_path, root, reader, name="run.toml", reader_keys=None, **sections):
    _, table, source = READERS[reader]
    changes = dict(sections)
    changes["reader"] = dict(table, **(reader_keys or {}))
    if source:
        changes["reader.source"] = source
    return write_run(tmp_path / name, root, tmp_path / "out", **changes)


def validation_files(root, fmt):
    return sorted((root / "validation").glob("data-*.h5" if fmt == "h5" else "data-*.npy"))


def with_validation_data(tmp_path, data, fmt, name, change):
    """A copy of the float32 set whose validation sample 1 holds change(its data); and that sample's file."""
    root = tmp_path / name
    shutil.copytree(data[fmt, "float32"], root)
    target = validation_files(root, fmt)[1]
    if fmt == "h5":
        with h5py.File(target, "r") as f:
            x, y = f["climate/data"][...], f["climate/labels_0"][...]
        target.unlink()
        with h5py.File(target, "w") as f:
            f["climate/data"] = change(x)
            f["climate/labels_0"] = y
    else:
        np.save(target, change(np.load(target)))
    return root, target


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stats_dtype", ["float32", "float64"])
@pytest.mark.parametrize("reader", list(READERS))
def test_inputs_equal_numpy_float32_arithmetic(tmp_path, data, reader, stats_dtype, memory_format):
    fmt = READERS[reader][0]
    root = data[fmt, stats_dtype]
    run = run_file(tmp_path, root, reader, run={"memory_format": memory_format, "validation_batch_size": 3})
    got = batches(run, tmp_path / "batches", "--split", "validation")
    files = validation_files(root, fmt)
    assert [b["shape"][0] for b in got] == [3, 1]
    c, h, w = CHANNELS, 64, 96
    for b in got:
        n = b["shape"][0]
        # channels_last: the batch is a view of (B, H, W, C) memory, nothing transposed.
        assert b["strides"] == ([c * h * w, 1, w * c, c] if memory_format == "channels_last" else [c * h * w, h * w, w, 1])
        x = np.load(tmp_path / "batches" / f"e0-b{b['batch']}-data.npy")
        y = np.load(tmp_path / "batches" / f"e0-b{b['batch']}-labels.npy")
        want_x, want_y = expected_batch(files[3 * b["batch"]:3 * b["batch"] + n], root / "stats.h5",
                                        list(range(CHANNELS)), fmt)
        assert x.dtype == np.float32 and x.shape == want_x.shape
        # Bit for bit: as integers, so that -0.0 and 0.0 differ too.
        assert np.array_equal(x.view(np.uint32), want_x.view(np.uint32))
        assert np.array_equal(y, want_y)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("reader", ["hdf5", "npy"])
def test_selected_channels_equal_numpy(tmp_path, data, reader, memory_format):
    fmt = READERS[reader][0]
    root = data[fmt, "float32"]
    channels = [3, 4, 5, 6, 7, 8, 9, 10, 0, 15, 11]
    run = run_file(tmp_path, root, reader, data={"root": str(root), "channels": channels},
                   run={"memory_format": memory_format, "validation_batch_size": 4})
    got = batches(run, tmp_path / "batches", "--split", "validation")
    assert len(got) == 1
    x = np.load(tmp_path / "batches" / "e0-b0-data.npy")
    want_x, _ = expected_batch(validation_files(root, fmt), root / "stats.h5", channels, fmt)
    assert np.array_equal(x.view(np.uint32), want_x.view(np.uint32))


def test_float32_stats_are_not_computed_in_float64(tmp_path, data):
    """The float32 and float64 stats hold the same values; only the arithmetic differs, so the
    inputs must differ on the channels where the two scales do."""
    out = {}
    for dtype in ("float32", "float64"):
        run = run_file(tmp_path, data["h5", dtype], "hdf5", name=f"{dtype}.toml", run={"validation_batch_size": 4})
        batches(run, tmp_path / dtype, "--split", "validation")
        out[dtype] = np.load(tmp_path / dtype / "e0-b0-data.npy")
    s32 = numpy_scale(data["h5", "float32"] / "stats.h5")[1]
    s64 = numpy_scale(data["h5", "float64"] / "stats.h5")[1]
    differ = s32 != s64
    assert differ.any()
    assert not np.array_equal(out["float32"][:, differ], out["float64"][:, differ])
    assert np.array_equal(out["float32"][:, ~differ], out["float64"][:, ~differ])


@pytest.mark.parametrize("reader", ["hdf5", "npy"])
def test_a_float64_value_beyond_float32_is_named_as_one_not_only_as_inf(tmp_path, data, reader):
    # The readers read float64 data as float32, where 1e300 becomes inf: the message said the file holds inf,
    # which it does not (deepcam-data stats names such a value as the file holds it).
    def with_big_value(x):
        x = x.astype(np.float64)
        x[1, 2, 3] = 1e300
        return x

    root, target = with_validation_data(tmp_path, data, READERS[reader][0], "big", with_big_value)
    r = probe(run_file(tmp_path, root, reader), tmp_path / "batches", "--split", "validation")
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(target) in r.stderr and "at (1, 2, 3) holds inf (or a number beyond float32's range, which reads " \
        "as inf);" in r.stderr, r.stderr


# ---- labels ------------------------------------------------------------------------------------

def bad_label_set(tmp_path, data, fmt, dtype, value, where=(1, 2)):
    """The float32 set with validation sample 1's labels stored as `dtype`, one pixel `value`."""
    root = tmp_path / "bad"
    shutil.copytree(data[fmt, "float32"], root)
    target = validation_files(root, fmt)[1]
    if fmt == "h5":
        with h5py.File(target, "r") as f:
            x, y = f["climate/data"][...], f["climate/labels_0"][...]
        y = y.astype(dtype)
        y[where] = value
        target.unlink()
        with h5py.File(target, "w") as f:
            f["climate/data"] = x
            f["climate/labels_0"] = y
        return root, target
    label = target.parent / ("label-" + target.name[len("data-"):])
    y = np.load(label).astype(dtype)
    y[where] = value
    np.save(label, y)
    return root, label


LABEL_CASES = [
    ("int32", 7, "holds 7;"),
    ("int64", -1, "holds -1;"),
    ("uint8", 255, "holds 255;"),
    ("int16", 3, "holds 3;"),
    ("float32", 0.5, "holds 0.5, not a whole number"),
    ("float64", 2.5, "holds 2.5, not a whole number"),
    ("float32", 3.0, "holds 3;"),
    ("float16", -2.0, "holds -2;"),
]


@pytest.mark.parametrize("dtype,value,says", LABEL_CASES)
@pytest.mark.parametrize("reader", list(READERS))
def test_labels_outside_the_classes_are_refused_naming_the_file(tmp_path, data, reader, dtype, value, says):
    fmt = READERS[reader][0]
    root, bad = bad_label_set(tmp_path, data, fmt, dtype, value)
    run = run_file(tmp_path, root, reader)
    r = probe(run, tmp_path / "batches", "--split", "validation")
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(bad) in r.stderr and "at (1, 2) " + says in r.stderr, r.stderr
    assert "class id" in r.stderr and "Target" not in r.stderr


def test_bool_labels_of_h5py_are_refused_as_verify_names_them(tmp_path, data):
    # h5py stores a bool array as an HDF5 enum: the readers said "is not numeric" where verify says what it is.
    root, bad = bad_label_set(tmp_path, data, "h5", bool, True)
    r = probe(run_file(tmp_path, root, "hdf5"), tmp_path / "batches", "--split", "validation")
    assert r.returncode == 2, r.stdout + r.stderr
    says = ("climate/labels_0: is stored as an enum (h5py stores bool arrays so); cannot read it as int64: store "
            "integers or floats (numpy's astype)")
    assert str(bad) in r.stderr and says in r.stderr, r.stderr


@pytest.mark.parametrize("array", ["data", "labels"])
@pytest.mark.parametrize("reader", ["npy", "prefetch-npy"])
def test_bool_npy_arrays_are_refused_as_the_hdf5_reader_refuses_h5py_bool(tmp_path, data, reader, array):
    """numpy's bool (|b1) trained as 0 and 1 in the npy readers, and verify passed it, where the hdf5 reader
    refuses h5py's bool: no climate field or label map is stored as bool but by mistake."""
    if array == "data":
        root, bad = with_validation_data(tmp_path, data, "npy", "bad", lambda x: x > x.mean())
    else:
        root, bad = bad_label_set(tmp_path, data, "npy", bool, True)
    says = f"{bad}: holds bool values (|b1), which are neither climate values nor classes 0, 1 and 2"
    r = probe(run_file(tmp_path, root, reader), tmp_path / "batches", "--split", "validation")
    assert r.returncode == 2 and says in r.stderr, r.stdout + r.stderr
    r = subprocess.run([str(DATA_TOOL), "verify", str(root)], capture_output=True, text=True, env=plugin_env(),
                       timeout=300)
    assert r.returncode == 1 and says in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("dtype", ["float32", "float64", "uint8", "int8", "float16"])
@pytest.mark.parametrize("reader", ["hdf5", "npy"])
def test_whole_number_labels_of_any_dtype_are_read(tmp_path, data, reader, dtype):
    fmt = READERS[reader][0]
    root, _ = bad_label_set(tmp_path, data, fmt, dtype, 2)
    run = run_file(tmp_path, root, reader, run={"validation_batch_size": 4})
    batches(run, tmp_path / "batches", "--split", "validation")
    y = np.load(tmp_path / "batches" / "e0-b0-labels.npy")
    _, want_y = expected_batch(validation_files(root, fmt), root / "stats.h5", list(range(CHANNELS)), fmt)
    assert y[1, 1, 2] == 2 and np.array_equal(y, want_y)


def test_training_with_a_bad_label_stops_with_the_file_named(tmp_path, data):
    from helpers import run_host
    root, bad = bad_label_set(tmp_path, data, "h5", "int32", 7)
    # The bad sample is a validation sample: training reaches it after the first epoch.
    run = write_run(tmp_path / "run.toml", root, tmp_path / "out")
    r = run_host(run)
    assert r.returncode == 2, r.stderr[-2000:]
    assert str(bad) in r.stderr and "holds 7" in r.stderr and "out of bounds" not in r.stderr


# ---- datasets never written -------------------------------------------------------------------

def unwritten_set(tmp_path, data, dataset, chunked):
    """The float32 HDF5 set with validation sample 1's `dataset` created but never written, or
    (chunked) written in its first half only: HDF5 reads the rest as its fill value, zeros."""
    root = tmp_path / "unwritten"
    shutil.copytree(data["h5", "float32"], root)
    target = validation_files(root, "h5")[1]
    with h5py.File(target, "r") as f:
        stored = {name: f[name][...] for name in ("climate/data", "climate/labels_0")}
    target.unlink()
    with h5py.File(target, "w") as f:
        for name, value in stored.items():
            if name != dataset:
                f[name] = value
                continue
            d = f.create_dataset(name, shape=value.shape, dtype=value.dtype,
                                 chunks=(1,) + value.shape[1:] if chunked else None)
            if chunked:
                d[: value.shape[0] // 2] = value[: value.shape[0] // 2]
    return root, target


@pytest.mark.parametrize("chunked", [False, True], ids=["never-written", "half-written"])
@pytest.mark.parametrize("dataset", ["climate/data", "climate/labels_0"])
@pytest.mark.parametrize("reader", ["hdf5", "prefetch-hdf5"])
def test_a_dataset_never_written_is_refused_naming_the_file(tmp_path, data, reader, dataset, chunked):
    root, bad = unwritten_set(tmp_path, data, dataset, chunked)
    with h5py.File(bad, "r") as f:
        stored = f[dataset][...]
        assert not stored[stored.shape[0] // 2:].any(), "h5py reads what was never written as zeros"
    run = run_file(tmp_path, root, reader)
    r = probe(run, tmp_path / "batches", "--split", "validation")
    assert r.returncode == 2, r.stdout + r.stderr
    says = "is only partly written" if chunked else "holds no data: it was created but never written"
    assert f"{bad}: dataset {dataset}: {says}" in r.stderr, r.stderr


# ---- datasets stored outside their file --------------------------------------------------------

def store_elsewhere(target, name, value, storage, side):
    """Writes `value` as dataset `name` of the open h5py file `target`, its values outside it in
    the folder `side`, as `storage` says; each form reads back right through h5py while its other
    file is whole."""
    if storage == "external-link":
        with h5py.File(side / "linked.h5", "w") as other:
            other["values"] = value
        target[name] = h5py.ExternalLink(str(side / "linked.h5"), "/values")
    elif storage == "virtual":
        with h5py.File(side / "source.h5", "w") as other:
            other["values"] = value
        layout = h5py.VirtualLayout(shape=value.shape, dtype=value.dtype)
        layout[...] = h5py.VirtualSource(str(side / "source.h5"), "values", shape=value.shape)
        target.create_virtual_dataset(name, layout, fillvalue=0)
    else:  # external raw storage
        value.tofile(side / "raw.bin")
        target.create_dataset(name, shape=value.shape, dtype=value.dtype,
                              external=[(str(side / "raw.bin"), 0, h5py.h5f.UNLIMITED)])


STORED_ELSEWHERE = {"external-link": "is in another file, reached through an external link",
                    "virtual": "is a virtual dataset: its values are in other files",
                    "external-raw": "keeps its values in external raw files"}


@pytest.mark.parametrize("storage", list(STORED_ELSEWHERE))
@pytest.mark.parametrize("dataset", ["climate/data", "climate/labels_0"])
@pytest.mark.parametrize("reader", ["hdf5", "prefetch-hdf5"])
def test_a_dataset_stored_outside_its_file_is_refused_naming_the_file(tmp_path, data, reader, dataset, storage):
    """Through an external link the readers read the other file's offsets in the sample's own file
    (training on whatever lay there); a virtual dataset whose source is gone, or external raw storage
    cut short, read as zeros without an error. Refused in every form, even while whole."""
    root = tmp_path / "elsewhere"
    shutil.copytree(data["h5", "float32"], root)
    side = tmp_path / "side"
    side.mkdir()
    bad = validation_files(root, "h5")[1]
    with h5py.File(bad, "r") as f:
        stored = {name: f[name][...] for name in ("climate/data", "climate/labels_0")}
    bad.unlink()
    with h5py.File(bad, "w") as f:
        f["padding"] = np.full(1 << 18, 7.0, np.float32)  # other bytes where the linked file's data lies
        for name, value in stored.items():
            if name == dataset:
                store_elsewhere(f, name, value, storage, side)
            else:
                f[name] = value
    with h5py.File(bad, "r") as f:
        assert np.array_equal(f[dataset][...], stored[dataset])  # h5py reads it right while it is whole
    run = run_file(tmp_path, root, reader)
    r = probe(run, tmp_path / "batches", "--split", "validation")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{bad}: dataset {dataset}: {STORED_ELSEWHERE[storage]}" in r.stderr, r.stderr
    # deepcam-data verify refuses what training refuses.
    v = subprocess.run([str(DATA_TOOL), "verify", str(root)], capture_output=True, text=True, timeout=300)
    assert v.returncode != 0 and f"{bad}: dataset {dataset}: {STORED_ELSEWHERE[storage]}" in v.stdout + v.stderr, \
        v.stdout + v.stderr


@pytest.mark.parametrize("storage", list(STORED_ELSEWHERE))
def test_stats_stored_outside_their_file_are_refused(tmp_path, data, storage):
    root = tmp_path / "elsewhere"
    shutil.copytree(data["h5", "float32"], root)
    side = tmp_path / "side"
    side.mkdir()
    stats = root / "stats.h5"
    with h5py.File(stats, "r") as f:
        stored = {name: f["climate"][name][...] for name in f["climate"]}
    stats.unlink()
    with h5py.File(stats, "w") as f:
        f["padding"] = np.full(1 << 12, -1.0, np.float32)
        for name, value in stored.items():
            if name == "minval":
                store_elsewhere(f, "climate/minval", value, storage, side)
            else:
                f["climate/" + name] = value
    r = probe(run_file(tmp_path, root, "hdf5"), tmp_path / "batches", "--split", "validation")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{stats}: dataset climate/minval: {STORED_ELSEWHERE[storage]}" in r.stderr, r.stderr


# ---- batch buffers -----------------------------------------------------------------------------

@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("reader", ["hdf5", "npy"])
def test_warm_batches_reuse_their_buffers_and_stay_correct(tmp_path, data, reader, memory_format):
    fmt = READERS[reader][0]
    root = data[fmt, "float32"]
    run = run_file(tmp_path, root, reader, reader_keys={"io": "pread"} if fmt == "npy" else None,
                   run={"memory_format": memory_format})
    got = batches(run, tmp_path / "batches", "--split", "validation", "--epochs", "6")
    assert len(got) == 12
    # Warm: from epoch 2 on. (A worker's scratch buffers grow on its first sample; see below for
    # a worker that has not had one by then.)
    warm = got[4:]
    # The previous batch's labels are held while the next is read (as the engine holds them):
    # two labels buffers take turns, one data buffer serves every batch.
    assert len({b["data_ptr"] for b in warm}) == 1
    assert len({b["labels_ptr"] for b in warm}) == 2
    assert all(b["held_intact"] for b in got)
    files = validation_files(root, fmt)
    for b in got:
        x = np.load(tmp_path / "batches" / f"e{b['epoch']}-b{b['batch']}-data.npy")
        y = np.load(tmp_path / "batches" / f"e{b['epoch']}-b{b['batch']}-labels.npy")
        want_x, want_y = expected_batch(files[2 * b["batch"]:2 * b["batch"] + 2], root / "stats.h5",
                                        list(range(CHANNELS)), fmt)
        assert np.array_equal(x.view(np.uint32), want_x.view(np.uint32)) and np.array_equal(y, want_y)
    # A warm next() touches no new memory: a fresh batch would fault in each of its pages
    # (2 x (393 KB + 98 KB) here, about 240 pages), and so would HDF5 opening a file while
    # two are open at once if it had not kept the room (h5::keep_room_for_open_files: about
    # 130 pages a file). The hdf5 reader maps each sample's data from the page cache: mapping
    # already-cached pages costs about 7 faults a sample (page-table entries, no memory),
    # 14-15 a batch here and at most 35 seen; npy reads with pread and sees none.
    # The pool hands a sample to whichever worker is free, so on a loaded machine one of the two
    # workers may have read nothing before epoch 2: its first sample grows its scratch then (npy's
    # file buffer, 98-99 pages; hdf5's, 20-50), in one warm batch, and in no other.
    faults = [b["minor_faults"] for b in warm]
    over = [f for f in faults if f >= (60 if reader == "hdf5" else 20)]
    assert len(over) <= 1 and all(f < 150 for f in over), faults


# ---- what a reader cannot read, named ------------------------------------------------------------

def write_huge_npy(path, shape, descr="<f4"):
    """An npy file whose valid header declares `shape` (float32): sparse, so that its apparent size
    costs no disk. A data file's labels get a header of its height and width too (uint8), as the reader
    checks them against the data's shape first."""
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, tuple(shape))
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
    with open(path, "r+b") as f:
        f.truncate(10 + len(header) + int(np.prod(shape)) * np.dtype(descr).itemsize)
    if path.name.startswith("data-"):
        write_huge_npy(path.with_name("label-" + path.name[len("data-"):]), shape[:2], "|u1")


@pytest.mark.parametrize("io", ["mmap", "pread", "direct"])
def test_a_truncated_npy_sample_is_refused_naming_the_bytes_it_needs(tmp_path, data, io):
    # It named the bytes its header promises after the offset, and the file's, never the size it needs.
    from helpers import run_host
    root = tmp_path / "cut"
    shutil.copytree(data["npy", "float32"], root)
    second = sorted((root / "train").glob("data-*.npy"))[1]  # the first, which fixes the shape, is checked apart
    size = second.stat().st_size
    with open(second, "r+b") as f:
        f.truncate(size - 100)
    r = run_host(run_file(tmp_path, root, "npy", reader_keys={"io": io}))
    assert r.returncode == 2, r.stderr[-3000:]
    line = next(l for l in r.stderr.splitlines() if l.startswith("deepcam-host:"))
    assert str(second) in line and f"(a file of {size} bytes), but the file has {size - 100} bytes" in line, line


@pytest.mark.parametrize("io", ["pread", "direct"])
def test_an_npy_file_larger_than_any_sample_is_refused_by_its_size_naming_it(tmp_path, data, io):
    """A sparse terabyte (a damaged or foreign file): the buffer as large as the file failed to be allocated, and
    the run ended as "out of memory: std::bad_alloc", naming no file."""
    from helpers import run_host
    root = tmp_path / "huge"
    shutil.copytree(data["npy", "float32"], root)
    second = sorted((root / "train").glob("data-*.npy"))[1]
    with open(second, "r+b") as f:
        f.truncate(1 << 40)
    r = run_host(run_file(tmp_path, root, "npy", reader_keys={"io": io}))
    assert r.returncode == 2, r.stderr[-3000:]
    line = next(l for l in r.stderr.splitlines() if l.startswith("deepcam-host:"))
    assert f"{second}: {1 << 40} bytes, more than a sample of the set's shape holds in any dtype" in line, line
    assert "out of memory" not in r.stderr


@pytest.mark.parametrize("reader", ["npy", "prefetch-npy"])
def test_a_sample_too_large_for_memory_is_refused_naming_file_bytes_and_batch(tmp_path, data, reader):
    from helpers import run_host
    root = tmp_path / "huge"
    shutil.copytree(data["npy", "float32"], root)
    first = sorted((root / "train").glob("data-*.npy"))[0]
    shape = (200000, 200000, 16)
    write_huge_npy(first, shape)
    assert first.stat().st_blocks * 512 < 1 << 20, "the test must take no disk"
    run = run_file(tmp_path, root, reader, run={"train_batch_size": 2})
    r = run_host(run)
    # Bad input, not an internal error with a C++ backtrace.
    assert r.returncode == 2, r.stderr[-3000:]
    assert "frame #" not in r.stderr and "internal error" not in r.stderr, r.stderr[-3000:]
    batch_bytes = 2 * (16 * 200000 * 200000 * 4 + 200000 * 200000 * 8)
    line = next(l for l in r.stderr.splitlines() if l.startswith("deepcam-host:"))
    assert str(first) in line and f"{batch_bytes} bytes" in line and "a batch of 2 samples" in line, line
    assert "(200000, 200000, 16)" in line, line


def as_integers(x, dtype):
    info = np.iinfo(dtype)
    return np.clip(np.rint(x), info.min, info.max).astype(dtype)


@pytest.mark.parametrize("reader", ["npy", "prefetch-npy"])
def test_a_batch_the_allocator_refuses_is_named_not_a_backtrace(tmp_path, data, reader):
    """A batch the machine could hold, but this process may not (a data limit, as ulimit or a batch system
    sets one): the allocation fails in next() or in the prefetch reader's ring, and says so as the check at
    construction does."""
    import os
    import resource
    root = tmp_path / "large"
    shutil.copytree(data["npy", "float32"], root)
    first = sorted((root / "train").glob("data-*.npy"))[0]
    write_huge_npy(first, (4000, 4000, 16))
    run = run_file(tmp_path, root, reader, run={"train_batch_size": 2})
    batch_bytes = 2 * 4000 * 4000 * (16 * 4 + 8)

    def limit_data():
        # Private writable memory (malloc'd buffers), not the libraries' mapped code.
        resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30))

    r = subprocess.run([str(DATA_TOOL), "read", str(run)], capture_output=True, text=True, env=plugin_env(),
                       preexec_fn=limit_data, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "frame #" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepcam-data: "), r.stderr[-3000:]
    assert str(first) in lines[0] and f"{batch_bytes} bytes" in lines[0], lines[0]
    assert "a batch of 2 samples" in lines[0] and "train_batch_size" in lines[0], lines[0]
    if os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") > batch_bytes:
        assert "allocating it failed" in lines[0], lines[0]

@pytest.mark.parametrize("dtype", ["int32", "int16", "uint8", "int64"])
@pytest.mark.parametrize("reader", ["hdf5", "npy", "prefetch-npy"])
def test_integer_data_is_read_converted(tmp_path, data, reader, dtype):
    """The readers convert each file's own dtype: integer data too, in the npy reader as in the hdf5
    reader (test_verify.py: verify passes it, and training reads it)."""
    fmt = READERS[reader][0]
    root, _ = with_validation_data(tmp_path, data, fmt, "int", lambda x: as_integers(x, dtype))
    run = run_file(tmp_path, root, reader, run={"validation_batch_size": 4})
    got = batches(run, tmp_path / "batches", "--split", "validation")
    assert [b["shape"][0] for b in got] == [4]
    x = np.load(tmp_path / "batches" / "e0-b0-data.npy")
    want_x, _ = expected_batch(validation_files(root, fmt), root / "stats.h5", list(range(CHANNELS)), fmt)
    assert np.array_equal(x.view(np.uint32), want_x.view(np.uint32))


@pytest.mark.parametrize("kind", ["directory", "fifo"])
@pytest.mark.parametrize("reader", ["hdf5", "npy"])
def test_stats_that_is_not_a_file_is_named_for_what_it_is(tmp_path, data, reader, kind):
    import os
    fmt = READERS[reader][0]
    root = tmp_path / "stats"
    shutil.copytree(data[fmt, "float32"], root)
    (root / "stats.h5").unlink()
    if kind == "directory":
        (root / "stats.h5").mkdir()
    else:
        os.mkfifo(root / "stats.h5")
    r = probe(run_file(tmp_path, root, reader), tmp_path / "batches")
    assert r.returncode == 2, r.stderr
    what = "a directory" if kind == "directory" else "a FIFO (named pipe)"
    assert f"{root / 'stats.h5'}: is {what}, not a file; the data root must hold stats.h5" in r.stderr, r.stderr
    assert "no such file" not in r.stderr


def test_a_channel_beyond_the_data_names_the_key(tmp_path, data):
    root = tmp_path / "chan8"
    shutil.copytree(data["h5", "float32"], root)
    first = sorted((root / "train").glob("data-*.h5"))[0]
    with h5py.File(first, "r") as f:
        x, y = f["climate/data"][...], f["climate/labels_0"][...]
    first.unlink()
    with h5py.File(first, "w") as f:
        f["climate/data"] = x[:, :, :8]
        f["climate/labels_0"] = y
    r = probe(run_file(tmp_path, root, "hdf5"), tmp_path / "batches")
    assert r.returncode == 2, r.stderr
    assert f"[data] channels selects channel 8, but {first} has channels 0..7" in r.stderr, r.stderr


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_a_first_sample_stored_channels_first_is_named_not_blamed_on_stats(tmp_path, data, fmt):
    # (16, H, W) read as 16 rows of W columns and H channels: "stats.h5 must hold one value per channel".
    root = tmp_path / "chw"
    shutil.copytree(data[fmt, "float32"], root)
    first = sorted((root / "train").glob(f"data-*.{fmt}"))[0]
    if fmt == "h5":
        with h5py.File(first, "r") as f:
            x, y = f["climate/data"][...], f["climate/labels_0"][...]
        first.unlink()
        with h5py.File(first, "w") as f:
            f["climate/data"] = x.transpose(2, 0, 1)
            f["climate/labels_0"] = y
        says = f"{first}: climate/labels_0 has shape ({{h}}, {{w}}), but climate/data is (16, {{h}}, {{w}})"
    else:
        x = np.load(first)
        y = np.load(first.with_name("label-" + first.name[len("data-"):]))
        np.save(first, np.ascontiguousarray(x.transpose(2, 0, 1)))
        label = first.with_name("label-" + first.name[len("data-"):])
        says = f"{label}: holds an array of shape ({{h}}, {{w}}), but {first} is (16, {{h}}, {{w}})"
    r = probe(run_file(tmp_path, root, "hdf5" if fmt == "h5" else "npy"), tmp_path / "batches")
    h, w = y.shape
    assert r.returncode == 2, r.stderr
    assert says.format(h=h, w=w) + ": the labels must be (height, width) of the data" in r.stderr, r.stderr
    assert "stats.h5" not in r.stderr, r.stderr


def test_a_compression_filter_hdf5_lacks_is_named_not_called_damage(tmp_path, data):
    root = tmp_path / "lzf"
    shutil.copytree(data["h5", "float32"], root)
    target = validation_files(root, "h5")[1]
    with h5py.File(target, "r") as f:
        x, y = f["climate/data"][...], f["climate/labels_0"][...]
    target.unlink()
    with h5py.File(target, "w") as f:
        f.create_dataset("climate/data", data=x, compression="lzf")
        f["climate/labels_0"] = y
    r = probe(run_file(tmp_path, root, "hdf5"), tmp_path / "batches", "--split", "validation")
    assert r.returncode == 2, r.stderr
    assert f"{target}: dataset climate/data: compressed with filter 'lzf' (HDF5 filter 32000)" in r.stderr, r.stderr
    assert "h5repack -f NONE" in r.stderr and "damaged or truncated" not in r.stderr, r.stderr


def test_a_file_another_process_holds_locked_is_named_not_called_damage(tmp_path, data):
    import sys
    root = tmp_path / "lock"
    shutil.copytree(data["h5", "float32"], root)
    target = sorted((root / "train").glob("data-*.h5"))[0]
    # h5py opening a file for writing takes HDF5's exclusive lock on it until it closes the file.
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys; h = h5py.File(sys.argv[1], 'r+'); "
                               "print('open', flush=True); sys.stdin.read()", str(target)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        r = probe(run_file(tmp_path, root, "hdf5"), tmp_path / "batches")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"{target}: locked by another process" in r.stderr, r.stderr
    assert "HDF5_USE_FILE_LOCKING=FALSE" in r.stderr and "damaged" not in r.stderr, r.stderr


# ---- a dataset that is there but cannot be followed, and damaged metadata ------------------------

def data_unreadable(target, how):
    """Rewrites HDF5 sample `target` so that its climate/data link is there but leads to no dataset: a
    group, a soft link to itself or to nothing; or, "damaged", the climate group's object header overwritten."""
    with h5py.File(target, "r") as f:
        x, y = f["climate/data"][...], f["climate/labels_0"][...]
    target.unlink()
    with h5py.File(target, "w") as f:
        f["climate/labels_0"] = y
        if how == "group":
            f.create_group("climate/data")
        elif how == "loop":
            f["climate/data"] = h5py.SoftLink("/climate/data")
        elif how == "dangling":
            f["climate/data"] = h5py.SoftLink("/nowhere")
        else:
            f["climate/data"] = x
    if how == "damaged":
        with h5py.File(target, "r") as f:
            header = h5py.h5o.get_info(f["climate"].id).addr
        with open(target, "r+b") as f:
            f.seek(header)
            f.write(b"\xff" * 16)
        with pytest.raises(Exception):
            with h5py.File(target, "r") as f:
                f["climate/data"]


UNREADABLE = {
    "group": "dataset climate/data: is a group, not a dataset",
    "loop": "dataset climate/data: cannot open (HDF5: ",
    "dangling": "dataset climate/data: cannot open (HDF5: ",
    "damaged": "dataset climate/data: cannot look up climate/data in the file (damaged file?) (HDF5: ",
}


@pytest.mark.parametrize("how", list(UNREADABLE))
def test_a_dataset_there_but_unreadable_is_named_for_what_it_is_not_as_missing(tmp_path, data, how):
    """A sample whose climate/data cannot be followed to a dataset was "no dataset climate/data" to the
    reader and to deepcam-data stats: a user then looks for a naming or conversion slip, not a damaged file.
    The reader (it opens the first training file to learn the shape), stats and verify say the same now."""
    root = tmp_path / "set"
    shutil.copytree(data["h5", "float32"], root)
    bad = sorted((root / "train").glob("data-*.h5"))[0]
    data_unreadable(bad, how)
    says = f"{bad}: {UNREADABLE[how]}"
    r = probe(run_file(tmp_path, root, "hdf5"), tmp_path / "batches", "--split", "validation")
    assert r.returncode == 2 and says in r.stderr and "no dataset" not in r.stderr, r.stdout + r.stderr
    for command in (["stats", str(root)], ["verify", str(root)]):
        r = subprocess.run([str(DATA_TOOL), *command], capture_output=True, text=True, env=plugin_env(), timeout=300)
        assert r.returncode == 1 and says in r.stdout + r.stderr, (command, r.stdout + r.stderr)
        assert "no such dataset" not in r.stdout + r.stderr, (command, r.stdout + r.stderr)
