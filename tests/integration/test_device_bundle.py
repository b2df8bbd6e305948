"""scripts/device_bundle.sh and scripts/gpu_check.sh: the bundle holds what
a bare CUDA image lacks and nothing of LibTorch's, CUDA's or glibc's, and
the check script runs from it, reporting each part and failing when a part
fails. Rehearsed here with DEVICE=cpu (the GPU parts run on a GPU machine)."""

import json
import os
import subprocess

import pytest
import torch

from helpers import REPO_ROOT


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("device") / "bundle"
    r = subprocess.run([str(REPO_ROOT / "scripts" / "device_bundle.sh"), str(path)], capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return path


def test_the_bundle_holds_the_programs_and_the_libraries_a_bare_image_lacks(bundle):
    for program in ("core/deepcam-host", "core/deepcam-data", "core/libdeepcam_core.so",
                    "plugins/optimizers/lamb/libdeepcam_optimizer_lamb.so", "tests/data_parallel_probe",
                    "plugins/readers/prefetch/test_reader_prefetch"):
        assert (bundle / "build" / program).is_file(), program
    assert not list((bundle / "build").rglob("*.o")), "object files do not travel"
    libraries = {p.name for p in (bundle / "lib").iterdir()}
    assert {"libhdf5_serial.so.103", "libtomlplusplus.so.3", "libsz.so.2", "libcudart.so.13"} <= libraries
    for name in libraries:
        assert not name.startswith(("libtorch", "libc10", "libc.", "libm.", "libstdc++", "libcudnn", "libnccl",
                                    "libdeepcam")), name
    assert [p.name for p in (bundle / "wheels").iterdir()] == ["mlperf_logging-4.1.68-py3-none-any.whl"]
    assert (bundle / "testdata" / "lr_schedules.json").is_file()
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < 56 * 2**20  # it travels with the working tree, 64 MiB in all


def gpu_check(tmp_path, bundle, **env):
    out = tmp_path / "out"
    r = subprocess.run([str(REPO_ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=1800,
                       env=dict(os.environ, BUNDLE=str(bundle), OUT=str(out), WORK=str(tmp_path / "work"), **env))
    return r, json.loads((out / "summary.json").read_text()), out


def test_the_check_runs_from_the_bundle_and_reports_each_part(tmp_path, bundle):
    r, summary, out = gpu_check(tmp_path, bundle, DEVICE="cpu", PARTS="env,train")
    assert r.returncode == 0, r.stdout + r.stderr
    assert summary["device"] == "cpu" and set(summary["parts"]) == {"env", "train"}
    assert all(p["status"] == "pass" for p in summary["parts"].values()), summary
    assert "gpu_check: env          pass" in r.stdout and "gpu_check: train        pass" in r.stdout
    # The training part ran the bundle's programs and checked their log.
    assert "checks that failed: eval_accuracy" in (out / "train.log").read_text()
    assert (out / "train-mlperf.log").read_text().rstrip().splitlines()[-1].startswith(":::MLLOG")
    assert f"{bundle}/build/plugins/optimizers/lamb" in (out / "env.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure it provokes is the want of a GPU")
def test_a_failing_part_is_reported_and_fails_the_check(tmp_path, bundle):
    # No GPU here: DEVICE=cuda's env part fails, saying why.
    r, summary, out = gpu_check(tmp_path, bundle, DEVICE="cuda", PARTS="env")
    assert r.returncode != 0
    assert summary["parts"]["env"]["status"] == "fail"
    assert "gpu_check: env          FAIL" in r.stdout and "torch sees no CUDA GPU" in r.stdout


def test_a_deadline_stops_the_part_it_falls_in_and_skips_the_rest(tmp_path, bundle):
    # The unit executables take over a minute on this machine; 40 s (the set-up and env part take
    # some 10) stop them.
    r, summary, out = gpu_check(tmp_path, bundle, DEVICE="cpu", PARTS="env,unit,train", DEADLINE="40")
    assert r.returncode != 0
    parts = summary["parts"]
    assert parts["env"]["status"] == "pass"
    assert parts["unit"]["status"] == "timed out" and parts["unit"]["seconds"] < 40
    assert parts["train"] == {"status": "not run"}
    assert summary["seconds"] < 45
    assert "gpu_check: train not run: DEADLINE=40 s" in r.stdout
    assert "SIGTERM" in (out / "unit.log").read_text()  # the executable was stopped, not waited for
