"""The benchmark scripts' arguments and records: a bad argument is one usage
error (exit 2, no traceback) naming it, before anything is measured, and what
a script writes says what it measured (the data set's real size, the real
command, each row's repeat count, whose load the load average was)."""

import argparse
import subprocess
import sys

import pytest
import torch

from helpers import BUILD_DIR, REPO_ROOT, synth

SCRIPTS = REPO_ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))
PROBE = BUILD_DIR / "tests" / "step_parts_probe"
STATE_DICT = REPO_ROOT.parent / "shared" / "testdata" / "reference_state_dict.txt"
TIMEOUT = 120


def run_script(name, *args):
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT)


@pytest.mark.parametrize("name, args, option", [
    ("bench_checkpoint.py", ["--label", "x", "--repeat", "0"], "--repeat"),
    ("bench_readers.py", ["--data", "{file}"], "--data"),
    ("bench_readers.py", ["--data", "{tmp}/rd", "--train", "2", "--width", "0", "--repeat", "1", "--no-cold"],
     "--width"),
    ("bench_ranks.py", ["--repeat", "1", "--epochs", "2", "--data", "{file}"], "--data"),
    ("bench_step_parts.py", ["--build", "{tmp}/nonexistent"], "--build"),
    ("bench_step_parts.py", ["--build", "{build}", "--repeats", "0"], "--repeats"),
    # Found only after the benchmark (a traceback, its figures lost), or by synth, or measured nothing.
    ("bench_readers.py", ["--data", "{tmp}/rd", "--json", "{tmp}/nodir/x.json"], "--json"),
    ("bench_readers.py", ["--data", "{tmp}/rd", "--validation", "0"], "--validation"),
    ("bench_readers.py", ["--data", "{tmp}/rd", "--only", ","], "--only"),
])
def test_a_bad_argument_is_one_usage_error_naming_it(tmp_path, name, args, option):
    """Each of these ended in a traceback (StatisticsError, FileExistsError, CalledProcessError hiding
    deepcam-data's own message, FileNotFoundError, the probe's segfault) with exit 1."""
    afile = tmp_path / "afile"
    afile.write_text("")
    args = [a.format(file=afile, tmp=tmp_path, build=BUILD_DIR) for a in args]
    r = run_script(name, *args, "--no-docs")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1], r.stderr
    assert option in errors[0], r.stderr
    assert not (tmp_path / "rd" / "h5").exists()


@pytest.mark.parametrize("repeats", ["0", "-3", "abc"])
def test_the_step_parts_probe_refuses_fewer_than_one_repeat(repeats):
    """0 repeats indexed an empty vector (a segfault)."""
    r = subprocess.run([str(PROBE), str(STATE_DICT), repeats], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode > 0, (r.returncode, r.stderr)
    assert r.stdout == "" and "REPEATS" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bench_step_parts_records_the_command_it_was_run_with(tmp_path):
    """The section named `.venv/bin/python scripts/bench_step_parts.py` whatever the options were."""
    docs = tmp_path / "benchmarks.md"
    r = run_script("bench_step_parts.py", "--repeats", "1", "--threads", "1", "--build", BUILD_DIR,
                   "--docs", docs)
    assert r.returncode == 0, r.stdout + r.stderr
    text = docs.read_text()
    assert (f"Command: `scripts/bench_step_parts.py --repeats 1 --threads 1 --build {BUILD_DIR} --docs {docs}`"
            in text), text
    assert "Medians of 1 runs" in text


def test_bench_ranks_reports_the_size_of_the_set_it_measured(tmp_path):
    """The report named --train and 96 x 144 even for a set made earlier with other sizes."""
    import bench_ranks
    data = synth(tmp_path / "data", train=3, validation=1, height=16, width=24)
    assert bench_ranks.describe_set(data) == (3, 16, 24)
    args = argparse.Namespace(train=64, batch=1, repeat=1, epochs=2, data=data)
    results = {1: [(0.1, 10.0, None)], 2: [(0.11, 18.0, 0.5)]}
    text = bench_ranks.report(args, results, *bench_ranks.describe_set(data))
    assert "at 16 x 24 pixels, 3 training samples" in text, text
    assert "96 x 144" not in text and "64 training" not in text


def test_bench_checkpoint_keeps_each_rows_repeat_count(tmp_path):
    """The header's `--repeat N` was the last run's, applied to the rows kept from earlier runs. A row now
    carries its own count; a row from before that column gets the count its old header named."""
    import bench_checkpoint
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\n{bench_checkpoint.SECTION}\n\n"
                    "Written by `scripts/bench_checkpoint.py --label LABEL --repeat 3` (last row ...).\n\n"
                    "| label | commit | no checkpoint | with checkpoint | added by the checkpoint | checkpoint size | "
                    "Python torch.save adds |\n|---|---|---:|---:|---:|---:|---:|\n"
                    "| before | aaaaaaa | 1470 | 2487 | 1017 | 647 | 1 |\n"
                    "| after | bbbbbbb | 1474 | 1481 | 8 | 647 | 1 |\n")
    assert bench_checkpoint.kept_rows(docs, "after") == ["| before | aaaaaaa | 3 | 1470 | 2487 | 1017 | 647 | 1 |"]
    new_docs = docs.read_text().replace("| label | commit |", "| label | commit | repeats |").replace(
        "| before | aaaaaaa |", "| before | aaaaaaa | 1 |").replace("| after | bbbbbbb |", "| after | bbbbbbb | 5 |")
    docs.write_text(new_docs)
    assert bench_checkpoint.kept_rows(docs, "before") == ["| after | bbbbbbb | 5 | 1474 | 1481 | 8 | 647 | 1 |"]


def test_bench_readers_says_whose_load_it_was(tmp_path):
    """The report called the load at the end "the benchmark's own" whatever it was; it is only when the
    1-minute load is at most the benchmark's threads."""
    import bench_readers
    args = argparse.Namespace(data=tmp_path, batch_size=2, threads=2, depth=4, repeat=1, prefetch_epochs=1)
    for load_end, own in ((0.9, True), (2.0, True), (3.5, False)):
        context = {"when": "now", "command": "scripts/bench_readers.py", "commit": "unknown", "samples": 1,
                   "shape": "16 x 24 x 16", "h5_bytes": 1, "npy_bytes": 1, "base_rss_mb": 1, "python": "Python",
                   "machine": ("cpu", 2, 2**30), "disk": "disk", "load": (0.5, 0.5, 0.5), "compilers": 0,
                   "load_end": (load_end, 1.0, 1.0), "compilers_end": 0}
        text = bench_readers.build_report(args, [], [], [], [], context)
        end = text[text.index(f"{load_end:.2f} at the end"):].split(";")[0]
        assert ("(the benchmark's own)" in end) == own, end
        assert ("the machine was busy with other work" in end) == (not own), end


def test_a_records_commit_is_its_own_never_that_of_a_checkout_around_it(tmp_path, monkeypatch):
    """The bundle named our HEAD as the reference's commit: its copy, made without .git inside our
    checkout, let git answer for the checkout around it."""
    import bench_common
    outer = tmp_path / "outer"
    (outer / "copy").mkdir(parents=True)
    git = ["git", "-C", str(outer), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert bench_common.commit(outer) == head[:7]  # a checkout's own
    assert bench_common.commit(outer / "copy") == "unknown"
    (outer / "copy" / "COMMIT").write_text("abc1234\n")
    assert bench_common.commit(outer / "copy") == "abc1234"
    # No git at all (a GPU machine's image may lack it): unknown, not a traceback.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert bench_common.commit(outer) == "unknown"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_bench_step_refuses_cuda_where_torch_sees_no_gpu(tmp_path):
    """It wrote its data set, started the reference loop and ended in torch's traceback ("Found no NVIDIA
    driver")."""
    ref = tmp_path / "ref"
    (ref / "deepcam/src/deepCam/architecture").mkdir(parents=True)
    (ref / "deepcam/src/deepCam/architecture/deeplab_xception.py").write_text("")
    r = run_script("bench_step.py", "--ref", ref, "--device", "cuda", "--no-docs")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("--device cuda: " + str(REPO_ROOT / ".venv" / "bin" / "python")
                                                      + "'s torch sees no CUDA GPU on this machine"), r.stderr


@pytest.mark.parametrize("name", ["bench_ranks.py", "bench_readers.py", "bench_step.py", "bench_step_parts.py"])
def test_help_prints_the_description_once_and_whole(name):
    # bench_step_parts cut it after its first line; the others printed its first paragraph twice.
    r = run_script(name, "--help")
    assert r.returncode == 0, r.stderr
    doc = (SCRIPTS / name).read_text().split('"""', 2)[1]
    first = doc.split("\n\n")[0].strip()
    assert r.stdout.count(first.splitlines()[0]) == 1, r.stdout
    assert doc.strip().splitlines()[-1].strip() in r.stdout, r.stdout
