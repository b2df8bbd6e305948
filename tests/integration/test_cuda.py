"""Training with device = "cuda" from start to end: the losses of the CPU run,
checkpoints Python reads on the CPU, resume on the GPU, the prefetch
reader's ring with normalisation on the GPU feeding LAMB's fused kernels
(and --predict), and the quickstart to its target with a log that passes the checker. Each
test needs a CUDA GPU and is skipped without one (scripts/gpu_check.sh runs
them on a GPU machine)."""

import pytest
import torch

from helpers import (REPO_ROOT, SGD, assert_within_spread, clean_env, mlperf_check, read_events, run_host,
                     synth, write_run)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Plain SGD for comparisons across devices (helpers.SGD), at a larger step so that the losses move
# well beyond the tolerance.
SGD = dict(SGD, lr=0.005)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("cuda") / "data", train=8, validation=4, seed=29)


def run(tmp_path, data, name, run=None, **sections):
    out = tmp_path / name
    path = write_run(tmp_path / f"{name}.toml", data, out,
                     run={"max_epochs": 2, "target_iou": 1.0, "logging_frequency": 1, "checkpoint_every": 1,
                          "cudnn_benchmark": False, **(run or {})}, **sections)
    r = run_host(path)
    assert r.returncode == 1, r.stderr[-3000:]  # target 1.0 not reached: run_stop "aborted"
    return out, read_events(out / "mlperf.log")


def losses(events):
    return [e["value"] for e in events if e["key"] == "train_loss"]


def test_a_cuda_run_follows_the_cpu_run(tmp_path, data):
    _, cpu = run(tmp_path, data, "cpu", {"device": "cpu"}, optimizer=SGD)
    gpu_out, gpu = run(tmp_path, data, "gpu", {"device": "cuda"}, optimizer=SGD)
    assert len(losses(gpu)) == len(losses(cpu)) == 8  # 2 epochs of 4 steps (an epoch's end is one of them)
    # fp32 on CUDA convolves in TF32 (PyTorch's default, cudnn.allow_tf32), about 1e-3 apart.
    assert losses(gpu) == pytest.approx(losses(cpu), rel=1e-2)
    assert abs(losses(cpu)[-1] - losses(cpu)[0]) > 0.03 * losses(cpu)[0]  # the losses moved beyond that
    accuracies = [e["value"] for e in gpu if e["key"] == "eval_accuracy"]
    assert accuracies == pytest.approx([e["value"] for e in cpu if e["key"] == "eval_accuracy"], abs=2e-2)
    # The checkpoint is Python's to read on a machine without a GPU.
    ckpt = torch.load(gpu_out / "checkpoint-epoch2.pt", weights_only=True, map_location="cpu")
    assert ckpt["step"] == 8 and all(t.device.type == "cpu" for t in ckpt["model"].values())


def test_prefetch_ring_and_fused_lamb_on_cuda_resume_where_they_left_off(tmp_path, data):
    sections = {"reader": {"name": "prefetch", "depth": 4, "threads": 2, "shuffle_mode": "global"},
                "reader.source": {"name": "hdf5", "threads": 1}, "optimizer": {"name": "lamb", "lr": 0.002}}
    whole_out, whole = run(tmp_path, data, "whole", {"device": "cuda"}, **sections)
    _, again = run(tmp_path, data, "again", {"device": "cuda"}, **sections)
    _, hdf5 = run(tmp_path, data, "hdf5", {"device": "cuda"}, optimizer=sections["optimizer"])
    # Where two identical CUDA runs agree bit for bit, so must these (helpers.assert_within_spread):
    # the ring normalises on the GPU, the HDF5 reader on the CPU, bit for bit alike: the same run.
    assert_within_spread({"losses": losses(hdf5)}, {"losses": losses(whole)}, {"losses": losses(again)})
    resumed_out, resumed = run(tmp_path, data, "resumed",
                               {"device": "cuda", "resume": str(whole_out / "checkpoint-epoch1.pt")}, **sections)
    # Epoch 2's steps 5 to 8 (the run of 8 logged steps 1 to 8; [5:] compared 4 losses with 3).
    assert len(losses(resumed)) == 4, losses(resumed)
    assert_within_spread({"losses": losses(resumed)}, {"losses": losses(whole)[4:]}, {"losses": losses(again)[4:]})
    a, b, c = (torch.load(out / "checkpoint-epoch2.pt", weights_only=True, map_location="cpu")
               for out in (whole_out, resumed_out, tmp_path / "again"))
    assert a["step"] == b["step"] == 8
    assert_within_spread(b["model"], a["model"], c["model"])


def test_predict_on_cuda_from_the_prefetch_ring_writes_what_it_writes_from_hdf5(tmp_path, data):
    # The ring hands its batches over on the GPU; --predict read their labels and TMQ through host pointers.
    trained, _ = run(tmp_path, data, "trained", {"device": "cuda"}, optimizer=SGD)
    readers = {"prefetch": {"reader": {"name": "prefetch", "depth": 2, "threads": 1},
                            "reader.source": {"name": "hdf5", "threads": 1}},
               "hdf5": {}}
    written = {}
    for name, sections in readers.items():
        path = write_run(tmp_path / f"predict-{name}.toml", data, tmp_path / f"unused-{name}",
                         run={"device": "cuda", "cudnn_benchmark": False}, **sections)
        out = tmp_path / f"predicted-{name}"
        r = run_host(path, "--predict", trained / "checkpoint-epoch2.pt", "--out", out)
        assert r.returncode == 0, r.stderr[-3000:]
        written[name] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len(written["hdf5"]) == 8  # 4 validation samples, .npy and .png each
    # The ring normalises on the GPU, the HDF5 reader on the CPU, bit for bit alike (the test above).
    assert written["prefetch"] == written["hdf5"]


def test_the_quickstart_on_cuda_reaches_the_target_and_passes_the_checker(tmp_path):
    data = synth(tmp_path / "data", train=64, validation=16, height=96, width=144, seed=11)
    out = tmp_path / "out"
    r = run_host(REPO_ROOT / "configs" / "quickstart.toml", "--set", f"data.root={data}",
                 "--set", f"run.output_dir={out}", "--set", "run.device=cuda", "--set", "mlperf.platform=1xGPU")
    assert r.returncode == 0, r.stderr[-3000:]
    events = read_events(out / "mlperf.log")
    assert events[-1]["key"] == "run_stop" and events[-1]["metadata"]["status"] == "success"
    status, output = mlperf_check(out / "mlperf.log")
    assert status == 0 and "SUCCESS" in output, output


def test_two_ranks_on_one_cuda_gpu_are_refused_at_start_not_after_the_comm_timeout(tmp_path, data):
    # NCCL refuses them only in the first collective, which would wait out comm_timeout_s as a lost rank.
    path = write_run(tmp_path / "shared.toml", data, tmp_path / "out",
                     run={"device": "cuda", "max_epochs": 1, "comm_timeout_s": 600})
    r = run_host("--nproc", 2, path, env=clean_env(CUDA_VISIBLE_DEVICES="0"), timeout=90)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{path}:" in r.stderr and '[run] device = "cuda": ranks 0 and 1 on host ' in r.stderr
    assert "would share one GPU (PCI " in r.stderr and "CUDA_VISIBLE_DEVICES" in r.stderr
