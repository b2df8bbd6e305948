"""deepcam-data convert (SPEC 1.5), checked with numpy and h5py: every output
loads with numpy.load bit for bit equal to h5py's read of the source, labels
keep their stored dtype; ranks split the work; a second run skips valid pairs
(mtime unchanged), redoes broken ones and compares the values of those with
another time than their source's; --verify repairs a file whose bytes
changed but not its size; bad input (a damaged source, a full disk, an
unreadable file, missing stats.h5) gives one clear line naming the file, a
non-zero exit and no partial file."""

import os
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import write_run

H, W = 32, 48


def run(exe, *args, env=None, preexec_fn=None):
    full_env = dict(os.environ)
    for k in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "SLURM_PROCID",
              "SLURM_NTASKS"):
        full_env.pop(k, None)
    full_env.update(env or {})
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=full_env, preexec_fn=preexec_fn)


def ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def sources(root):
    return sorted(Path(root).glob("*/data-*.h5"))


def targets(src, dst, source):
    split, name = source.parent.name, source.name
    stem = name[len("data-"):-len(".h5")]
    return Path(dst) / split / f"data-{stem}.npy", Path(dst) / split / f"label-{stem}.npy"


def assert_converted(src, dst, only=None):
    """Each converted pair equals its source bit for bit, with the labels' dtype kept."""
    checked = 0
    for source in sources(src):
        if only is not None and source not in only:
            continue
        data_path, label_path = targets(src, dst, source)
        with h5py.File(source, "r") as f:
            data = f["climate/data"][...].astype(np.float32)
            labels = f["climate/labels_0"][...]
        npy_data, npy_labels = np.load(data_path), np.load(label_path)
        assert npy_data.dtype == np.float32 and npy_data.shape == data.shape
        assert np.array_equal(npy_data.view(np.uint32), data.view(np.uint32)), data_path
        assert npy_labels.dtype == labels.dtype.newbyteorder("<"), (label_path, npy_labels.dtype, labels.dtype)
        assert npy_labels.shape == labels.shape
        assert np.array_equal(npy_labels, labels), label_path
        checked += 1
    return checked


def in_mount_namespace(script, what):
    """Runs `script` with sh in a mount namespace of its own, for `what`; the test is skipped where unshare
    --mount is refused."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip(f"unshare --mount is refused here: the test needs a mount namespace for {what}")
    return subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=300)


def hidden(root):
    return [p for p in Path(root).rglob(".*")]


def one_line_error(proc, *fragments):
    assert proc.returncode != 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if all(str(f) in line for f in fragments)]
    assert lines, proc.stderr
    assert all(line.startswith("deepcam-data: ") for line in lines), proc.stderr


@pytest.fixture(scope="module")
def source(deepcam_data, tmp_path_factory):
    """A synthetic set, plus samples stored the other ways HDF5 allows:
    uint8 and big-endian int16 labels, big-endian float32 data."""
    root = tmp_path_factory.mktemp("convert") / "src"
    ok(run(deepcam_data, "synth", "--out", root, "--train", 6, "--validation", 3, "--height", H, "--width", W,
           "--seed", 11))
    first = sources(root)[0]
    with h5py.File(first, "r") as f:
        data, labels = f["climate/data"][...], f["climate/labels_0"][...]
    for name, data_dtype, label_dtype in [("data-2107-01-01-00-1.h5", ">f4", "u1"),
                                          ("data-2107-01-01-03-1.h5", "<f4", ">i2")]:
        with h5py.File(root / "train" / name, "w") as f:
            f.create_dataset("climate/data", data=data.astype(data_dtype))
            f.create_dataset("climate/labels_0", data=labels.astype(label_dtype))
    return root


def fresh_copy(source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source, src)
    return src


def test_outputs_equal_the_sources_bit_for_bit(deepcam_data, source, tmp_path):
    dst = tmp_path / "dst"
    proc = ok(run(deepcam_data, "convert", source, dst, "--threads", 3))
    assert assert_converted(source, dst) == 11
    assert "11 converted" in proc.stderr and " on 3 threads: " in proc.stderr
    # The labels' stored dtypes: int32 from synth, and the two written above.
    dtypes = {np.load(p).dtype for p in dst.glob("*/label-*.npy")}
    assert dtypes == {np.dtype("int32"), np.dtype("uint8"), np.dtype("int16")}
    assert (dst / "stats.h5").read_bytes() == (source / "stats.h5").read_bytes()
    assert sorted(p.name for p in dst.iterdir()) == ["stats.h5", "train", "validation"]
    assert not hidden(dst)
    # The header is the one numpy.save writes for the same array.
    sample = next(dst.glob("train/data-*.npy"))
    again = tmp_path / "numpy.npy"
    np.save(again, np.load(sample))
    assert again.read_bytes() == sample.read_bytes()


def test_the_default_threads_are_the_cores_the_process_may_run_on(deepcam_data, source, tmp_path):
    # Slurm binds each task to its share of a node's cores; the default was the node's count
    # (hardware_concurrency), so 16 tasks of a 16-core node each ran 16 threads.
    one = os.sched_getaffinity(0)
    proc = ok(run(deepcam_data, "convert", source, tmp_path / "one",
                  preexec_fn=lambda: os.sched_setaffinity(0, {min(one)})))
    assert " on 1 thread: 11 converted" in proc.stderr, proc.stderr
    proc = ok(run(deepcam_data, "convert", source, tmp_path / "all"))
    n = min(len(one), 11, 16)
    assert f" on {n} thread{'s' if n > 1 else ''}: 11 converted" in proc.stderr, proc.stderr


def test_pairs_in_the_destination_without_a_source_are_refused(deepcam_data, source, tmp_path):
    dst = tmp_path / "dst"
    (dst / "train").mkdir(parents=True)
    np.save(dst / "train" / "data-1999-01-01-00-1.npy", np.zeros((H, W, 16), np.float32))
    np.save(dst / "train" / "label-1999-01-01-00-1.npy", np.zeros((H, W), np.int32))
    proc = run(deepcam_data, "convert", source, dst)
    assert proc.returncode == 1, proc.stderr
    assert (f"{dst / 'train' / 'data-1999-01-01-00-1.npy'}: no {source / 'train' / 'data-1999-01-01-00-1.h5'} "
            "for it") in proc.stderr, proc.stderr
    assert not list(dst.glob("*/data-2*.npy"))  # refused before converting anything


def test_an_empty_destination_is_refused_not_taken_as_the_current_folder(deepcam_data, source, tmp_path):
    proc = subprocess.run([str(deepcam_data), "convert", str(source), ""], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 2 and f"convert: argument 2 (after {source}) is empty" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_rerun_removes_the_temporaries_of_a_killed_writer_and_keeps_a_live_ones(deepcam_data, source, tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    dst = tmp_path / "dst"
    (dst / "train").mkdir(parents=True)
    stale = [dst / "train" / f".data-x.npy.tmp{gone.pid}-3", dst / f".stats.h5.tmp{gone.pid}"]
    live = dst / "train" / f".label-y.npy.tmp{os.getpid()}-0"  # its writer (this test) runs
    for f in stale + [live]:
        f.write_bytes(b"half a sample")
    proc = ok(run(deepcam_data, "convert", source, dst))
    assert not any(f.exists() for f in stale) and live.exists()
    for f in stale:
        assert f"removed {f}, left by an interrupted earlier run (process {gone.pid} is gone)" in proc.stderr


def test_an_h5_sample_not_named_data_x_is_a_problem_not_left_out(deepcam_data, source, tmp_path):
    # The hdf5 reader reads it; leaving it out would make the numpy form another set.
    src = tmp_path / "src"
    shutil.copytree(source, src)
    extra = src / "train" / "extra.h5"
    shutil.copy(sources(src)[0], extra)
    dst = tmp_path / "dst"
    proc = run(deepcam_data, "convert", src, dst)
    assert proc.returncode == 1 and f"{extra}: a sample to the hdf5 reader" in proc.stderr, proc.stderr
    assert "rename it" in proc.stderr
    assert assert_converted(src, dst) == len(sources(src))  # the others are converted
    assert not (dst / "stats.h5").exists()


def test_no_rank_copies_stats_while_another_ranks_sample_failed(deepcam_data, source, tmp_path):
    broken = tmp_path / "src"
    shutil.copytree(source, broken)
    victim = sources(broken)[1]  # rank 1's of 2
    victim.write_bytes(victim.read_bytes()[:5000])
    dst = tmp_path / "dst"
    proc = run(deepcam_data, "convert", broken, dst, env={"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})
    assert proc.returncode == 1 and str(victim) in proc.stderr, proc.stderr
    # Rank 0 finishes its share after that: the set is still not whole.
    ok(run(deepcam_data, "convert", broken, dst, env={"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}))
    assert not (dst / "stats.h5").exists()
    verify = run(deepcam_data, "verify", dst)
    assert verify.returncode == 1 and "stats.h5" in verify.stdout, verify.stdout + verify.stderr


def test_ranks_split_the_samples(deepcam_data, source, tmp_path):
    dst = tmp_path / "dst"
    all_sources = sources(source)
    ok(run(deepcam_data, "convert", source, dst, env={"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "3"}))
    done = {p.name for p in dst.glob("*/data-*.npy")}
    mine = all_sources[1::3]
    assert done == {targets(source, dst, s)[0].name for s in mine}
    assert not (dst / "stats.h5").exists()  # the set is not whole yet
    proc = ok(run(deepcam_data, "convert", source, dst, env={"PMI_RANK": "0", "PMI_SIZE": "3"}))
    assert "rank 0 of 3" in proc.stderr and "the rank that finishes last copies stats.h5" in proc.stderr
    assert not (dst / "stats.h5").exists()  # rank 2's samples are missing
    proc = ok(run(deepcam_data, "convert", source, dst,
                  env={"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_STEP_NUM_TASKS": "3"}))
    assert "rank 2 of 3" in proc.stderr and "not all there yet" not in proc.stderr
    assert assert_converted(source, dst) == len(all_sources)
    assert (dst / "stats.h5").exists()  # the last rank to finish copied it

    proc = run(deepcam_data, "convert", source, tmp_path / "x", env={"SLURM_PROCID": "3", "SLURM_NTASKS": "3"})
    one_line_error(proc, "SLURM_PROCID=3", "SLURM_NTASKS=3")
    proc = run(deepcam_data, "convert", source, tmp_path / "x", env={"PMI_RANK": "1"})
    one_line_error(proc, "PMI_RANK", "PMI_SIZE")
    # sbatch running convert without srun: the script's own process converted a third and stopped.
    proc = run(deepcam_data, "convert", source, tmp_path / "y", env={"SLURM_PROCID": "0", "SLURM_NTASKS": "3"})
    one_line_error(proc, "SLURM_PROCID=0", "no SLURM_STEP_NUM_TASKS", "batch script's own")
    assert not (tmp_path / "y").exists()
    # An salloc shell: "SLURM_NTASKS is set but SLURM_PROCID is not", as if Slurm had set one of two; of one
    # task it is no launch at all.
    proc = run(deepcam_data, "convert", source, tmp_path / "z", env={"SLURM_NTASKS": "2"})
    one_line_error(proc, "SLURM_NTASKS=2", "no SLURM_PROCID or SLURM_STEP_NUM_TASKS", "allocation's shell (salloc)")
    assert not (tmp_path / "z").exists()
    ok(run(deepcam_data, "convert", source, tmp_path / "one", env={"SLURM_NTASKS": "1"}))
    assert assert_converted(source, tmp_path / "one") == len(all_sources)


def test_an_output_holding_another_data_set_is_refused_before_anything_is_written(deepcam_data, source, tmp_path):
    """A swapped or mistyped DST: the pairs were written beside another set's HDF5 files under their names, and
    that set's stats.h5 replaced by the source's, gone for good; verify then found no problem."""
    other = tmp_path / "other"
    ok(run(deepcam_data, "synth", "--out", other, "--train", 2, "--validation", 1, "--height", 16, "--width", 24,
           "--seed", 5))
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    proc = run(deepcam_data, "convert", source, other)
    one_line_error(proc, f"{other}/train/", ".h5: an HDF5 sample in the output, which is not the source",
                   f"{other} holds a data set of its own")
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before

    # A numpy set of another source: its stats.h5 would be replaced.
    npy = tmp_path / "other-npy"
    ok(run(deepcam_data, "convert", other, npy))
    before = {p: p.read_bytes() for p in npy.rglob("*") if p.is_file()}
    proc = run(deepcam_data, "convert", source, npy)
    one_line_error(proc, f"{npy}/stats.h5: differs from {source}/stats.h5: the output holds another data set's "
                         "statistics", "add --verify to compare every pair")
    assert {p: p.read_bytes() for p in npy.rglob("*") if p.is_file()} == before
    # Its own output goes on as before.
    ok(run(deepcam_data, "convert", other, npy))
    # A stats.h5 that is no file is not opened: a FIFO blocked the open for good.
    fifo_out = tmp_path / "fifo-out"
    fifo_out.mkdir()
    os.mkfifo(fifo_out / "stats.h5")
    proc = run(deepcam_data, "convert", source, fifo_out)
    one_line_error(proc, f"{fifo_out}/stats.h5: not a file")
    # The source's stats computed again after a convert: --verify compares every pair with the source and
    # rewrites what differs, stats.h5 too.
    mine = tmp_path / "mine"
    ok(run(deepcam_data, "convert", source, mine))
    shutil.copyfile(other / "stats.h5", mine / "stats.h5")
    one_line_error(run(deepcam_data, "convert", source, mine), f"{mine}/stats.h5: differs from")
    ok(run(deepcam_data, "convert", source, mine, "--verify"))
    assert (mine / "stats.h5").read_bytes() == (source / "stats.h5").read_bytes()
    assert assert_converted(source, mine) == len(sources(source))
    # A numpy set given as the source is named so.
    proc = run(deepcam_data, "convert", npy, tmp_path / "again")
    one_line_error(proc, f"{npy}: holds numpy samples (data-*.npy) and no HDF5 ones: it is a numpy set already")
    assert not (tmp_path / "again").exists()


def test_a_sample_with_control_characters_in_its_name_is_refused_shown_escaped(deepcam_data, source, tmp_path):
    # Its "repaired" line printed the name as it was: an ESC in it drove the terminal. Such a name is
    # refused where the split is listed (as by training and verify), shown escaped; the others convert.
    src = tmp_path / "src"
    shutil.copytree(source, src)
    odd = src / "train" / "data-2106-01-01-00-\x1b[7m-\n1.h5"
    sources(src)[0].rename(odd)
    dst = tmp_path / "dst"
    proc = run(deepcam_data, "convert", src, dst)
    assert "\x1b" not in proc.stdout + proc.stderr, repr(proc.stderr)
    escaped = str(odd).replace("\x1b", "\\x1b").replace("\n", "\\x0a")
    one_line_error(proc, f"{escaped}: the sample file's name holds the control character 0x1b at byte 20; rename it")
    assert f"1 of {len(sources(src))} samples failed" in proc.stderr, proc.stderr
    assert len(list(dst.glob("*/data-*.npy"))) == len(sources(src)) - 1


def test_resume_skips_valid_pairs_and_redoes_broken_ones(deepcam_data, source, tmp_path):
    dst = tmp_path / "dst"
    ok(run(deepcam_data, "convert", source, dst))
    all_sources = sources(source)
    truncated_data, _ = targets(source, dst, all_sources[0])
    _, deleted_label = targets(source, dst, all_sources[1])
    wrong_shape, _ = targets(source, dst, all_sources[2])
    mtimes = {p: p.stat().st_mtime_ns for p in dst.glob("*/*.npy")}
    os.truncate(truncated_data, truncated_data.stat().st_size // 2)
    deleted_label.unlink()
    np.save(wrong_shape, np.zeros((H, W, 15), np.float32))
    changed = {truncated_data, deleted_label, wrong_shape}

    proc = ok(run(deepcam_data, "convert", source, dst))
    assert "2 repaired" in proc.stderr and "1 converted" in proc.stderr and "8 already valid" in proc.stderr
    assert f"repaired {truncated_data.parent.name}/{truncated_data.name}" in proc.stderr
    assert "truncated" in proc.stderr and "has shape (32, 48, 15), the source (32, 48, 16)" in proc.stderr
    for p, mtime in mtimes.items():
        if p not in changed:
            assert p.stat().st_mtime_ns == mtime, f"{p} was rewritten"
    assert assert_converted(source, dst) == len(all_sources)
    assert not hidden(dst)


def test_pairs_not_written_from_this_source_are_converted_again_not_kept(deepcam_data, source, tmp_path):
    """Another set's pairs under the same names, its stats.h5 removed, were counted as already valid: the
    numpy set then trained on the other set's samples with this set's statistics. A pair is kept on its
    header alone only with its source's modification time, which convert gives it; others are compared."""
    other = tmp_path / "other"
    ok(run(deepcam_data, "synth", "--out", other, "--train", 6, "--validation", 3, "--height", H, "--width", W,
           "--seed", 12))
    shared = [s for s in sources(source) if (other / s.parent.name / s.name).exists()]
    assert len(shared) == 9  # synth names samples by their place, whatever the seed
    dst = tmp_path / "dst"
    ok(run(deepcam_data, "convert", other, dst))
    (dst / "stats.h5").unlink()
    proc = ok(run(deepcam_data, "convert", source, dst))
    assert "2 converted, 9 repaired, 0 already valid" in proc.stderr, proc.stderr
    assert proc.stderr.count(".npy values differ from the source") >= 9, proc.stderr
    assert assert_converted(source, dst) == len(sources(source))
    assert (dst / "stats.h5").read_bytes() == (source / "stats.h5").read_bytes()
    # Each file of a pair has its source's time, so a third run keeps them all by their headers.
    for s in sources(source):
        for path in targets(source, dst, s):
            assert path.stat().st_mtime_ns == s.stat().st_mtime_ns, path
    assert f"0 converted, 0 repaired, {len(sources(source))} already valid" in ok(
        run(deepcam_data, "convert", source, dst)).stderr

    # Over ranks: one rank's look saw the other's foreign pairs as files and copied stats.h5 before that rank
    # had compared them, so the set looked whole with the other set's samples in it.
    third = tmp_path / "third"  # every sample of it has a pair of `other` under its name
    ok(run(deepcam_data, "synth", "--out", third, "--train", 6, "--validation", 3, "--height", H, "--width", W,
           "--seed", 13))
    ranked = tmp_path / "ranked"
    ok(run(deepcam_data, "convert", other, ranked))
    (ranked / "stats.h5").unlink()
    proc = ok(run(deepcam_data, "convert", third, ranked, env={"OMPI_COMM_WORLD_RANK": "0",
                                                              "OMPI_COMM_WORLD_SIZE": "2"}))
    assert "the rank that finishes last copies stats.h5" in proc.stderr, proc.stderr
    assert not (ranked / "stats.h5").exists()
    proc = ok(run(deepcam_data, "convert", third, ranked, env={"OMPI_COMM_WORLD_RANK": "1",
                                                              "OMPI_COMM_WORLD_SIZE": "2"}))
    assert "not all there yet" not in proc.stderr and (ranked / "stats.h5").exists(), proc.stderr
    assert assert_converted(third, ranked) == len(sources(third))

    # A source written again since it was converted: its pair is redone.
    src = fresh_copy(source, tmp_path)
    again = tmp_path / "again"
    ok(run(deepcam_data, "convert", src, again))
    rewritten = sources(src)[2]
    with h5py.File(rewritten, "r+") as f:
        f["climate/data"][0, 0, 0] += 1.0
    proc = ok(run(deepcam_data, "convert", src, again))
    assert f"0 converted, 1 repaired, {len(sources(src)) - 1} already valid" in proc.stderr, proc.stderr
    assert assert_converted(src, again, only=[rewritten]) == 1

    # A pair copied without its time (cp -r, touch) has the source's values: kept, and given its time.
    touched = targets(src, again, sources(src)[0])
    for path in touched:
        os.utime(path, ns=(0, 0))
    proc = ok(run(deepcam_data, "convert", src, again))
    assert f"0 converted, 0 repaired, {len(sources(src))} already valid" in proc.stderr, proc.stderr
    for path in touched:
        assert path.stat().st_mtime_ns == sources(src)[0].stat().st_mtime_ns, path

    # --verify decides by value, and gives equal pairs their source's time too.
    os.utime(touched[0], ns=(0, 0))
    proc = ok(run(deepcam_data, "convert", src, again, "--verify"))
    assert f"{len(sources(src))} already valid (checked value by value)" in proc.stderr, proc.stderr
    assert touched[0].stat().st_mtime_ns == sources(src)[0].stat().st_mtime_ns


def test_a_pair_that_cannot_be_given_its_time_is_kept_and_said_once(deepcam_data, source, tmp_path):
    """An in-place --verify on a read-only mount wrote nothing before the times came, and must still pass:
    a pair without its time only has its values compared the next time."""
    src = fresh_copy(source, tmp_path)
    ok(run(deepcam_data, "convert", src, src))
    for path in src.glob("*/*.npy"):
        os.utime(path, ns=(0, 0))
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    proc = in_mount_namespace(f'mount --bind "{src}" "{read_only}" && mount -o remount,bind,ro "{read_only}" && '
                              f'"{deepcam_data}" convert "{read_only}" "{read_only}" --verify', "a read-only mount")
    assert proc.returncode == 0, proc.stderr
    n = len(sources(src))
    assert f"0 converted, 0 repaired, {n} already valid (checked value by value)" in proc.stderr, proc.stderr
    assert re.search(rf"convert: {n} pairs could not be given their source's modification time \(first: "
                     rf"{re.escape(str(read_only))}/\S+\.npy: Read-only file system\); a later convert compares "
                     r"their values with the source instead", proc.stderr), proc.stderr


def test_verify_repairs_a_corrupted_file_of_the_same_size(deepcam_data, source, tmp_path):
    dst = tmp_path / "dst"
    ok(run(deepcam_data, "convert", source, dst))
    all_sources = sources(source)
    corrupted, _ = targets(source, dst, all_sources[3])
    _, corrupted_label = targets(source, dst, all_sources[4])
    for path in (corrupted, corrupted_label):
        before = path.stat()
        raw = bytearray(path.read_bytes())
        raw[-5] ^= 0x40
        path.write_bytes(bytes(raw))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # a bit flipped on the disk, not a write
    mtimes = {p: p.stat().st_mtime_ns for p in dst.glob("*/*.npy")}

    # Without --verify only headers, sizes and times are checked: nothing is redone.
    proc = ok(run(deepcam_data, "convert", source, dst))
    assert "11 already valid" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in dst.glob("*/*.npy")} == mtimes

    proc = ok(run(deepcam_data, "convert", source, dst, "--verify"))
    assert "2 repaired" in proc.stderr and "9 already valid (checked value by value)" in proc.stderr
    assert f"{corrupted.name} values differ from the source" in proc.stderr
    assert assert_converted(source, dst) == len(all_sources)
    for p, mtime in mtimes.items():
        if p not in (corrupted, corrupted_label):
            assert p.stat().st_mtime_ns == mtime


def test_a_damaged_source_is_named_and_the_others_converted(deepcam_data, source, tmp_path):
    src = fresh_copy(source, tmp_path)
    all_sources = sources(src)
    damaged = all_sources[2]
    damaged.write_bytes(damaged.read_bytes()[:3000])
    with h5py.File(all_sources[5], "r+") as f:  # labels of a type .npy labels cannot keep
        del f["climate/labels_0"]
        f.create_dataset("climate/labels_0", data=np.full((H, W), b"x", dtype="S3"))
    dst = tmp_path / "dst"
    proc = run(deepcam_data, "convert", src, dst)
    one_line_error(proc, str(damaged))
    one_line_error(proc, str(all_sources[5]), "climate/labels_0", "strings")
    assert "2 of 11 samples failed" in proc.stderr.splitlines()[-1]
    for bad in (damaged, all_sources[5]):
        assert not any(p.exists() for p in targets(src, dst, bad))
    good = [s for s in all_sources if s not in (damaged, all_sources[5])]
    assert assert_converted(src, dst, only=good) == 9
    assert not (dst / "stats.h5").exists()  # a partial set does not look complete
    assert not hidden(dst)


def test_values_training_refuses_are_named_and_not_converted(deepcam_data, source, tmp_path):
    """A label outside the classes (here a big-endian int16 file's) and a NaN in the data: each sample is
    named with the place of the first bad value, as verify names it, and left out of the numpy form."""
    src = fresh_copy(source, tmp_path)
    all_sources = sources(src)
    bad_label = src / "train" / "data-2107-01-01-03-1.h5"
    with h5py.File(bad_label, "r+") as f:
        labels = f["climate/labels_0"][...]
        labels[3, 5] = 7
        labels[4, 0] = -1
        f["climate/labels_0"][...] = labels
    nan_data = all_sources[1]
    with h5py.File(nan_data, "r+") as f:
        data = f["climate/data"][...]
        data[2, 9, 4] = np.nan
        f["climate/data"][...] = data
    dst = tmp_path / "dst"
    proc = run(deepcam_data, "convert", src, dst)
    one_line_error(proc, f"{bad_label}: dataset climate/labels_0: value 7 at (row 3, column 5) and 1 more labels "
                         "outside them; the classes are 0, 1 and 2; not converted")
    one_line_error(proc, f"{nan_data}: dataset climate/data: NaN at (row 2, column 9, channel 4); data must be "
                         "finite; not converted")
    assert "2 of 11 samples failed" in proc.stderr.splitlines()[-1]
    for bad in (bad_label, nan_data):
        assert not any(p.exists() for p in targets(src, dst, bad))
    assert assert_converted(src, dst, only=[s for s in all_sources if s not in (bad_label, nan_data)]) == 9
    assert not (dst / "stats.h5").exists()


def test_a_sample_of_another_shape_than_the_sets_is_named_and_not_converted(deepcam_data, source, tmp_path):
    """Fewer rows, and fewer channels: converted without a word (status 0), into a numpy set that verify and
    the readers then refused."""
    src = fresh_copy(source, tmp_path)
    all_sources = sources(src)
    first = src / "train" / sorted(p.name for p in (src / "train").glob("*.h5"))[0]
    with h5py.File(first, "r") as f:
        data, labels = f["climate/data"][...], f["climate/labels_0"][...]
    rows, channels = all_sources[-1], src / "train" / "data-2107-01-01-00-1.h5"
    for path, d, l in ((rows, data[: H // 2], labels[: H // 2]), (channels, data[..., :8], labels)):
        path.unlink()
        with h5py.File(path, "w") as f:
            f.create_dataset("climate/data", data=d)
            f.create_dataset("climate/labels_0", data=l)
    dst = tmp_path / "dst"
    proc = run(deepcam_data, "convert", src, dst)
    for path, shape in ((rows, f"({H // 2}, {W}, 16)"), (channels, f"({H}, {W}, 8)")):
        one_line_error(proc, f"{path}: dataset climate/data has shape {shape}, and the set's first training sample "
                             f"{first} has ({H}, {W}, 16): the readers take that shape for every sample; not "
                             "converted")
        assert not any(p.exists() for p in targets(src, dst, path))
    assert "2 of 11 samples failed" in proc.stderr.splitlines()[-1]
    assert not (dst / "stats.h5").exists()


def test_converting_in_place_writes_the_pairs_beside_the_hdf5_files(deepcam_data, source, tmp_path):
    """DST may be SRC: each reader reads its own form of a split folder, and verify checks both."""
    src = tmp_path / "src"  # synth's samples alone: the fixture's odd dtypes are verify's problems
    ok(run(deepcam_data, "synth", "--out", src, "--train", 4, "--validation", 2, "--height", H, "--width", W))
    ok(run(deepcam_data, "convert", src, src))
    assert assert_converted(src, src) == 6
    assert len(sources(src)) == 6
    proc = ok(run(deepcam_data, "verify", src))
    assert ("train: 4 h5 samples and 4 npy samples, validation: 2 h5 samples and 2 npy samples" in proc.stdout
            and "no problems" in proc.stdout), proc.stdout + proc.stderr


def test_an_in_place_convert_that_did_not_finish_is_named_until_a_rerun_finishes_it(deepcam_data, tmp_path):
    """Stopped part way, it left the source's stats.h5 beside the pairs it had written: verify passed the set,
    and the npy reader read those pairs, a smaller set, without a word."""
    src = tmp_path / "src"
    ok(run(deepcam_data, "synth", "--out", src, "--train", 4, "--validation", 2, "--height", H, "--width", W))
    ok(run(deepcam_data, "convert", src, src))
    # As a convert stopped before its last training pair.
    missing = sorted((src / "train").glob("data-*.h5"))[-1]
    x = missing.stem[len("data-"):]
    for name in (f"data-{x}.npy", f"label-{x}.npy"):
        (src / "train" / name).unlink()
    says = (f"{missing}: no numpy pair data-{x}.npy beside it, though the folder holds the numpy form of 3 "
            "samples: a convert in place (DST = SRC) that did not finish")
    proc = run(deepcam_data, "verify", src)
    assert proc.returncode == 1 and says in proc.stdout, proc.stdout + proc.stderr
    npy_run = write_run(tmp_path / "npy.toml", src, tmp_path / "out", reader={"name": "npy"})
    proc = run(deepcam_data, "read", npy_run)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr
    # The hdf5 reader reads its own form, whole.
    ok(run(deepcam_data, "read", write_run(tmp_path / "h5.toml", src, tmp_path / "out")))
    ok(run(deepcam_data, "convert", src, src))
    assert assert_converted(src, src) == 6
    ok(run(deepcam_data, "verify", src))
    ok(run(deepcam_data, "read", npy_run))


def test_a_full_disk_stops_the_run_and_leaves_no_partial_file(deepcam_data, source, tmp_path):
    # RLIMIT_FSIZE stands in for a full disk: the tool ignores SIGXFSZ, and
    # write() fails with EFBIG as it fails with ENOSPC. A label file (6 KB)
    # fits, a data file (98 KB) does not.
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    dst = tmp_path / "dst"
    proc = run(deepcam_data, "convert", source, dst, "--threads", 2, preexec_fn=limit_file_size)
    one_line_error(proc, str(dst), "cannot write", "File too large")
    # The first failed write stops the run: the samples after it are not attempted.
    assert re.search(r"and \d+ were not attempted after a failed write", proc.stderr.splitlines()[-1]), proc.stderr
    assert not list(dst.glob("*/data-*.npy"))
    assert not hidden(dst)
    for label in dst.glob("*/label-*.npy"):  # whatever was written is complete
        np.load(label)
    assert not (dst / "stats.h5").exists()

    # With room, the same command finishes the job.
    ok(run(deepcam_data, "convert", source, dst))
    assert assert_converted(source, dst) == 11


def test_a_label_file_that_does_not_fit_takes_its_data_file_with_it(deepcam_data, source, tmp_path):
    """A disk that holds a sample's data file (98 KB) and then no label file: the data file stayed, a half pair
    that verify and the npy reader refuse, while the message said complete pairs are kept."""
    small = tmp_path / "small"
    small.mkdir()
    proc = in_mount_namespace(f'mount -t tmpfs -o size=100k tmpfs "{small}" && "{deepcam_data}" convert "{source}" '
                              f'"{small}/dst" --threads 1; status=$?; find "{small}" -type f; exit $status',
                              "a small tmpfs")
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"/label-(\S+)\.npy: cannot write: No space left on device .*\(data-\1\.npy, written before "
                     r"it, is removed: a pair is kept whole or not at all\)", proc.stderr), proc.stderr
    assert proc.stdout == "", proc.stdout  # no file left on the small disk


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_source_is_named(deepcam_data, source, tmp_path):
    src = fresh_copy(source, tmp_path)
    locked = sources(src)[0]
    locked.chmod(0)
    try:
        proc = run(deepcam_data, "convert", src, tmp_path / "dst")
    finally:
        locked.chmod(0o644)
    one_line_error(proc, str(locked), "Permission denied")


def test_an_unreadable_source_is_named_under_root(deepcam_data, source, tmp_path):
    # Root ignores file modes; a directory in place of a sample file is
    # unreadable for anyone.
    src = fresh_copy(source, tmp_path)
    bad = src / "train" / "data-2200-01-01-00-1.h5"
    bad.mkdir()
    proc = run(deepcam_data, "convert", src, tmp_path / "dst")
    one_line_error(proc, str(bad), "is a directory")


def test_bad_command_lines_and_missing_inputs(deepcam_data, source, tmp_path):
    proc = run(deepcam_data, "convert", source)
    assert proc.returncode == 2 and "two arguments" in proc.stderr
    proc = run(deepcam_data, "convert", source, tmp_path / "d", "--threads", 0)
    assert proc.returncode == 2 and "--threads" in proc.stderr
    proc = run(deepcam_data, "convert", source, tmp_path / "d", "--fast")
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr
    proc = run(deepcam_data, "convert", tmp_path / "nothing", tmp_path / "d")
    one_line_error(proc, str(tmp_path / "nothing"), "no such directory")

    src = fresh_copy(source, tmp_path)
    (src / "stats.h5").unlink()
    proc = run(deepcam_data, "convert", src, tmp_path / "d")
    one_line_error(proc, str(src / "stats.h5"), "deepcam-data stats")
    assert not (tmp_path / "d").exists()


def test_a_source_or_stats_of_another_kind_is_called_what_it_is(deepcam_data, source, tmp_path):
    # A file given as SRC was "no such directory", a folder named stats.h5 "no such file".
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = run(deepcam_data, "convert", afile, tmp_path / "d")
    one_line_error(proc, f"{afile}: a file, not a directory; convert reads a data set root")
    src = fresh_copy(source, tmp_path)
    (src / "stats.h5").unlink()
    (src / "stats.h5").mkdir()
    proc = run(deepcam_data, "convert", src, tmp_path / "d")
    one_line_error(proc, f"{src / 'stats.h5'}: is a directory, not a file", "deepcam-data stats")
    assert not (tmp_path / "d").exists()


def test_convert_stopped_by_sigterm_leaves_whole_pairs_and_no_temporary(deepcam_data, tmp_path):
    # It used to die at once, leaving the temporaries of the files it was writing.
    src, dst = tmp_path / "src", tmp_path / "dst"
    # One validation sample: convert refuses a set with an empty split, as training does.
    ok(run(deepcam_data, "synth", "--out", src, "--train", 1500, "--validation", 1, "--height", 16, "--width", 16))
    proc = subprocess.Popen([str(deepcam_data), "convert", str(src), str(dst), "--threads", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list((dst / "train").glob("label-*.npy"))) < 2:
        assert proc.poll() is None, "convert finished before the signal: give it more samples"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, err)
    assert "deepcam-data: stopped by SIGTERM: the files finished before it are in place, no temporary is left" \
        in err, err
    assert hidden(dst) == []
    done = sorted(dst.glob("train/data-*.npy"))
    assert len(done) < 1500 and len(list(dst.glob("train/label-*.npy"))) == len(done)
    converted = {src / "train" / f"data-{p.name[len('data-'):-len('.npy')]}.h5" for p in done}
    assert assert_converted(src, dst, only=converted) == len(done)
    # Run again, it finishes the set.
    ok(run(deepcam_data, "convert", src, dst))
    assert assert_converted(src, dst) == 1501


def test_a_finite_value_that_overflows_once_normalised_is_not_converted(deepcam_data, source, tmp_path):
    """As verify: training refuses the sample (its value normalises to infinity with stats.h5's range),
    so convert leaves it out and says why; convert wrote it."""
    src = fresh_copy(source, tmp_path)
    target = sources(src)[0]
    with h5py.File(src / "stats.h5", "r") as s:
        lo, hi = s["climate/minval"][...], s["climate/maxval"][...]
    channel = int(np.argmin(hi - lo))  # the largest scale
    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(1 / (hi[channel] - lo[channel])) * (np.float32(3e38) - np.float32(lo[channel])))
    with h5py.File(target, "r+") as f:
        data = f["climate/data"][...]
        data[0, 1, channel] = 3e38
        f["climate/data"][...] = data
    dst = tmp_path / "dst"
    proc = run(deepcam_data, "convert", src, dst)
    one_line_error(proc, f"{target}: dataset climate/data: 3e+38 at (row 0, column 1, channel {channel}) normalises "
                         "to inf with stats.h5's range; data must be finite once normalised; not converted")
    assert not any(p.exists() for p in targets(src, dst, target))
