"""Inputs deepcam-data must refuse as training does, naming the file and
the cause: a stats.h5 whose float32 normalisation overflows (verify, convert
and the readers share one rule), a convert whose output would land inside
its source, a sample declaring a shape too large to hold, incomplete sets
given to convert, a bad --set of read (exit 2, as deepcam-host), .npy
headers holding terminal control bytes, and labels far outside the classes
(printed exactly)."""

import shutil

import h5py
import numpy as np
import pytest

from helpers import run_data, write_run

H, W = 32, 48


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("data-tool-inputs")
    h5_set, npy_set = base / "h5", base / "npy"
    ok(run_data("synth", "--out", h5_set, "--train", 3, "--validation", 2, "--height", H, "--width", W,
                "--seed", 6, "--quiet"))
    ok(run_data("convert", h5_set, npy_set, "--quiet"))
    return {"hdf5": h5_set, "npy": npy_set}


def copy_of(root, tmp_path):
    out = tmp_path / root.name
    shutil.copytree(root, out)
    return out


def first(root, pattern):
    return sorted(root.glob(pattern))[0]


def error_line(proc, status, *fragments):
    """The one `deepcam-data: ` line of stderr holding every fragment."""
    assert proc.returncode == status, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines()
             if line.startswith("deepcam-data: ") and all(str(f) in line for f in fragments)]
    assert lines, f"no line with {fragments} in:\n{proc.stderr}"
    return lines[0]


def verify_line(proc, *fragments):
    """verify failed, and one line of its report holds every fragment."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if all(str(f) in line for f in fragments)]
    assert lines, f"no line with {fragments} in:\n{proc.stdout}"
    return lines[0]


def read_reader(tmp_path, root, reader):
    """deepcam-data read: the run's reader alone, set up as training sets it up, in batches of one, so
    that its epoch reads every training sample (one that ends in an incomplete batch would drop some)."""
    where = tmp_path / f"run-{reader}"
    where.mkdir()
    run = write_run(where / "run.toml", root, where / "out", run={"train_batch_size": 1},
                    reader={"name": reader, "threads": 2})
    return run_data("read", run)


# ---------------------------------------------------------------------------
# 1. stats.h5: verify, convert and training's readers apply one rule.

def set_stats(stats, dtype, minval, maxval):
    """Channel 0 of stats.h5 given `minval` and `maxval`, both datasets stored as `dtype`."""
    with h5py.File(stats, "r+") as f:
        for name, value in (("minval", minval), ("maxval", maxval)):
            values = f[f"climate/{name}"][...].astype(np.float64)
            values[0] = value
            del f[f"climate/{name}"]
            f.create_dataset(f"climate/{name}", data=values.astype(dtype))


@pytest.mark.parametrize("dtype, minval, maxval, cause", [
    # 1 / 1e-40 = 1e40 in float32 arithmetic: infinity.
    ("f4", 0.0, 1e-40, "the scale 1/(maxval - minval) overflows float32"),
    # The smallest float32 above 0: its reciprocal is far beyond float32.
    ("f4", 0.0, 1e-45, "the scale 1/(maxval - minval) overflows float32"),
    # Exact in float64, then rounded to float32: infinity.
    ("f8", 0.0, 1e-40, "the scale 1/(maxval - minval) overflows float32"),
    # The shift is float32(minval): -inf.
    ("f8", -1e308, 1e308, "climate/minval -1e+308 is beyond float32's range"),
    ("f8", -1e39, 0.0, "climate/minval -1e+39 is beyond float32's range"),
    # max - min = inf in float32 arithmetic: the scale would be 0, every value a 0.
    ("f4", -3e38, 3e38, "maxval - minval overflows float32"),
    # 1e-308 is a float64, but 0 as a float32.
    ("f8", 0.0, 1e308, "the scale 1/(maxval - minval) = 1e-308 underflows float32 to 0"),
])
def test_stats_training_refuses_are_refused_by_verify_and_convert_with_the_cause(sets, tmp_path, dtype, minval,
                                                                                 maxval, cause):
    root = copy_of(sets["hdf5"], tmp_path)
    stats = root / "stats.h5"
    set_stats(stats, dtype, minval, maxval)
    training = error_line(read_reader(tmp_path, root, "hdf5"), 1, f"{stats}: channel 0", cause)
    assert "both must be finite" not in training
    line = verify_line(run_data("verify", root), f"{stats}: channel 0", cause)
    assert training[len("deepcam-data: "):] in line  # the same words, from the same function
    proc = run_data("convert", root, tmp_path / "npy")
    error_line(proc, 1, f"{stats}: channel 0", cause)
    assert not (tmp_path / "npy").exists()


def test_float32_stats_that_normalise_pass_verify_and_training(sets, tmp_path):
    root = copy_of(sets["hdf5"], tmp_path)
    set_stats(root / "stats.h5", "f4", 0.0, 1e-30)  # scale 1e30: within float32
    # The training values of channel 0 within that range, as verify wants them (synth's lie in [0.3, 74)).
    for path in (root / "train").glob("data-*.h5"):
        with h5py.File(path, "r+") as f:
            f["climate/data"][:, :, 0] *= np.float32(1e-32)
    ok(run_data("verify", root))
    ok(read_reader(tmp_path, root, "hdf5"))


# ---------------------------------------------------------------------------
# 2. convert's output inside its source.

def test_convert_into_a_folder_of_its_source_is_refused(sets, tmp_path):
    src = copy_of(sets["hdf5"], tmp_path)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    for dst in (src / "train", src / "npy"):
        proc = run_data("convert", src, dst)
        line = error_line(proc, 2, f"{dst}", f"{src}", "inside")
        assert "see deepcam-data --help" in line
        assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    ok(run_data("verify", src))


def test_convert_with_its_source_inside_an_output_split_is_refused(sets, tmp_path):
    # DST/train would receive the pairs and DST/stats.h5 the copy: SRC
    # would gain files beside its own.
    dst = tmp_path / "dst"
    src = dst / "train"
    shutil.copytree(sets["hdf5"], src)
    proc = run_data("convert", src, dst)
    error_line(proc, 2, f"{src}", f"{dst}", "inside")
    assert sorted(dst.rglob("*.npy")) == [] and not (dst / "stats.h5").exists()


def test_convert_with_an_output_split_linked_into_the_source_is_refused(sets, tmp_path):
    # DST/train, a link to SRC/validation: the train pairs were written among the source's validation samples.
    src = copy_of(sets["hdf5"], tmp_path)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "train").symlink_to(src / "validation")
    proc = run_data("convert", src, dst)
    line = error_line(proc, 2, f"the output {dst / 'train'} is {src / 'validation'}, inside the source {src}")
    assert "see deepcam-data --help" in line
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    assert list(dst.iterdir()) == [dst / "train"]
    # A split folder linked outside the source receives the pairs, as before.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (dst / "train").unlink()
    (dst / "train").symlink_to(elsewhere)
    ok(run_data("convert", src, dst, "--quiet"))
    assert len(list(elsewhere.glob("data-*.npy"))) == 3
    ok(run_data("verify", src))


def test_convert_in_place_is_still_allowed(sets, tmp_path):
    src = copy_of(sets["hdf5"], tmp_path)
    ok(run_data("convert", src, src, "--quiet"))
    assert len(list(src.glob("train/data-*.npy"))) == 3


# ---------------------------------------------------------------------------
# 3. A sample declaring a shape it cannot hold in memory.

def huge_sample(path):
    with h5py.File(path, "w") as f:
        f.create_dataset("climate/data", shape=(H, W, 2 ** 40), dtype="f4", chunks=(1, 1, 1024))
        f.create_dataset("climate/labels_0", data=np.zeros((H, W), np.int32))


def test_a_sample_declaring_a_huge_shape_is_named_not_out_of_memory(sets, tmp_path):
    root = copy_of(sets["hdf5"], tmp_path)
    sample = first(root, "train/data-*.h5")
    huge_sample(sample)
    proc = run_data("verify", root)
    line = verify_line(proc, f"{sample}: dataset climate/data", "(32, 48, 1099511627776)")
    assert "out of memory" not in proc.stdout + proc.stderr
    assert "memory" in line
    assert "1 problem in " in proc.stdout.splitlines()[-1]  # the report is whole
    proc = run_data("convert", root, tmp_path / "npy")
    error_line(proc, 1, f"{sample}: dataset climate/data", "(32, 48, 1099511627776)")
    assert "deepcam-data: out of memory" not in proc.stderr
    assert "1 of 5 samples failed" in proc.stderr


# ---------------------------------------------------------------------------
# 4. Sets training refuses, given to convert (and stats).

def no_train(root):
    shutil.rmtree(root / "train")
    return root / "train", "no such directory"


def no_validation(root):
    shutil.rmtree(root / "validation")
    return root / "validation", "no such directory"


def empty_train(root):
    for f in (root / "train").iterdir():
        f.unlink()
    return root / "train", "no samples"


def validation_a_file(root):
    shutil.rmtree(root / "validation")
    (root / "validation").write_text("not a folder")
    return root / "validation", "a file, not a directory"


def empty_stats(root):
    (root / "stats.h5").write_bytes(b"")
    return root / "stats.h5", ""


def nan_stats(root):
    with h5py.File(root / "stats.h5", "r+") as f:
        values = f["climate/maxval"][...]
        values[5] = np.nan
        f["climate/maxval"][...] = values
    return root / "stats.h5", "channel 5"


@pytest.mark.parametrize("damage", [no_train, no_validation, empty_train, validation_a_file, empty_stats, nan_stats])
def test_convert_refuses_a_set_training_refuses_before_writing(sets, tmp_path, damage):
    root = copy_of(sets["hdf5"], tmp_path)
    path, words = damage(root)
    dst = tmp_path / "npy"
    proc = run_data("convert", root, dst)
    error_line(proc, 1, f"{path}", words)
    assert not dst.exists()


def test_a_sample_of_zero_height_is_refused_by_convert_and_stats(sets, tmp_path):
    root = copy_of(sets["hdf5"], tmp_path)
    sample = first(root, "train/data-*.h5")
    with h5py.File(sample, "w") as f:
        f.create_dataset("climate/data", data=np.zeros((0, W, 16), np.float32))
        f.create_dataset("climate/labels_0", data=np.zeros((0, W), np.int32))
    dst = tmp_path / "npy"
    proc = run_data("convert", root, dst)
    error_line(proc, 1, f"{sample}: dataset climate/data", "(0, 48, 16)")
    assert not (dst / "stats.h5").exists()
    verify_line(run_data("verify", root), f"{sample}: dataset climate/data", "(0, 48, 16)")
    before = (root / "stats.h5").read_bytes()
    error_line(run_data("stats", root), 1, f"{sample}: dataset climate/data", "(0, 48, 16)")
    assert (root / "stats.h5").read_bytes() == before


# ---------------------------------------------------------------------------
# 5. A bad --set of read: a bad configuration, exit 2 as deepcam-host.

def test_read_with_a_bad_override_exits_2(sets, tmp_path):
    run = write_run(tmp_path / "run.toml", sets["hdf5"], tmp_path / "out")
    proc = run_data("read", run, "--set", "foo.bar=1")
    error_line(proc, 2, "foo")
    assert proc.stdout == ""


# ---------------------------------------------------------------------------
# 6. .npy headers with terminal control bytes are echoed escaped.

def npy_with_header(path, header):
    header = header + " " * (-(10 + len(header) + 1) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin-1") +
                     bytes(H * W * 16 * 4))


@pytest.mark.parametrize("header", [
    "{'descr': '<f4', 'fortran_order': False, 'shape': (32, 48, 16), '\x1b[2J': 1, }",  # an unknown key
    "{'descr': '<f4', 'fortran_order': False, 'shape': (32, 48, 16), \x1b[2J }",        # not a dict literal
    "{'descr': '\x1b[2J', 'fortran_order': False, 'shape': (32, 48, 16), }",             # a dtype
])
def test_npy_header_bytes_are_echoed_escaped(sets, tmp_path, header):
    root = copy_of(sets["npy"], tmp_path)
    data = first(root, "train/data-*.npy")
    npy_with_header(data, header)
    proc = run_data("verify", root)
    line = verify_line(proc, f"{data}: ", "\\x1b[2J")
    assert "\x1b" not in proc.stdout + proc.stderr, line


# ---------------------------------------------------------------------------
# 7. A label far outside the classes is printed exactly.

def test_training_names_a_huge_label_exactly(sets, tmp_path):
    root = copy_of(sets["hdf5"], tmp_path)
    sample = first(root, "train/data-*.h5")
    with h5py.File(sample, "r+") as f:
        labels = f["climate/labels_0"][...].astype(np.int64)
        labels[1, 2] = 4294967297
        del f["climate/labels_0"]
        f.create_dataset("climate/labels_0", data=labels)
    line = error_line(read_reader(tmp_path, root, "hdf5"), 1, sample, "holds 4294967297;")
    assert "e+09" not in line

    npy_root = copy_of(sets["npy"], tmp_path)
    label = first(npy_root, "train/label-*.npy")
    labels = np.load(label).astype(np.uint64)
    labels[1, 2] = 2 ** 64 - 1  # beyond int64 too
    np.save(label, labels)
    line = error_line(read_reader(tmp_path, npy_root, "npy"), 1, label, "holds 18446744073709551615;")
    assert "e+19" not in line


# ---------------------------------------------------------------------------
# 7. The command line: an option given twice, a flag given a value (exit 2).

@pytest.mark.parametrize("args, option", [
    (["synth", "--out", "a", "--out", "b"], "synth: --out"),
    (["synth", "--out", "a", "--train", "1", "--train=3"], "synth: --train"),
    (["synth", "--out", "a", "--quiet", "--quiet"], "synth: --quiet"),
    (["stats", "s", "--progress-seconds", "5", "--progress-seconds", "1"], "stats: --progress-seconds"),
    (["convert", "s", "d", "--threads", "2", "--threads", "3"], "convert: --threads"),
    (["convert", "s", "d", "--verify", "--verify"], "convert: --verify"),
    (["verify", "s", "--progress-seconds", "5", "--progress-seconds=1"], "verify: --progress-seconds"),
    (["read", "run.toml", "--split", "train", "--split", "validation"], "read: --split"),
    (["read", "run.toml", "--epochs", "3", "--epochs", "1"], "read: --epochs"),
    (["read", "run.toml", "--consume-ms", "1", "--consume-ms", "2"], "read: --consume-ms"),
    (["read", "run.toml", "--with-validation", "--with-validation"], "read: --with-validation"),
    (["package", "r", "--system", "s", "--system", "t", "--out", "p"], "package: --system"),
])
def test_an_option_given_twice_is_a_bad_command_line(tmp_path, args, option):
    # Each but package took the last one silently (synth --out a --out b wrote b).
    proc = run_data(*args, timeout=60, cwd=tmp_path)
    line = error_line(proc, 2, f"{option} is given twice")
    assert "see deepcam-data --help" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, flag", [
    (["verify", "s", "--quiet=1"], "verify: --quiet"),
    (["synth", "--out", "a", "--quiet=yes"], "synth: --quiet"),
    (["convert", "s", "d", "--verify=1"], "convert: --verify"),
    (["read", "run.toml", "--with-validation=1"], "read: --with-validation"),
    (["read", "run.toml", "--consume-matched=true"], "read: --consume-matched"),
])
def test_a_flag_given_a_value_is_refused_as_such(tmp_path, args, flag):
    # verify --quiet=1 said "unknown option --quiet".
    proc = run_data(*args, timeout=60, cwd=tmp_path)
    error_line(proc, 2, f"{flag} takes no value")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, says", [
    (["synth", "--out", "a", "--bogus"], "synth: unknown option --bogus"),
    (["read", "run.toml", "--bogus"], "read: unknown option --bogus"),
    (["package", "r1", "--system", "s", "--out", "p", "--bogus"], "package: unknown option --bogus"),
    (["package", "r1", "--bogus=1"], "package: unknown option --bogus"),
    (["synth", "--out"], "--out needs a value"),
    (["read", "run.toml", "--epochs"], "--epochs needs a value"),
    (["package", "r1", "--system"], "--system needs a value"),
])
def test_an_unknown_option_given_last_is_called_unknown(tmp_path, args, says):
    # synth, read and package said "--bogus needs a value".
    proc = run_data(*args, timeout=60, cwd=tmp_path)
    error_line(proc, 2, says)
    if "unknown" in says:
        assert "needs a value" not in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_set_of_read_is_still_repeatable(sets, tmp_path):
    run = write_run(tmp_path / "run.toml", sets["hdf5"], tmp_path / "out")
    proc = ok(run_data("read", run, "--set", "run.train_batch_size=1", "--set", "reader.threads=1"))
    assert '"batch_size": 1' in proc.stdout, proc.stdout
