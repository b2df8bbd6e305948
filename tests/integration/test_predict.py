"""deepcam-host --predict: each validation sample's predicted classes as .npy
(what --evaluate scores) and a picture of predicted and true cyclones and
rivers over TMQ, with a legend, as PNG."""

import re

import numpy as np
import torch
import h5py
import pytest
from PIL import Image

from helpers import REPO_ROOT, convert, numpy_scale, run_host, synth, write_run

# The legend's swatches (core/train/picture.cpp).
SWATCHES = {"TC predicted": (230, 30, 30), "AR predicted": (30, 100, 255), "TC true": (255, 230, 0),
            "AR true": (0, 240, 240)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    data = synth(tmp / "data", train=4, validation=3)
    run = write_run(tmp / "run.toml", data, tmp / "out", run={"max_epochs": 2, "validation_batch_size": 2})
    r = run_host(run, "--quiet")
    assert r.returncode in (0, 1), r.stderr
    return tmp, data, run, tmp / "out" / "checkpoint-epoch2.pt"


def expected_picture(sample, stats, pred, channel=0):
    """The picture as README says it is drawn, computed here: the normalised TMQ (channel 0; or `channel`) in grey
    (255 (x - min) / (max - min), rounded, in float32 as the reader's input is), each predicted
    pixel averaged with its class's colour, and each pixel of a true region with a 4-neighbour
    outside it (or on the border) in its class's edge colour."""
    shift, scale = numpy_scale(stats)
    with h5py.File(sample, "r") as h:
        x, truth = h["climate/data"][..., channel], h["climate/labels_0"][()]
    tmq = scale[channel] * (x - shift[channel])
    lo, hi = tmq.min(), tmq.max()
    grey = np.floor(np.float32(255) * (tmq - lo) / (hi - lo) + np.float32(0.5)).astype(np.int64)
    picture = np.repeat(grey[..., None], 3, axis=-1)
    for cls, name in ((1, "TC predicted"), (2, "AR predicted")):
        picture[pred == cls] = (picture[pred == cls] + np.array(SWATCHES[name])) // 2
    padded = np.pad(truth, 1, constant_values=-1)
    for cls, name in ((1, "TC true"), (2, "AR true")):
        inside = padded == cls
        interior = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
        picture[(truth == cls) & ~interior] = SWATCHES[name]
    return picture.astype(np.uint8)


def sample_iou(pred, truth):
    """SPEC 4.2 for one sample."""
    score = 0.0
    for j in range(3):
        tp = np.sum((pred == j) & (truth == j))
        union = tp + np.sum((pred == j) & (truth != j)) + np.sum((pred != j) & (truth == j))
        score += tp / (3 * union) if union > 0 else 1 / 3
    return score


def test_predictions_are_what_evaluate_scores_and_pictures_show_them(trained):
    tmp, data, run, ckpt = trained
    out = tmp / "pred"
    r = run_host(run, "--predict", ckpt, "--out", out)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"sample-{i:06d}.{ext}" for i in range(3) for ext in ("npy", "png")]

    # The validation samples in the reader's order (sorted names).
    files = sorted((data / "validation").glob("*.h5"))
    scores = []
    for i, f in enumerate(files):
        pred = np.load(out / f"sample-{i:06d}.npy")
        assert pred.dtype == np.uint8 and pred.shape == (64, 96)
        assert set(np.unique(pred)) <= {0, 1, 2}
        with h5py.File(f, "r") as h:
            truth = h["climate/labels_0"][()]
        scores.append(sample_iou(pred, truth))
    r = run_host(run, "--evaluate", ckpt)
    assert r.returncode == 0, r.stderr
    evaluated = dict(l.split() for l in r.stdout.splitlines() if l.startswith("eval_"))
    assert np.mean(scores) == pytest.approx(float(evaluated["eval_accuracy"]), rel=1e-12, abs=1e-12)

    predicted_classes = set()
    for i in range(3):
        with Image.open(out / f"sample-{i:06d}.png") as im:
            im.load()
            assert im.mode == "RGB" and im.size[0] == 96 and im.size[1] > 64  # the picture, then its legend
            pixels = np.asarray(im)
        picture, legend = pixels[:64], pixels[64:]
        assert picture.std() > 10, "blank picture"
        colours = {tuple(c) for c in legend.reshape(-1, 3)}
        for name, rgb in SWATCHES.items():
            assert rgb in colours, f"no {name} swatch in the legend"
        assert (255, 255, 255) in colours  # the legend's text
        # Pixel for pixel what the predictions, the labels and TMQ make.
        pred = np.load(out / f"sample-{i:06d}.npy")
        assert (picture == expected_picture(files[i], data / "stats.h5", pred)).all()
        predicted_classes |= set(np.unique(pred))
    assert predicted_classes == {0, 1, 2}  # every colour was blended somewhere


def test_samples_limits_the_count(trained, tmp_path):
    _, _, run, ckpt = trained
    r = run_host(run, "--predict", ckpt, "--out", tmp_path / "two", "--samples", 2)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "sample-000000.npy", "sample-000000.png", "sample-000001.npy", "sample-000001.png"]
    assert f"wrote the predictions of 2 validation samples to {tmp_path / 'two'}\n" in r.stderr, r.stderr[-3000:]
    # More than the 3 there are: all 3, and the message says that there are no more.
    r = run_host(run, "--predict", ckpt, "--out", tmp_path / "all", "--samples", 100)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "all").glob("*.npy"))) == 3
    assert (f"wrote the predictions of 3 validation samples, all the validation split holds (--samples 100 asked "
            f"for more) to {tmp_path / 'all'}\n") in r.stderr, r.stderr[-3000:]


def test_a_picture_that_does_not_fit_takes_its_npy_with_it(trained, tmp_path):
    """A disk with room for a sample's .npy (14 KB) and not for its picture: the .npy stayed, half a sample."""
    import subprocess
    from helpers import HOST, plugin_env
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --mount is refused here: the test needs a mount namespace for a small tmpfs")
    _, _, run, checkpoint = trained
    small = tmp_path / "small"
    small.mkdir()
    script = (f'mount -t tmpfs -o size=16k tmpfs "{small}" && "{HOST}" "{run}" --predict "{checkpoint}" --out '
              f'"{small}/pred" --quiet; status=$?; find "{small}" -type f; exit $status')
    r = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                       env=plugin_env())
    assert r.returncode == 2, r.stderr
    assert re.search(r"sample-000000\.png: cannot write: No space left on device.* \(sample-000000\.npy, written "
                     r"before it, is removed; the 0 samples before it are in ", r.stderr), r.stderr
    assert r.stdout == "", r.stdout  # nothing left on the small disk


def test_a_narrow_sample_gets_a_picture_as_wide_as_its_legend(tmp_path):
    """At 48 pixels wide every legend line was cut at the sample's edge ("TMQ (GR", "TC PRED")."""
    data = synth(tmp_path / "data", train=4, validation=1, height=32, width=48)
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"max_epochs": 1})
    r = run_host(run, "--quiet")
    assert r.returncode in (0, 1), r.stderr
    r = run_host(run, "--predict", tmp_path / "out" / "checkpoint-epoch1.pt", "--out", tmp_path / "pred")
    assert r.returncode == 0, r.stderr
    pixels = np.asarray(Image.open(tmp_path / "pred" / "sample-000000.png").convert("RGB")).astype(np.int64)
    # "TC TRUE (EDGE)", the longest line: a swatch of 10 pixels and 14 letters of 6.
    assert pixels.shape == (32 + 5 * 10 + 2, 10 + 14 * 6, 3), pixels.shape
    pred = np.load(tmp_path / "pred" / "sample-000000.npy")
    sample = sorted((data / "validation").glob("*.h5"))[0]
    assert (pixels[:32, :48] == expected_picture(sample, data / "stats.h5", pred)).all()
    assert (pixels[:32, 48:] == 0).all()
    # Each line's last letter is drawn (white in its 5 x 7 cell): no line is cut.
    for k, text in enumerate(["TMQ (GREY)", "TC PREDICTED", "AR PREDICTED", "TC TRUE (EDGE)", "AR TRUE (EDGE)"]):
        top, left = 32 + 1 + 10 * k, 10 + 6 * (len(text) - 1)
        cell = pixels[top:top + 7, left:left + 5]
        assert cell.shape == (7, 5, 3) and (cell == 255).all(axis=-1).any(), (text, cell.shape)


def test_an_earlier_predicts_files_are_refused_or_removed_not_mixed(trained, tmp_path):
    """A second --predict into the same folder with fewer samples left the first's files beside its own, two
    checkpoints' predictions with nothing to tell them apart."""
    _, _, run, ckpt = trained
    out = tmp_path / "pred"
    assert run_host(run, "--predict", ckpt, "--out", out, "--samples", 2).returncode == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_host(run, "--predict", ckpt, "--out", out, "--samples", 1)
    assert r.returncode == 2, r.stderr[-3000:]
    assert (f"--out {out}: holds the files of an earlier --predict (sample-000000.npy and 3 more), which this "
            "one's would mix with") in r.stderr, r.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = run_host(run, "--predict", ckpt, "--out", out, "--samples", 1, "--set", "run.overwrite=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"removed the 4 files of an earlier --predict in {out}" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sample-000000.npy", "sample-000000.png"]


def test_a_folder_under_a_predictions_name_is_refused_as_such(trained, tmp_path):
    # It was called "the files of an earlier --predict", and overwrite = true then failed to remove it.
    _, _, run, ckpt = trained
    out = tmp_path / "pred"
    (out / "sample-000000.npy").mkdir(parents=True)
    for overwrite in ("false", "true"):
        r = run_host(run, "--predict", ckpt, "--out", out, "--samples", 1, "--set", f"run.overwrite={overwrite}")
        assert r.returncode == 2, r.stderr[-3000:]
        assert (f"--out {out}: sample-000000.npy is not a file, and a prediction would be written under its name; "
                "remove it, or choose another --out") in r.stderr, r.stderr[-3000:]
        assert [p.name for p in out.iterdir()] == ["sample-000000.npy"]


def test_temporaries_of_a_killed_predict_are_removed_by_the_next(trained, tmp_path):
    """They used to stay: a picture's "<name>.tmp-<pid>" and an .npy file's ".<name>.tmp<pid>-<n>"."""
    _, _, run, ckpt = trained
    out = tmp_path / "pred"
    out.mkdir()
    gone = 2 ** 22 + 12345  # above the largest pid this kernel hands out by default
    left = [out / f"sample-000000.png.tmp-{gone}", out / f".sample-000000.npy.tmp{gone}-0"]
    for f in left:
        f.write_bytes(b"half")
    r = run_host(run, "--predict", ckpt, "--out", out, "--samples", 1)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["sample-000000.npy", "sample-000000.png"]
    for f in left:
        assert f"removed {f}, left by an earlier run" in r.stderr, r.stderr


def test_predict_refusals_name_what_is_missing(trained, tmp_path):
    tmp, data, run, ckpt = trained
    r = run_host(run, "--predict", ckpt)
    assert r.returncode == 2 and "--predict needs --out DIR" in r.stderr
    r = run_host(run, "--out", tmp_path / "x")
    assert r.returncode == 2 and "--out and --samples go with --predict" in r.stderr
    r = run_host(run, "--predict", ckpt, "--out", tmp_path / "x", "--evaluate", ckpt)
    assert r.returncode == 2 and "give one of them" in r.stderr
    # An empty value is no value: "--evaluate ''" would otherwise train.
    for option, args in (("--evaluate", ["--evaluate", ""]), ("--predict", ["--predict", "", "--out", tmp_path / "z"]),
                         ("--out", ["--predict", ckpt, "--out", ""])):
        r = run_host(run, *args, "--set", f"run.output_dir={tmp_path / 'empty'}")
        assert r.returncode == 2 and f"{option} needs a value" in r.stderr, (args, r.stderr)
        assert not (tmp_path / "empty").exists()


def test_an_out_that_cannot_be_made_is_refused_before_the_checkpoint_is_read(trained, tmp_path):
    tmp, data, run, ckpt = trained
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # A damaged checkpoint: read first, it would be the error said.
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    for out in (blocker, blocker / "sub" / "predictions"):
        r = run_host(run, "--predict", damaged, "--out", out)
        assert r.returncode == 2, r.stderr
        assert f"--out {out}: cannot create the folder: {blocker} is not a folder" in r.stderr, r.stderr
        assert str(damaged) not in r.stderr, r.stderr
    assert blocker.read_text() == "not a folder"


def test_a_model_that_reads_no_tmq_is_drawn_over_its_first_channel(trained, tmp_path):
    """It was refused ("add 0 to the channels"), and adding 0 was refused as another model's channels: a model
    trained without TMQ had no --predict at all."""
    _, data, tmq_run, tmq_ckpt = trained
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"max_epochs": 1, "validation_batch_size": 2},
                    data={"channels": [3, 1, 2]})
    r = run_host(run, "--quiet")
    assert r.returncode in (0, 1), r.stderr
    out = tmp_path / "pred"
    r = run_host(run, "--predict", tmp_path / "out" / "checkpoint-epoch1.pt", "--out", out, "--samples", 1)
    assert r.returncode == 0, r.stderr
    assert (f"note: {run}:") in r.stderr and ("[data] channels = [3, 1, 2] selects no TMQ (channel 0): the pictures "
                                            "show channel 3 (UBOT), the first it selects, in grey") in r.stderr
    sample = sorted((data / "validation").glob("*.h5"))[0]
    pred = np.load(out / "sample-000000.npy")
    with Image.open(out / "sample-000000.png") as im:
        pixels = np.asarray(im.convert("RGB"))
    assert (pixels[:64] == expected_picture(sample, data / "stats.h5", pred, channel=3)).all()
    # The legend names UBOT where the other says TMQ; its other lines are the same.
    assert run_host(tmq_run, "--predict", tmq_ckpt, "--out", tmp_path / "tmq", "--samples", 1).returncode == 0
    with Image.open(tmp_path / "tmq" / "sample-000000.png") as im:
        tmq_legend = np.asarray(im.convert("RGB"))[64:]
    legend = pixels[64:]
    assert legend.shape == tmq_legend.shape
    assert (legend[:12] != tmq_legend[:12]).any() and (legend[12:] == tmq_legend[12:]).all()


def test_a_checkpoint_with_non_finite_logits_predicts_nothing(trained, tmp_path):
    """As --evaluate, which gives such a checkpoint no score (status 4): its argmax was written as class 0
    everywhere, with status 0, and an earlier --predict's files were removed for it."""
    _, _, run, ckpt = trained
    state = torch.load(ckpt, weights_only=True)
    for name in [k for k, v in state["model"].items() if v.dim() == 4][:3]:
        state["model"][name] *= 1e30
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    out = tmp_path / "pred"
    assert run_host(run, "--predict", ckpt, "--out", out, "--samples", 1).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_host(run, "--predict", bad, "--out", out, "--set", "run.overwrite=true")
    assert r.returncode == 4, r.stderr[-3000:]
    assert (f"--predict {bad}: the logits of validation sample 0 are not finite" in r.stderr and
            "wrote the predictions of the 0 samples before it" in r.stderr), r.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_overwrite_removes_earlier_predictions_only_once_the_checkpoint_is_read(trained, tmp_path):
    """With [run] overwrite = true the earlier files were removed first, and a checkpoint then refused left
    the folder empty."""
    _, _, run, ckpt = trained
    out = tmp_path / "pred"
    assert run_host(run, "--predict", ckpt, "--out", out, "--samples", 1).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    r = run_host(run, "--predict", junk, "--out", out, "--set", "run.overwrite=true")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "removed" not in r.stderr and str(junk) in r.stderr, r.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_files_of_other_programs_that_look_like_temporaries_are_left(trained, tmp_path):
    """--out may be any folder of the user's: only the temporaries of prediction names are this tool's."""
    _, _, run, ckpt = trained
    out = tmp_path / "mine"
    out.mkdir()
    gone = 2 ** 22 + 12345
    theirs = [out / f"thesis.tmp-{gone}", out / f".profile.tmp{gone}", out / f"checkpoint-epoch1.pt.tmp-{gone}"]
    for f in theirs:
        f.write_text("keep me")
    ours = out / f".sample-000000.npy.tmp{gone}-3"
    ours.write_bytes(b"half")
    r = run_host(run, "--predict", ckpt, "--out", out, "--samples", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(f.read_text() == "keep me" for f in theirs)
    assert not ours.exists() and f"removed {ours}" in r.stderr


def test_a_cluster_runs_config_toml_predicts_over_its_numpy_data(tmp_path):
    """README's cluster step 4 predicted with configs/reference.toml (the hdf5 reader) over the numpy form of
    step 1, which that reader refuses; it now predicts with the run's own config.toml: step 2's run files
    (the prefetch reader over npy), scaled down to the CPU."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert re.search(r"^build/core/deepcam-host runs/slurm/JOB_1/config\.toml \\\n +--predict runs/slurm/JOB_1/",
                     readme, re.M), "README's step 4 predicts with the run's config.toml"
    h5 = synth(tmp_path / "h5", train=4, validation=3)
    npy = tmp_path / "npy"
    convert(h5, npy, "--threads", "1", "--quiet")
    run = tmp_path / "slurm" / "7_1"
    r = run_host(REPO_ROOT / "configs/reference.toml", REPO_ROOT / "configs/systems/dgxh100_16x8.toml", "--quiet",
                 *(x for item in (f"run.output_dir={run}", f"data.root={npy}", "run.seed=auto", "run.max_epochs=1",
                                  "run.device=cpu", "run.precision=fp32", "run.memory_format=contiguous",
                                  "run.threads=1", "reader.threads=1", "reader.source.io=pread",
                                  "model.width=0.0625", "model.middle_blocks=1") for x in ("--set", item)))
    assert r.returncode in (0, 1), r.stderr[-3000:]
    out = tmp_path / "predictions"
    r = run_host(run / "config.toml", "--predict", run / "checkpoint-epoch1.pt", "--out", out, "--samples", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'name = "npy"' in r.stderr and f"wrote the predictions of 2 validation samples to {out}" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "sample-000000.npy", "sample-000000.png", "sample-000001.npy", "sample-000001.png"]
