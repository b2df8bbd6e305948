"""deepcam-host --benchmark STEPS: timed steps on a synthetic batch, one JSON
line, no files written."""

import json
import signal
import subprocess
import time

import pytest

from helpers import HOST, plugin_env, run_host, synth, write_run


def test_benchmark_prints_one_json_line_and_writes_nothing(tmp_path):
    data = synth(tmp_path / "data", train=2, validation=1)
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={"train_batch_size": 3, "threads": 1})
    r = run_host(run, "--benchmark", 4, "--set", "run.precision=amp_bf16", "--set", "run.memory_format=channels_last")
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["steps"] == 4 and line["local_batch"] == 3 and line["ranks"] == 1
    assert line["precision"] == "amp_bf16" and line["memory_format"] == "channels_last"
    assert line["sample_shape"] == [16, 64, 96]
    assert 0 < line["step_ms_p50"] <= line["step_ms_p90"]
    assert abs(line["samples_per_s"] - 3 * 1000 / line["step_ms_p50"]) < 0.5 * line["samples_per_s"]
    assert line["peak_memory_mb"] > 50
    assert not out.exists()


def test_cudnn_benchmark_set_on_the_cpu_is_said_to_do_nothing(tmp_path):
    # It was applied on CUDA only, and set on a CPU run it was dropped without a word.
    data = synth(tmp_path / "data", train=2, validation=1, height=32, width=48)
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"threads": 1})
    r = run_host(run, "--benchmark", 1, "--set", "run.cudnn_benchmark=false")
    assert r.returncode == 0, r.stderr
    assert ("deepcam-host: note: --set run.cudnn_benchmark=false does nothing on the CPU: it chooses cuDNN's "
            "convolution algorithms on CUDA") in r.stderr, r.stderr
    r = run_host(run, "--benchmark", 1)  # its default says nothing
    assert r.returncode == 0 and "does nothing on the CPU" not in r.stderr, r.stderr
    # Nor does the default given, as every rerun of a run's config.toml gives it (it writes each default out).
    r = run_host(run, "--benchmark", 1, "--set", "run.cudnn_benchmark=true")
    assert r.returncode == 0 and "does nothing on the CPU" not in r.stderr, r.stderr


def test_benchmark_on_two_ranks(tmp_path):
    data = synth(tmp_path / "data", train=2, validation=1)
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"train_batch_size": 2, "threads": 1})
    r = run_host("--nproc", 2, run, "--benchmark", 3)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("[rank 0] {")]
    assert len(lines) == 1 and not any(l.startswith("[rank 1] {") for l in r.stdout.splitlines())
    line = json.loads(lines[0][len("[rank 0] "):])
    assert line["ranks"] == 2 and line["local_batch"] == 2


def test_benchmark_needs_a_positive_number_and_not_evaluate(tmp_path):
    data = synth(tmp_path / "data", train=2, validation=1)
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = run_host(run, "--benchmark", 0)
    assert r.returncode == 2 and "--benchmark 0: expected a number of steps in 1..1000000000" in r.stderr
    # Past the bound, and past what a 64-bit count holds: refused, not trained for ever or crashed.
    # Nor a count with a sign or spaces around it, which the shell may have left from a quoted variable.
    for n in ("1000000001", "99999999999999999999", " 2", "2 ", "+2", "2x"):
        r = run_host(run, "--benchmark", n)
        assert r.returncode == 2 and f"--benchmark {n}: expected a number of steps in 1..1000000000" in r.stderr
    r = run_host(run, "--benchmark", 3, "--evaluate", tmp_path / "x.pt")
    assert r.returncode == 2 and "give one of them" in r.stderr


def test_benchmark_percentiles_interpolate_as_numpy(tmp_path):
    """p50 and p90 were the step times at index floor(q n): with 2 steps both were the slower one. As
    numpy.percentile, the median of two steps is their mean, which samples_per_s also gives."""
    data = synth(tmp_path / "data", train=2, validation=1)
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"train_batch_size": 2, "threads": 1})
    r = run_host(run, "--benchmark", 2)
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    mean_ms = 1000 * 2 / line["samples_per_s"]
    assert line["step_ms_p50"] == pytest.approx(mean_ms, rel=1e-9), line
    assert line["step_ms_p50"] <= line["step_ms_p90"]


def test_a_diverged_benchmark_exits_as_a_diverged_run(tmp_path):
    """Status 4, as training's divergence; it was 2, bad input."""
    data = synth(tmp_path / "data", train=2, validation=1)
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"train_batch_size": 2, "threads": 1})
    r = run_host(run, "--benchmark", 2, "--set", "optimizer.lr=1e30")
    assert r.returncode == 4, r.stderr[-3000:]
    assert "--benchmark: training diverged on the synthetic batch at step" in r.stderr, r.stderr[-3000:]
    assert r.stdout.strip() == "" or not r.stdout.strip().splitlines()[-1].startswith("{"), r.stdout


def test_a_batch_beyond_the_host_memory_is_said_to_be_out_of_memory(tmp_path):
    # LibTorch's CPU allocator says so in a plain c10::Error: it was "internal error: [enforce fail at
    # alloc_cpu.cpp...] DefaultCPUAllocator: can't allocate memory", status 3, as if deepcam-host had a bug.
    data = synth(tmp_path / "data", train=2, validation=1)
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"threads": 1})
    r = run_host(run, "--benchmark", 1, "--set", "run.train_batch_size=1000000")  # 1e6 x 16 x 64 x 96 floats
    assert r.returncode == 2, r.stderr
    assert "deepcam-host: out of memory: " in r.stderr and "can't allocate memory" in r.stderr, r.stderr
    assert "a smaller [run] train_batch_size or validation_batch_size (each per rank) needs less" in r.stderr
    assert "internal error" not in r.stderr


def start_benchmark(tmp_path, ignore_sigint=False):
    """deepcam-host --benchmark of many steps, once it has begun (its resolved configuration printed, just
    before); `ignore_sigint`: started with SIGINT ignored, as a shell script's background job is."""
    data = synth(tmp_path / "data", train=2, validation=1)
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"threads": 1})
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    p = subprocess.Popen([str(HOST), str(run), "--benchmark", "1000000"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=plugin_env(), preexec_fn=ignore)
    seen = ""
    while "[scheduler]" not in seen:
        line = p.stderr.readline()
        if not line:
            p.kill()
            pytest.fail(f"deepcam-host ended before its benchmark:\n{seen}")
        seen += line
    time.sleep(1.0)
    return p


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["interrupt", "terminate"])
def test_a_stopped_benchmark_says_so_and_ends_by_the_signal(tmp_path, sig):
    p = start_benchmark(tmp_path)
    try:
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    out = tmp_path / "out"
    assert p.returncode == -sig, (p.returncode, stderr)
    assert f"deepcam-host: --benchmark stopped by {name}, before its figures; it writes no file" in stderr, stderr
    assert stdout == "" and not out.exists()


def test_a_benchmark_started_ignoring_sigint_keeps_ignoring_it(tmp_path):
    p = start_benchmark(tmp_path, ignore_sigint=True)
    try:
        p.send_signal(signal.SIGINT)
        time.sleep(2.0)
        assert p.poll() is None, p.communicate()[1][-3000:]
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGTERM, (p.returncode, stderr)
    assert "stopped by SIGINT" not in stderr and "stopped by SIGTERM" in stderr, stderr
