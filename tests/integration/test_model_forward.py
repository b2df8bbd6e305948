"""The deeplabv3plus plugin's forward pass against SPEC 3 as spec_model.py
writes it, on weights and BatchNorm statistics drawn at random (a trained
model's would hide a misplaced ReLU or a wrong dilation less well):
--evaluate's validation loss and accuracy, and --predict's class of every
pixel, are those of the SPEC's model on the same inputs (SPEC 1.4), with loss
and IoU as SPEC 4 defines them."""

import re

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spec_model
from helpers import numpy_scale, run_host, synth, write_run

# SPEC 4.1: w_c = f_c ^ (-0.125)
CLASS_WEIGHTS = torch.tensor([0.986267818390377, 0.0004578708870701058, 0.01327431072255291],
                             dtype=torch.float64).pow(-0.125).float()


def randomised(model, seed):
    """The model's tensors drawn anew: convolutions at He scale, so that activations stay near 1
    through the encoder; BatchNorm scales and variances about 1, shifts and means about 0."""
    g = torch.Generator().manual_seed(seed)
    drawn = {}
    for name, t in model.items():
        if not t.is_floating_point():
            drawn[name] = t
        elif name.endswith("running_var"):
            drawn[name] = torch.rand(t.shape, generator=g) * 1.5 + 0.5
        elif name.endswith(("running_mean", "bias")):
            drawn[name] = torch.randn(t.shape, generator=g) * 0.1
        elif t.dim() == 4:
            drawn[name] = torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5
        else:  # BatchNorm's weight, the image pooling branch's scale
            drawn[name] = torch.rand(t.shape, generator=g) + 0.5
    return drawn


def iou_score(pred, labels):
    """SPEC 4.2 for one sample: the sum over classes of tp / (3 (tp + fp + fn)), 1/3 when empty."""
    score = 0.0
    for c in range(3):
        tp = int(((pred == c) & (labels == c)).sum())
        union = int(((pred == c) | (labels == c)).sum())
        score += tp / (3 * union) if union else 1 / 3
    return score


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A data set of 3 validation samples, 3 x 32 at output stride 16 (wide enough for every ASPP
    rate, 18 there and 36 at output stride 8, to reach other features), and a checkpoint of the
    small model with random weights and statistics."""
    tmp = tmp_path_factory.mktemp("forward")
    data = synth(tmp / "data", train=2, validation=3, height=48, width=512, seed=8)
    run = write_run(tmp / "run.toml", data, tmp / "out", model={"middle_blocks": 2},
                    run={"max_epochs": 1, "checkpoint_every": 1})
    r = run_host(run)
    assert r.returncode in (0, 1), r.stderr
    trained = torch.load(tmp / "out" / "checkpoint-epoch1.pt", weights_only=True)
    state = randomised(trained["model"], seed=3)
    checkpoint = tmp / "random.pt"
    torch.save({"step": trained["step"], "epoch": trained["epoch"], "model": state}, checkpoint)
    return data, state, checkpoint


@pytest.mark.parametrize("output_stride", [16, 8])
def test_evaluate_and_predict_equal_the_spec_model(tmp_path, random_model, output_stride):
    data, state, checkpoint = random_model
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"validation_batch_size": 2},
                    model={"middle_blocks": 2, "output_stride": output_stride})
    r = run_host(run, "--evaluate", checkpoint)
    assert r.returncode in (0, 1), r.stderr
    ours = {k: float(v) for k, v in re.findall(r"^(eval_accuracy|eval_loss) (\S+)$", r.stdout, flags=re.M)}
    r = run_host(run, "--predict", checkpoint, "--out", tmp_path / "predicted")
    assert r.returncode == 0, r.stderr

    sd = spec_model.StateDict(state)
    shift, scale = numpy_scale(data / "stats.h5")
    losses, scores, differing, pixels = [], [], 0, 0
    for n, path in enumerate(sorted((data / "validation").glob("*.h5"))):
        with h5py.File(path, "r") as f:
            x, labels = f["climate/data"][...], f["climate/labels_0"][...].astype(np.int64)
        x = torch.from_numpy((scale * (x - shift)).transpose(2, 0, 1).copy())[None]
        labels = torch.from_numpy(labels)[None]
        with torch.no_grad():
            logits = spec_model.forward(sd, x, output_stride)
        assert logits.shape == (1, 3, 48, 512)
        losses.append(F.cross_entropy(logits, labels, weight=CLASS_WEIGHTS, reduction="none").mean().item())
        pred = logits.softmax(dim=1).argmax(dim=1)
        scores.append(iou_score(pred, labels))
        predicted = torch.from_numpy(np.load(tmp_path / "predicted" / f"sample-{n:06d}.npy").astype(np.int64))
        differing += int((predicted != pred[0]).sum())
        pixels += pred.numel()
    assert sd.unused() == []  # the SPEC's model read every weight and statistic of the plugin's
    assert ours["eval_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    # The classes may differ only where two logits all but tie.
    assert differing <= pixels * 1e-4, (differing, pixels)
    assert ours["eval_accuracy"] == pytest.approx(np.mean(scores), abs=1e-4)
    assert len(set(np.round(losses, 3))) == 3  # three samples that differ: the comparison has something to compare
