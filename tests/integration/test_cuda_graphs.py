"""[run] cuda_graphs: the training step captured in a CUDA graph and replayed.

What a captured step cannot follow is refused before anything is built, one
line per setting (this runs anywhere). The graphed run itself needs a GPU
(two for two ranks: NCCL refuses two ranks on one): its tests are skipped
without one."""

import json

import pytest
import torch

from helpers import assert_within_spread, plugin_env, read_events, run_host, synth, write_run

HAS_GPU = torch.cuda.is_available()


def refusal(tmp_path, *args, **run):
    data = synth(tmp_path / "data", train=4, validation=2)
    out = tmp_path / "out"
    path = write_run(tmp_path / "run.toml", data, out, run=dict({"cuda_graphs": True}, **run))
    r = run_host(*args, path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert not (out / "mlperf.log").exists() and not (out / "config.toml").exists()
    # The message, after the resolved config and the log lines the host echoes.
    at = r.stderr.find("[run] cuda_graphs = true")
    assert at >= 0, r.stderr
    return path, r.stderr[r.stderr.rfind("\n", 0, at) + 1:]


def test_graphs_on_the_cpu_are_refused_naming_the_keys(tmp_path):
    path, err = refusal(tmp_path)
    assert f"{path}:" in err and "[run] cuda_graphs = true, but the training step of this run cannot be captured" in err
    assert '[run] device = "cpu" (default): CUDA graphs need device = "cuda"' in err
    assert "set cuda_graphs = false" in err
    # Only what this run sets wrong is listed.
    assert "gradient_accumulation_frequency" not in err and "amp_fp16" not in err and "this run has" not in err


def test_every_setting_a_captured_step_cannot_follow_is_listed(tmp_path):
    path, err = refusal(tmp_path, gradient_accumulation_frequency=2, precision="amp_fp16")
    assert "[run] gradient_accumulation_frequency = 2: a captured step is one whole optimizer step; use 1" in err
    assert f'{path}:' in err and '[run] precision = "amp_fp16": its loss scaler reads the device' in err
    assert '[run] device = "cpu" (default):' in err


def test_graphs_on_many_ranks_are_refused_only_for_what_each_rank_sets(tmp_path):
    # Many ranks are not refused (the all-reduce is captured with the step); the CPU is.
    _, err = refusal(tmp_path, "--nproc", 2)
    assert '[run] device = "cpu" (default): CUDA graphs need device = "cuda"' in err
    assert "this run has" not in err and "all-reduce" not in err


def test_a_blocking_nccl_wait_is_refused_with_graphs_on_many_ranks(tmp_path):
    data = synth(tmp_path / "data", train=4, validation=2)
    path = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"cuda_graphs": True})
    r = run_host("--nproc", 2, path, env=dict(plugin_env(), TORCH_NCCL_BLOCKING_WAIT="1"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "the environment sets TORCH_NCCL_BLOCKING_WAIT=1: the NCCL all-reduce is then waited for on the host" in r.stderr
    # One rank has no NCCL group to wait on.
    r = run_host(path, env=dict(plugin_env(), TORCH_NCCL_BLOCKING_WAIT="1"))
    assert r.returncode == 2 and "TORCH_NCCL_BLOCKING_WAIT" not in r.stderr, r.stderr


def test_benchmark_line_says_whether_the_step_was_graphed(tmp_path):
    data = synth(tmp_path / "data", train=2, validation=1)
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"train_batch_size": 2, "threads": 1})
    r = run_host(run, "--benchmark", 2)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["cuda_graphs"] is False


# ---- on a GPU ----------------------------------------------------------------------------------

def gpu_run(tmp_path, data, name, graphs, optimizer, nproc=1):
    out = tmp_path / name
    # Ten batches of one per rank in one epoch: 3 eager steps, the captured one, 6 replays.
    run = write_run(tmp_path / f"{name}.toml", data, out,
                    run={"device": "cuda", "cuda_graphs": graphs, "cudnn_benchmark": False,
                         "train_batch_size": 1, "logging_frequency": 1, "target_iou": 1.0},
                    optimizer=optimizer)
    r = run_host(*(["--nproc", nproc] if nproc > 1 else []), run)
    assert r.returncode == 1, r.stderr[-3000:]  # target not reached: run_stop "aborted"
    events = read_events(out / "mlperf.log")
    assert events[-1]["key"] == "run_stop"
    # By step: every step is logged, once.
    steps = [e["metadata"]["step_num"] for e in events if e["key"] == "train_loss"]
    assert steps == list(range(1, 11))
    losses = {e["metadata"]["step_num"]: e["value"] for e in events if e["key"] == "train_loss"}
    ckpt = torch.load(out / "checkpoint-epoch1.pt", weights_only=True, map_location="cpu")
    assert ckpt["step"] == 10
    return losses, ckpt


def flat(ckpt):
    """Every tensor of the checkpoint (weights, BatchNorm buffers, optimizer state) by name."""
    tensors = {f"model.{k}": v for k, v in ckpt["model"].items()}
    for i, state in ckpt["optimizer"]["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return tensors


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("optimizer", [{"name": "lamb", "lr": 0.002}, {"name": "adamw", "lr": 0.002}],
                         ids=["lamb", "adamw"])
def test_graphed_steps_give_the_eager_weights(tmp_path, optimizer):
    data = synth(tmp_path / "data", train=10, validation=2)
    eager_losses, eager = gpu_run(tmp_path, data, "eager", False, optimizer)
    again_losses, again = gpu_run(tmp_path, data, "eager-again", False, optimizer)
    graphed_losses, graphed = gpu_run(tmp_path, data, "graphed", True, optimizer)
    e, a, g = flat(eager), flat(again), flat(graphed)
    assert e.keys() == g.keys()
    assert graphed["optimizer"]["param_groups"] == eager["optimizer"]["param_groups"]
    # Bit for bit where eager CUDA itself is (cuDNN's autotuning is off); some backward kernels add
    # with atomics, and then the graphed run may differ from the eager one only as much as two
    # eager runs differ from each other.
    assert_within_spread(g, e, a)
    if eager_losses == again_losses:
        assert graphed_losses == eager_losses
    else:
        assert graphed_losses == pytest.approx(eager_losses, rel=1e-5)


# NCCL refuses two ranks on one GPU: this needs two.
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_graphed_steps_on_two_ranks_give_the_eager_weights(tmp_path):
    data = synth(tmp_path / "data", train=20, validation=2)
    lamb = {"name": "lamb", "lr": 0.002}
    eager_losses, eager = gpu_run(tmp_path, data, "eager", False, lamb, nproc=2)
    _, again = gpu_run(tmp_path, data, "eager-again", False, lamb, nproc=2)
    graphed_losses, graphed = gpu_run(tmp_path, data, "graphed", True, lamb, nproc=2)
    # The all-reduce was captured and replayed: the ranks' gradients were averaged in every step.
    assert_within_spread(flat(graphed), flat(eager), flat(again))
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-5)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_benchmark_with_graphs_replays_and_says_so(tmp_path):
    data = synth(tmp_path / "data", train=2, validation=1)
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    run={"device": "cuda", "cuda_graphs": True, "train_batch_size": 2},
                    optimizer={"name": "lamb", "lr": 0.002})
    lines = {}
    for name, changes in (("graphed", []), ("eager", ["--set", "run.cuda_graphs=false"]),
                          ("cpu", ["--set", "run.cuda_graphs=false", "--set", "run.device=cpu"])):
        # 5 warm-up steps (3 eager, the captured one, a replay), then 6 timed ones
        r = run_host(run, "--benchmark", 6, *changes)
        assert r.returncode == 0, r.stderr[-3000:]
        lines[name] = json.loads(r.stdout.strip().splitlines()[-1])
    line = lines["graphed"]
    assert line["cuda_graphs"] is True and line["device"].startswith("cuda") and line["steps"] == 6
    # The peak counts the graph's capture: replays never allocate, so a peak taken after the warm-up held
    # only the weights and the optimizer's state, a small part of the eager step's.
    assert line["peak_memory_mb"] >= 0.9 * lines["eager"]["peak_memory_mb"], lines
    # On the CPU beside a GPU it is the process's peak RSS, not the idle CUDA allocator's 0.
    assert lines["cpu"]["device"] == "cpu" and lines["cpu"]["peak_memory_mb"] > 50, lines
