"""scripts/device_bundle.sh and scripts/gpu_check.sh: the bundle holds what
a bare CUDA image lacks and nothing of LibTorch's, CUDA's or glibc's, and
the check script runs from it, reporting each part and failing when a part
fails; with the bundle's run paths cut to what a GPU machine would find, it
links what is missing from the bundle; its unit tests run from a checkout at
another path with this one's build/, .venv/ and ../shared hidden, and the
unit part's filter keeps every CUDA case and the normalisation kernels' case.
Rehearsed here with DEVICE=cpu (the GPU parts run on a GPU machine)."""

import fnmatch
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO_ROOT


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    # A stand-in for the reference's checkout (REF; no test here runs the benchmark part): a copy made
    # without git, which names its commit in a file COMMIT.
    ref = tmp_path_factory.mktemp("ref")
    for name in ("architecture/deeplab_xception.py", "utils/losses.py"):
        (ref / "deepcam/src/deepCam" / name).parent.mkdir(parents=True, exist_ok=True)
        (ref / "deepcam/src/deepCam" / name).write_text("# stand-in\n")
    (ref / "COMMIT").write_text("abc1234\n")
    path = tmp_path_factory.mktemp("device") / "bundle"
    r = subprocess.run([str(REPO_ROOT / "scripts" / "device_bundle.sh"), str(path)], capture_output=True,
                       text=True, timeout=1800, env=dict(os.environ, REF=str(ref)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return path


def test_a_dir_that_is_not_an_earlier_bundle_is_refused_and_kept(tmp_path):
    # device_bundle.sh DIR ran rm -rf DIR on whatever DIR was.
    (tmp_path / "notes.txt").write_text("keep me")
    r = subprocess.run([str(REPO_ROOT / "scripts" / "device_bundle.sh"), str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"device_bundle: {tmp_path} is not an earlier bundle (no MANIFEST) and not empty" in r.stderr, r.stderr
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert "setup:" not in r.stdout + r.stderr  # refused before any set-up or build


@pytest.mark.parametrize("env, says", [
    ({"PARTS": "evn"}, "gpu_check: PARTS=evn: no part 'evn'; the parts are env, unit, train, integration, bench"),
    ({"DEADLINE": "5m"}, "gpu_check: DEADLINE=5m is not a whole number of seconds"),
])
def test_gpu_check_refuses_parts_and_deadlines_that_would_run_nothing(tmp_path, env, says):
    # A mistyped part ran nothing and passed ("parts": {}, status 0); DEADLINE=5m did the same.
    r = subprocess.run([str(REPO_ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, BUNDLE=str(tmp_path), OUT=str(tmp_path / "out"), **env))
    assert r.returncode == 2 and says in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


def test_the_bundle_holds_the_programs_and_the_libraries_a_bare_image_lacks(bundle):
    for program in ("core/deepcam-host", "core/deepcam-data", "core/libdeepcam_core.so",
                    "plugins/optimizers/lamb/libdeepcam_optimizer_lamb.so", "tests/data_parallel_probe",
                    "plugins/readers/prefetch/test_reader_prefetch"):
        assert (bundle / "build" / program).is_file(), program
    assert not list((bundle / "build").rglob("*.o")), "object files do not travel"
    libraries = {p.name for p in (bundle / "lib").iterdir()}
    assert {"libhdf5_serial.so.103", "libtomlplusplus.so.3", "libsz.so.2", "libcudart.so.13",
            "libtcmalloc_minimal.so.4"} <= libraries
    for name in libraries:
        assert not name.startswith(("libtorch", "libc10", "libc.", "libm.", "libstdc++", "libcudnn", "libnccl",
                                    "libdeepcam")), name
    assert [p.name for p in (bundle / "wheels").iterdir()] == ["mlperf_logging-4.1.68-py3-none-any.whl"]
    assert (bundle / "testdata" / "lr_schedules.json").is_file()
    # The reference's files and its own commit (the bundle named ours).
    assert (bundle / "ref/deepcam/src/deepCam/utils/losses.py").is_file()
    assert (bundle / "ref" / "COMMIT").read_text() == "abc1234\n"
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < 56 * 2**20  # it travels with the working tree, 64 MiB in all


def gpu_check(tmp_path, bundle, **env):
    out = tmp_path / "out"
    r = subprocess.run([str(REPO_ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=1800,
                       env=dict(os.environ, BUNDLE=str(bundle), OUT=str(out), WORK=str(tmp_path / "work"), **env))
    return r, json.loads((out / "summary.json").read_text()), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure it provokes is the want of a GPU")
def test_a_failing_part_is_reported_and_fails_the_check(tmp_path, bundle):
    # No GPU here: DEVICE=cuda's env part fails, saying why.
    r, summary, out = gpu_check(tmp_path, bundle, DEVICE="cuda", PARTS="env")
    assert r.returncode != 0
    assert summary["parts"]["env"]["status"] == "fail"
    assert "gpu_check: env          FAIL" in r.stdout and "torch sees no CUDA GPU" in r.stdout


SLEEPER = """#!/bin/bash
trap 'echo "test_sleeper: stopped by SIGTERM"; exit 143' TERM
echo "test_sleeper: started"
sleep 600 &
wait $!
"""


@pytest.mark.alone
def test_a_deadline_stops_the_part_it_falls_in_and_skips_the_rest(tmp_path, bundle):
    # A copy of the bundle whose first unit executable would run for ten minutes: the deadline falls
    # in it, whatever this machine's speed. The set-up and env part take some 5 s, 10 under load, and
    # the script starts no part with less than 15 s left.
    slow = tmp_path / "bundle"
    shutil.copytree(bundle, slow, symlinks=True)
    sleeper = slow / "build" / "aaa" / "test_sleeper"
    sleeper.parent.mkdir()
    sleeper.write_text(SLEEPER)
    sleeper.chmod(0o755)
    r, summary, out = gpu_check(tmp_path, slow, DEVICE="cpu", PARTS="env,unit,train", DEADLINE="30")
    assert r.returncode != 0
    parts = summary["parts"]
    assert parts["env"]["status"] == "pass"
    assert parts["unit"]["status"] == "timed out" and parts["unit"]["seconds"] < 30
    assert parts["train"] == {"status": "not run"}
    assert summary["seconds"] < 35
    assert "gpu_check: train not run: DEADLINE=30 s" in r.stdout
    # The executable was stopped with its part, not left running.
    assert "test_sleeper: stopped by SIGTERM" in (out / "unit.log").read_text()
    assert processes_running(slow / "build") == []


def processes_running(folder, wait_s=2.0):
    """The command lines of the processes that run a program in `folder`, once those that are
    ending (signalled, not yet reaped) have had `wait_s` to go."""
    prefix = f"{folder}/".encode()
    deadline = time.monotonic() + wait_s
    while True:
        running = []
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z" and any(a.startswith(prefix) for a in argv):
                running.append(b" ".join(argv).decode(errors="replace"))
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.2)


def keep_only_origin_run_paths(elf):
    """Cuts the run path of an ELF file to its $ORIGIN entries, in place (the string ends early; the
    bytes after it become NUL), as if the directories it names on this machine (LibTorch in .venv,
    /usr/local/cuda, HDF5's) did not exist: the GPU machine's view of the bundle."""
    dynamic = subprocess.run(["readelf", "-d", str(elf)], capture_output=True, text=True).stdout
    found = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]", dynamic)
    if not found:
        return
    old = found.group(1).encode()
    new = b":".join(p for p in old.split(b":") if p.startswith(b"$ORIGIN"))
    data = elf.read_bytes()
    assert data.count(old + b"\0") == 1, elf
    elf.write_bytes(data.replace(old + b"\0", new + b"\0" * (len(old) - len(new) + 1)))


def shared_library(path, source, *needed):
    """Compiles a one-function shared library, linked against `needed` (paths; each needed by its
    name, as it has one), with no run path."""
    c = path.with_suffix(".c")
    c.write_text(source)
    subprocess.run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{path.name}", "-o", str(path), str(c),
                    *map(str, needed)], check=True, capture_output=True)
    c.unlink()
    return path


def test_the_check_runs_from_the_bundle_with_its_run_paths_cut_and_reports_each_part(tmp_path, bundle):
    bare = tmp_path / "bare"
    shutil.copytree(bundle, bare, symlinks=True)
    for f in (bare / "build").rglob("*"):
        if f.is_file() and f.read_bytes()[:4] == b"\x7fELF":
            keep_only_origin_run_paths(f)
    missing = subprocess.run(["ldd", str(bare / "build/core/deepcam-host")], capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"]}).stdout
    assert "libtorch_cpu.so => not found" in missing
    # HDF5 and the CUDA run-time are found on this machine's own paths whatever the run paths say, so a
    # library found nowhere but in the bundle is made for the check: the build needs one that needs
    # another (found only once the first is linked).
    inner = shared_library(bare / "lib" / "libdeepcam_inner_test.so", "int inner(void) { return 7; }\n")
    outer = shared_library(bare / "lib" / "libdeepcam_outer_test.so",
                           "int inner(void);\nint outer(void) { return inner(); }\n", inner)
    shared_library(bare / "build" / "tests" / "libdeepcam_needs_outer.so",
                   "int outer(void);\nint twice(void) { return 2 * outer(); }\n", outer)
    r, summary, out = gpu_check(tmp_path, bare, DEVICE="cpu", PARTS="env,train")
    assert r.returncode == 0, r.stdout + r.stderr
    assert summary["device"] == "cpu" and set(summary["parts"]) == {"env", "train"}
    assert all(p["status"] == "pass" for p in summary["parts"].values()), summary
    assert "gpu_check: env          pass" in r.stdout and "gpu_check: train        pass" in r.stdout
    env_log = (out / "env.log").read_text()
    taken = env_log.split("libraries taken from the bundle:")[1].splitlines()[0].split()
    assert sorted(taken) == ["libdeepcam_inner_test.so", "libdeepcam_outer_test.so"]
    assert "not found anywhere" not in env_log
    assert f"{bare}/build/plugins/optimizers/lamb" in env_log
    # The CPU, and whether the kernels' AVX-512 path can run on it, as /proc/cpuinfo says.
    cpuinfo = Path("/proc/cpuinfo").read_text()
    avx512 = "yes" if re.search(r"^flags\s*:.*\bavx512f\b", cpuinfo, re.M) else "no"
    assert re.search(rf"^CPU: .+, \d+ cores, AVX-512: {avx512}$", env_log, re.M), env_log
    # The training ran the bundle's programs, with LibTorch from the Python's torch, and checked their log.
    assert "checks that failed: eval_accuracy" in (out / "train.log").read_text()
    assert (out / "train-mlperf.log").read_text().rstrip().splitlines()[-1].startswith(":::MLLOG")


# One case of each kind that reads a place outside the test (tests/unit/test_paths.hpp): the Python
# and a script of the source tree (adam_reference.py; make_npy_cases.py with deepcam-data), the
# build tree's deepcam-data (the prefetch reader's, as its CUDA case uses it) and plugins with the
# source tree's test.toml, and the test vectors.
PATH_CASES = ["AdamW matches torch.optim.AdamW*", "every dtype*", "the GPU's normalisation run on the CPU*",
              "every plugin folder builds*", "Multistep reproduces*"]

# Run in a mount namespace of its own: the checkout is seen at COPY, the Python's venv at VENV, and
# this checkout's path, its build/ and .venv/ there, and ../shared, are empty: the GPU machine's view.
HIDDEN = """set -e
mount --bind "$REPO" "$COPY"
mount --bind "$REPO/.venv" "$VENV"
for d in "$REPO" "$SHARED" "$COPY/build" "$COPY/.venv"; do [ ! -d "$d" ] || mount -t tmpfs none "$d"; done
[ ! -e "$REPO/build" ] && [ -x "$VENV/bin/python" ]
exec "$COPY/scripts/gpu_check.sh"
"""


def test_the_unit_tests_run_from_a_checkout_elsewhere_with_this_ones_paths_hidden(tmp_path, bundle):
    if subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True).returncode != 0:
        # A sandbox without user namespaces (some CI runners): nothing here can hide /work/main.
        pytest.skip("unshare --mount --map-root-user is refused here: the check needs a mount namespace")
    copy, venv, out = tmp_path / "checkout", tmp_path / "torch-venv", tmp_path / "out"
    copy.mkdir()
    venv.mkdir()
    env = dict(os.environ, REPO=str(REPO_ROOT), COPY=str(copy), VENV=str(venv),
               SHARED=str((REPO_ROOT / ".." / "shared").resolve()), BUNDLE=str(bundle), OUT=str(out),
               WORK=str(tmp_path / "work"), PYTHON=str(venv / "bin" / "python"), DEVICE="cpu", PARTS="unit",
               UNIT_CASES=",".join(PATH_CASES))
    r = subprocess.run(["unshare", "--mount", "--map-root-user", "bash", "-c", HIDDEN], capture_output=True,
                       text=True, timeout=600, env=env)
    unit_log = (out / "unit.log").read_text() if (out / "unit.log").exists() else ""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:] + unit_log[-6000:]
    # Each case ran (one per executable), none failed.
    ran = [int(n) for n in re.findall(r"test cases: *(\d+) \| *\d+ passed \| *0 failed", unit_log)]
    assert sum(ran) == len(PATH_CASES), unit_log


# The marks of a test case that uses the GPU.
CUDA_MARKS = re.compile(r'kCUDA|hasCUDA|no_gpu\(\)|is_cuda\(\)|device = "cuda"')


def test_the_unit_parts_filter_keeps_every_case_that_uses_the_gpu_and_the_kernels_case():
    # gpu_check.sh's unit part runs, by default, the cases its UNIT_CASES default matches (doctest's -tc:
    # comma-separated wildcards, case ignored): every case that uses the GPU, and the normalisation
    # kernels' case, whose AVX-512 path CI's CPU cannot run.
    script = (REPO_ROOT / "scripts" / "gpu_check.sh").read_text()
    filters = re.search(r"^unit_cases=\$\{UNIT_CASES:-([^}]*)\}$", script, re.M).group(1).lower().split(",")
    kept = lambda name: any(fnmatch.fnmatchcase(name.lower(), f) for f in filters)
    sources = [*(REPO_ROOT / "plugins").rglob("test_*.cpp"), *(REPO_ROOT / "tests" / "unit").glob("test_*.cpp")]
    cuda_cases, kernel_cases = [], []
    for source in sources:
        parts = re.split(r'^TEST_CASE\("((?:[^"\\]|\\.)*)"', source.read_text(), flags=re.M)
        for name, body in zip(parts[1::2], parts[2::2]):
            if CUDA_MARKS.search(body):
                assert kept(name), f"{source.relative_to(REPO_ROOT)}: {name!r} uses the GPU"
                cuda_cases.append(name)
            # A case named *CUDA* that uses no GPU (a table's size against CUDA's limit) is not the kernels'.
            elif kept(name) and "cuda" not in name.lower():
                kernel_cases.append(name)
    assert len(cuda_cases) >= 5, cuda_cases  # Adam's, LAMB's two, the prefetch reader's two
    assert kernel_cases == ["normalise_sample and normalise_sample_hwc equal scale * (x - shift) bit for bit on "
                            "every path"], kernel_cases
