"""Data-parallel training over several processes on this machine (Gloo on
CPU): the numbers a run on P ranks gives against one rank (issue: many ranks,
SPEC 2, 4.3, 7). Launching, failures, resume and the checker are in
test_ranks.py."""

import subprocess

import pytest
import torch

from helpers import BUILD_DIR, SGD, free_port, read_events, run_host, synth, torchrun_env, write_run

PROBE = BUILD_DIR / "tests" / "data_parallel_probe"
# Plain SGD (helpers.SGD), because Adam and LAMB divide each gradient by its own running magnitude: for the many
# gradients that are nearly zero (a BatchNorm bias ahead of another
# BatchNorm: a sum of terms that cancel), fp32 rounding noise, which depends
# on the order of the sums and so on the number of ranks, becomes a step of
# the full learning rate. Measured here with Adam: 0.3 % apart after 4 steps
# while every logged loss agreed to 1e-7.


def run_ranks(argv, world, timeout=300):
    """Starts `world` processes with torchrun-style variables; returns their results."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        procs.append(subprocess.Popen([str(a) for a in argv], env=torchrun_env(rank, world, port), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]


@pytest.mark.parametrize("mode", [["syncbn"], ["syncbn-half"], ["syncbn-nhwc"], ["gradients", "1"],
                                  ["gradients", "2"], ["synced-gradients", "1"], ["synced-gradients", "2"],
                                  ["bnstats"]],
                         ids=["syncbn-2-ranks-equal-1-rank", "syncbn-float16-over-65504-per-channel",
                              "syncbn-channels-last-in-and-out",
                              "allreduced-gradient-is-mean-k1", "allreduced-gradient-is-mean-k2",
                              "allreduced-gradient-with-syncbn-k1", "allreduced-gradient-with-syncbn-k2",
                              "bn-statistics-averaged"])
def test_probe(mode):
    results = run_ranks([PROBE, *mode], 2)
    for rank, (status, out) in enumerate(results):
        assert status == 0, f"rank {rank}:\n{out}"
        assert f"rank {rank} of 2: collectives through gloo" in out, out
        assert "all checks hold" in out, out


def test_synced_batchnorm_over_four_ranks_in_pairs_groups_consecutive_ranks():
    # batchnorm_group_size = 2 of 4 ranks: ranks 0 and 1 are one group, 2 and 3 the other (SPEC 7).
    results = run_ranks([PROBE, "syncbn-pairs"], 4)
    for rank, (status, out) in enumerate(results):
        assert status == 0, f"rank {rank}:\n{out}"
        assert "syncbn-pairs: all checks hold" in out, out


def test_probe_of_one_rank_still_goes_through_a_process_group():
    # What lets a machine with one GPU check NCCL below: the probe's collectives at world size 1 are
    # not the local shortcut a run of one rank takes.
    [(status, out)] = run_ranks([PROBE, "gradients", "1"], 1)
    assert status == 0, out
    assert "rank 0 of 1: collectives through gloo" in out and "all checks hold" in out, out


# On a GPU: the same checks through ProcessGroupNCCL, on two ranks where there are two GPUs, else at
# world size 1 (NCCL refuses two ranks on one GPU): SyncBN's collectives (float32, half, NHWC) and the
# bucketed gradient all-reduce on CUDA tensors, and that all-reduce captured in a CUDA graph and
# replayed. (synced-gradients needs two ranks: its group is a pair.)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", [["syncbn"], ["syncbn-half"], ["syncbn-nhwc"], ["gradients", "1"],
                                  ["gradients", "2"], ["graphed-gradients"]],
                         ids=["syncbn-nccl", "syncbn-half-nccl", "syncbn-nhwc-nccl", "allreduced-gradient-nccl-k1",
                              "allreduced-gradient-nccl-k2", "allreduced-gradient-nccl-in-a-cuda-graph"])
def test_probe_on_cuda_with_nccl(mode):
    world = min(2, torch.cuda.device_count())
    results = run_ranks([PROBE, "--device", "cuda", *mode], world)
    for rank, (status, out) in enumerate(results):
        assert status == 0, f"rank {rank}:\n{out}"
        assert f"rank {rank} of {world}: collectives through nccl" in out, out
        assert "all checks hold" in out, out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("dp") / "data", train=8, validation=7, seed=21)


def final_weights(out):
    ckpts = sorted(out.glob("checkpoint-epoch*.pt"))
    assert ckpts, f"no checkpoint in {out}"
    return torch.load(ckpts[-1])["model"]


def train_losses(out):
    return [e["value"] for e in read_events(out / "mlperf.log") if e["key"] == "train_loss"]


@pytest.mark.parametrize("k", [1, 2])
def test_two_ranks_with_synced_batchnorm_train_as_one_rank_with_twice_the_batch(tmp_path, data, k):
    """SPEC 2.1's sampler gives rank r every P-th sample of the epoch's order,
    so the two ranks' batches of a step are the one rank's batch."""
    common = {"max_epochs": 2, "target_iou": 1.0, "logging_frequency": 1, "threads": 1,
              "gradient_accumulation_frequency": k, "checkpoint_every": 1}
    one = tmp_path / "one"
    run1 = write_run(tmp_path / "one.toml", data, one, run={**common, "train_batch_size": 2 * 2 // k},
                     optimizer=SGD)
    two = tmp_path / "two"
    run2 = write_run(tmp_path / "two.toml", data, two,
                     run={**common, "train_batch_size": 2 // k, "batchnorm_group_size": 2}, optimizer=SGD)
    r1 = run_host(run1)
    assert r1.returncode == 1, r1.stderr  # target 1.0: not reached
    r2 = run_host("--nproc", 2, run2)
    assert r2.returncode == 1, r2.stdout + r2.stderr
    l1, l2 = train_losses(one), train_losses(two)
    assert len(l1) == len(l2) == 2 * 2 * k  # every batch of 2 epochs (an epoch's end is one of them)
    assert l1 == pytest.approx(l2, rel=1e-5)
    w1, w2 = final_weights(one), final_weights(two)
    assert list(w1) == list(w2)
    epoch1 = torch.load(one / "checkpoint-epoch1.pt")["model"]
    moved = 0
    for name, a in w1.items():
        b = w2[name]
        if not a.is_floating_point():
            assert torch.equal(a, b), name
            continue
        # Relative to the weights' scale (1): a BatchNorm bias that stays
        # near 0 has no scale of its own to be relative to.
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item()), name
        moved += not torch.equal(a, epoch1[name])
    assert moved > 100  # the weights compared are still being trained


def test_validation_over_three_ranks_with_a_remainder_equals_one_rank(tmp_path, data):
    # 7 validation files over 3 ranks: 3, 2, 2 (SPEC 2.3).
    out = tmp_path / "train"
    run = write_run(tmp_path / "run.toml", data, out, run={"max_epochs": 1, "threads": 1,
                                                        "validation_batch_size": 1})
    assert run_host(run).returncode in (0, 1)
    ckpt = out / "checkpoint-epoch1.pt"
    one = run_host(run, "--evaluate", ckpt, "--set", f"run.output_dir={tmp_path / 'e1'}")
    three = run_host("--nproc", 3, run, "--evaluate", ckpt, "--set", f"run.output_dir={tmp_path / 'e3'}")
    assert one.returncode == 0, one.stderr
    assert three.returncode == 0, three.stderr
    figures = [l for l in one.stdout.splitlines() if l.startswith("eval_")]
    assert len(figures) == 2
    assert [f"[rank 0] {l}" for l in figures] == [l for l in three.stdout.splitlines()
                                                  if l.startswith("[rank 0] eval_")]
    # The same figures in both evaluation logs, and 7 samples.
    for name in ("e1", "e3"):
        events = read_events(tmp_path / name / "evaluate-mlperf.log")
        assert [e["value"] for e in events if e["key"] == "eval_accuracy"] == [float(figures[0].split()[1])]
