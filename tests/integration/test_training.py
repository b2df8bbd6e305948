"""End-to-end runs of deepcam-host on small synthetic data: the MLPerf log
against the official checker, checkpoints against PyTorch's torch.load and
torch.save, --evaluate, resume, and refused bad data."""

import json
import math
import re
import shutil
import tomllib
from collections import OrderedDict

import h5py
import numpy as np
import pytest
import torch

from helpers import REPO_ROOT, SGD, mlperf_check, read_events, run_host, synth, write_run

SPEC_ORDER = ["submission_benchmark", "submission_org", "submission_division", "submission_status",
              "submission_platform", "init_start", "cache_clear", "seed", "number_of_ranks",
              "number_of_nodes", "accelerators_per_node", "global_batch_size", "batchnorm_group_size",
              "gradient_accumulation_frequency", "num_workers"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("train") / "data", train=8, validation=4)


# A submission_org that json.dumps escapes in every way a run file's string allows (one holds no
# control character but a tab): quote, backslash, tab, Latin-1 and a character beyond the BMP (a
# surrogate pair).
ODD_ORG = "tests \"q\" \\ \t \u00e9 \U0001F600"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data):
    """Two epochs of a tiny model; the target is unreachable, so it runs both."""
    tmp = tmp_path_factory.mktemp("short")
    run = write_run(tmp / "run.toml", data, tmp / "out", run={"max_epochs": 2, "checkpoint_every": 1},
                    mlperf={"org": ODD_ORG})
    r = run_host(run)
    assert r.returncode == 1, r.stderr  # the run ended without reaching the target
    return tmp / "out", r


def test_log_has_every_key_in_spec_order(short_run):
    out, _ = short_run
    lines = read_events(out / "mlperf.log")
    keys = [l["key"] for l in lines]
    assert keys[:len(SPEC_ORDER)] == SPEC_ORDER
    rest = keys[len(SPEC_ORDER):]
    assert rest[:5] == ["opt_name", "opt_lr", "opt_betas", "opt_eps", "opt_weight_decay"]
    i = rest.index("scheduler_type")
    assert rest[i:i + 5] == ["scheduler_type", "scheduler_milestones", "scheduler_decay_rate",
                             "scheduler_lr_warmup_steps", "scheduler_lr_warmup_factor"]
    assert rest[i + 5:i + 9] == ["train_samples", "eval_samples", "init_stop", "run_start"]
    assert keys[-1] == "run_stop" and lines[-1]["metadata"]["status"] == "aborted"
    for l in lines:
        assert list(l) == ["namespace", "time_ms", "event_type", "key", "value", "metadata"]
        assert {"file", "lineno"} <= set(l["metadata"])
    by_key = {l["key"]: l for l in lines}
    assert by_key["train_samples"]["value"] == 8 and by_key["eval_samples"]["value"] == 4
    assert by_key["global_batch_size"]["value"] == 2
    assert by_key["num_workers"]["value"] == 1  # the ranks, as the MLCommons reference logs them
    # Nothing dropped the page cache before this run: the log does not say it did.
    assert by_key["cache_clear"]["value"] is False
    assert by_key["opt_betas"]["value"] == [0.9, 0.999]
    epochs = [l["metadata"]["epoch_num"] for l in lines if l["key"] == "epoch_start"]
    assert epochs == [1, 2]
    # The step each epoch starts at, as the reference's epoch_start says.
    assert [l["metadata"]["step_num"] for l in lines if l["key"] == "epoch_start"] == [0, 4]
    # Four steps per epoch, logged every 2 steps; an epoch's end is a logging point already (it was logged
    # twice, with the same figures).
    steps = [l["metadata"]["step_num"] for l in lines if l["key"] == "train_loss"]
    assert steps == [2, 4, 6, 8]
    evals = [l for l in lines if l["key"] == "eval_accuracy"]
    assert len(evals) == 2 and all(0.0 <= e["value"] <= 1.0 for e in evals)
    # Each epoch: its two logging points (learning_rate, train_accuracy, train_loss each), then
    # its validation (SPEC 8.2), then its checkpoint (checkpoint_every = 1), inside the timed
    # region and so logged, as the reference logs its saves.
    for epoch in (1, 2):
        block = [l["key"] for l in lines if l["metadata"].get("epoch_num") == epoch and l["key"] != "run_stop"]
        assert block == (["epoch_start"] + ["learning_rate", "train_accuracy", "train_loss"] * 2
                         + ["eval_start", "eval_accuracy", "eval_loss", "eval_stop", "epoch_stop"]
                         + ["save_start", "save_stop"]), block
    saves = [l for l in lines if l["key"] in ("save_start", "save_stop")]
    assert [(l["event_type"], l["metadata"]["epoch_num"], l["metadata"]["step_num"]) for l in saves] == [
        ("INTERVAL_START", 1, 4), ("INTERVAL_END", 1, 4), ("INTERVAL_START", 2, 8), ("INTERVAL_END", 2, 8)]


def test_a_log_with_saves_between_epochs_fails_the_checker_only_on_accuracy(short_run):
    out, _ = short_run
    assert any(l["key"] == "save_start" for l in read_events(out / "mlperf.log"))
    status, output = mlperf_check(out / "mlperf.log")
    problems = [l for l in output.splitlines() if l.startswith(("WARNING", "ERROR"))]
    assert status != 0 and problems == ["WARNING -  Failed checks for eval_accuracy : v['value'] >= 0.82 and "
                                        "v['value'] <= 1.", "ERROR - FAILED"], output


def test_an_epoch_that_ends_between_logging_points_logs_its_last_step(tmp_path, data):
    """Every 3 steps of 4-step epochs: steps 3 and 6 are logging points, and each epoch's last step (4, 8) is
    logged once more, so that no step of an epoch goes unchecked or unlogged before its validation."""
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"max_epochs": 2, "logging_frequency": 3})
    r = run_host(run)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = read_events(tmp_path / "out" / "mlperf.log")
    for key in ("learning_rate", "train_accuracy", "train_loss"):
        assert [l["metadata"]["step_num"] for l in lines if l["key"] == key] == [3, 4, 6, 8], key


def test_every_log_line_is_what_json_dumps_writes(short_run):
    # SPEC 8.3: numbers in their shortest round-trip form, strings escaped as json.dumps escapes them.
    out, _ = short_run
    raw = (out / "mlperf.log").read_text().splitlines()
    for line in raw:
        assert line == ":::MLLOG " + json.dumps(json.loads(line[len(":::MLLOG "):])), line
    org = [e for e in read_events(out / "mlperf.log") if e["key"] == "submission_org"]
    assert [e["value"] for e in org] == [ODD_ORG]


def test_run_writes_resolved_config_and_progress(short_run):
    out, r = short_run
    config = (out / "config.toml").read_text()
    assert "[optimizer]" in config and "weight_decay = 1e-06" in config  # a default filled in
    assert "libdeepcam_model_deeplabv3plus.so" in config
    assert re.search(r"epoch 1 step 2/4 +loss [0-9.]+ +iou [0-9.]+ +[0-9.]+ samples/s +\d\d:\d\d left", r.stderr)
    assert not list(out.glob("*.partial*")) and not list(out.glob("*.tmp-*"))


def test_checkpoint_is_read_by_torch_load_under_the_model_names(short_run):
    out, _ = short_run
    ckpt = torch.load(out / "checkpoint-epoch2.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8
    names = list(ckpt["model"].keys())
    assert names[0] == "xception_features.conv1.weight"
    assert names[-1] == "upsample.last_deconv.0.weight"
    assert ckpt["model"]["xception_features.bn1.bn.num_batches_tracked"].item() == 8
    assert set(ckpt["optimizer"]) == {"state", "param_groups"}
    assert (out / "checkpoint-epoch1.pt").is_file()


def test_model_names_at_full_depth_are_the_references(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, model={"middle_blocks": 16, "width": 0.03125},
                    run={"max_epochs": 1})
    assert run_host(run).returncode == 1
    ckpt = torch.load(out / "checkpoint-epoch1.pt", weights_only=True)
    reference = [l.split()[0] for l in (REPO_ROOT / ".." / "shared" / "testdata" /
                                        "reference_state_dict.txt").read_text().splitlines()]
    assert list(ckpt["model"].keys()) == reference


def evaluate(run, ckpt):
    r = run_host(run, "--evaluate", ckpt)
    assert r.returncode == 0, r.stderr
    values = dict(l.split() for l in r.stdout.splitlines() if l.startswith("eval_"))
    return float(values["eval_accuracy"]), float(values["eval_loss"])


def test_python_written_checkpoint_is_read_back(tmp_path, short_run, data):
    out, _ = short_run
    ours = torch.load(out / "checkpoint-epoch2.pt", weights_only=True)
    # As the reference writes it: an OrderedDict state dict through torch.save.
    same = OrderedDict((k, v.clone()) for k, v in ours["model"].items())
    torch.save({"step": 8, "epoch": 2, "model": same}, tmp_path / "python.pt")
    changed = OrderedDict((k, v * 0.5 if v.is_floating_point() else v) for k, v in ours["model"].items())
    torch.save({"step": 8, "epoch": 2, "model": changed}, tmp_path / "changed.pt")
    run = write_run(tmp_path / "run.toml", data, tmp_path / "eval")
    a = evaluate(run, out / "checkpoint-epoch2.pt")
    b = evaluate(run, tmp_path / "python.pt")
    c = evaluate(run, tmp_path / "changed.pt")
    assert a == b
    assert c != a
    lines = read_events(tmp_path / "eval" / "evaluate-mlperf.log")
    assert [l["key"] for l in lines] == ["eval_start", "eval_accuracy", "eval_loss", "eval_stop"]
    # The log is the last evaluation's (the changed weights), and both files name its checkpoint.
    assert lines[1]["value"] == pytest.approx(c[0], rel=1e-12)
    assert lines[2]["value"] == pytest.approx(c[1], rel=1e-12)
    assert lines[0]["metadata"]["checkpoint"] == str(tmp_path / "changed.pt")
    config = (tmp_path / "eval" / "evaluate-config.toml").read_text()
    assert config.splitlines()[0] == f"# deepcam-host --evaluate {tmp_path / 'changed.pt'}"
    assert tomllib.loads(config)["run"]["resume"] == ""


def test_evaluate_of_weights_that_give_a_nan_loss_is_no_score(tmp_path, short_run, data):
    """Finite weights near float32's top pass the checkpoint's checks but overflow the logits: the evaluation
    printed an IoU of NaN logits and a NaN loss, and exited 0."""
    ckpt = torch.load(short_run[0] / "checkpoint-epoch2.pt", weights_only=True)
    ckpt["model"]["xception_features.conv1.weight"].fill_(3e38)
    torch.save(ckpt, tmp_path / "huge.pt")
    r = run_host(write_run(tmp_path / "run.toml", data, tmp_path / "eval"), "--evaluate", tmp_path / "huge.pt")
    assert r.returncode == 4, r.stderr[-3000:]
    assert (f"--evaluate {tmp_path / 'huge.pt'}: the validation loss is NaN: this checkpoint's weights give "
            "non-finite logits") in r.stderr, r.stderr[-3000:]
    assert not [l for l in r.stdout.splitlines() if l.startswith("eval_")], r.stdout[-2000:]  # the score lines
    # The log's eval_accuracy was the IoU of the NaN logits' argmax, beside eval_loss NaN.
    logged = {l["key"]: l["value"] for l in read_events(tmp_path / "eval" / "evaluate-mlperf.log")}
    assert math.isnan(logged["eval_accuracy"]) and math.isnan(logged["eval_loss"]), logged


def test_evaluate_in_a_training_runs_folder_keeps_its_record(tmp_path, short_run, data):
    out = tmp_path / "out"
    shutil.copytree(short_run[0], out)
    config = (out / "config.toml").read_bytes()
    log = (out / "mlperf.log").read_bytes()
    run = write_run(tmp_path / "run.toml", data, out)
    evaluate(run, out / "checkpoint-epoch2.pt")
    assert (out / "config.toml").read_bytes() == config
    assert (out / "mlperf.log").read_bytes() == log
    assert f'output_dir = "{out}"' in (out / "evaluate-config.toml").read_text()
    assert [l["key"] for l in read_events(out / "evaluate-mlperf.log")][0] == "eval_start"


def test_checkpoint_with_wrong_shapes_is_refused(tmp_path, short_run, data):
    out, _ = short_run
    ours = torch.load(out / "checkpoint-epoch2.pt", weights_only=True)
    ours["model"]["conv2.weight"] = torch.zeros(1, 2, 3, 3)
    torch.save(ours, tmp_path / "bad.pt")
    run = write_run(tmp_path / "run.toml", data, tmp_path / "eval")
    r = run_host(run, "--evaluate", tmp_path / "bad.pt")
    assert r.returncode == 2 and "bad.pt: model entry 'conv2.weight' has shape 1x2x3x3" in r.stderr


def test_resume_continues_at_the_next_epoch(tmp_path, short_run, data):
    out, _ = short_run
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    run={"max_epochs": 2, "resume": str(out / "checkpoint-epoch1.pt")},
                    mlperf={"cache_clear": True})
    r = run_host(run)
    assert r.returncode == 1, r.stderr
    assert "resumed from" in r.stderr and "at epoch 1, step 4" in r.stderr
    lines = read_events(tmp_path / "out" / "mlperf.log")
    # What the job did before the run (run.sub's CLEAR_CACHES=1), as the run file says.
    assert [l["value"] for l in lines if l["key"] == "cache_clear"] == [True]
    assert [l["metadata"]["epoch_num"] for l in lines if l["key"] == "epoch_start"] == [2]
    # Same seed, same data order, same state: the resumed epoch equals the original.
    resumed = [l["value"] for l in lines if l["key"] == "eval_loss"]
    original = [l["value"] for l in read_events(out / "mlperf.log") if l["key"] == "eval_loss"]
    assert resumed[0] == pytest.approx(original[1], rel=1e-4)


def test_gradient_accumulation_divides_each_loss_by_k(tmp_path):
    """SPEC 4.1 and 7: over k batches each loss is divided by k. Over two equal batches, k = 2 then
    steps as k = 1 over one of them (with plain SGD, a gradient twice as large would step twice as
    far), and logs half its loss; global_batch_size is not multiplied by k."""
    synth(tmp_path / "one", train=1, validation=2)
    sample = next((tmp_path / "one" / "train").glob("*.h5"))
    runs = {}
    for k in (1, 2):
        root = tmp_path / f"data-{k}"
        shutil.copytree(tmp_path / "one", root, ignore=shutil.ignore_patterns("train"))
        (root / "train").mkdir()
        for n in range(2 * k):  # 2 k copies of one sample: every batch of 2 is the same
            shutil.copy(sample, root / "train" / f"data-2106-01-01-0{n}-1.h5")
        out = tmp_path / f"k{k}"
        r = run_host(write_run(tmp_path / f"k{k}.toml", root, out, optimizer=SGD, run={
            "gradient_accumulation_frequency": k, "logging_frequency": 1, "checkpoint_every": 1}))
        assert r.returncode in (0, 1), r.stderr
        runs[k] = (read_events(out / "mlperf.log"), torch.load(out / "checkpoint-epoch1.pt", weights_only=True))
    (log1, ckpt1), (log2, ckpt2) = runs[1], runs[2]
    assert (ckpt1["step"], ckpt2["step"]) == (1, 2)
    compared = 0
    for name, value in ckpt1["model"].items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # BatchNorm's statistics are updated by each batch
        assert torch.equal(value, ckpt2["model"][name]), name
        compared += 1
    assert compared > 100
    first_loss = [next(e["value"] for e in log if e["key"] == "train_loss") for log in (log1, log2)]
    assert first_loss[1] == first_loss[0] / 2
    assert [next(e["value"] for e in log if e["key"] == "global_batch_size") for log in (log1, log2)] == [2, 2]


def test_quickstart_reaches_the_target_and_passes_the_checker(tmp_path):
    """The default job, as README's first command runs it, on its own data."""
    data = synth(tmp_path / "data", train=64, validation=16, height=96, width=144, seed=11)
    logs = {}
    for division in ("open", "closed"):
        out = tmp_path / division
        r = run_host(REPO_ROOT / "configs" / "quickstart.toml", "--set", f"data.root={data}",
                     "--set", f"run.output_dir={out}", "--set", f"mlperf.division={division}")
        assert r.returncode == 0, r.stderr[-3000:]
        logs[division] = out / "mlperf.log"
    lines = read_events(logs["open"])
    assert lines[-1]["key"] == "run_stop" and lines[-1]["metadata"]["status"] == "success"
    # The target is reached at the end of the epoch whose validation reached it (SPEC 8.2).
    assert [l["key"] for l in lines[-5:]] == ["eval_loss", "eval_stop", "epoch_stop", "target_accuracy_reached",
                                              "run_stop"]
    assert lines[-2]["metadata"]["epoch_num"] == lines[-3]["metadata"]["epoch_num"]
    status, output = mlperf_check(logs["open"])
    assert status == 0 and "SUCCESS" in output, output
    status, output = mlperf_check(logs["closed"])
    assert status != 0
    failed = re.findall(r"CHECK for '(\w+)' failed", output)
    # The two sample counts of the real data set are the only checks that fail.
    assert sorted(failed) == ["eval_samples", "train_samples"], output
    assert "failed test:  v['value'] == 121266" in output and "failed test:  v['value'] == 15158" in output


BAD_CASES = {
    "empty": lambda f: f.write_bytes(b""),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[:5000]),
    "missing_dataset": lambda f: _edit(f, lambda h: h.__delitem__("climate/labels_0")),
    "wrong_shape": lambda f: _edit(f, lambda h: (h.__delitem__("climate/data"),
                                                 h.create_dataset("climate/data", data=np.zeros((64, 80, 16), np.float32)))),
    "nan": lambda f: _edit(f, lambda h: h["climate/data"].__setitem__((3, 4, 5), np.nan)),
    "inf": lambda f: _edit(f, lambda h: h["climate/data"].__setitem__((0, 0, 0), np.inf)),
}


def _edit(path, fn):
    with h5py.File(path, "r+") as h:
        fn(h)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_sample_is_refused_naming_the_file(tmp_path, data, case):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    victim = sorted((bad / "validation").glob("*.h5"))[1]
    BAD_CASES[case](victim)
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", bad, out)
    r = run_host(run)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("deepcam-host:")]
    assert len(errors) == 1 and victim.name in errors[0], r.stderr[-2000:]
    # The bad file is met in validation, after run_start: the run's record
    # stays (the log streamed under its final name, closed as aborted), and
    # nothing else is written, half or whole.
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "mlperf.log"], "no partial output"
    events = read_events(out / "mlperf.log")
    assert events[-1]["key"] == "run_stop" and events[-1]["metadata"]["status"] == "aborted"


def test_stats_with_the_wrong_channel_count_is_refused(tmp_path, data):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    with h5py.File(bad / "stats.h5", "r+") as h:
        for k in ("minval", "maxval", "mean", "sqmean"):
            v = h["climate/" + k][:8]
            del h["climate/" + k]
            h["climate/" + k] = v
    run = write_run(tmp_path / "run.toml", bad, tmp_path / "out")
    r = run_host(run)
    assert r.returncode == 2 and "stats.h5" in r.stderr
    assert not (tmp_path / "out").exists()


def test_an_accumulation_longer_than_the_whole_run_is_noted(tmp_path, data):
    # 8 samples in batches of 2: 4 batches an epoch, 8 in 2 epochs; 9 per optimizer step is no step at all, and
    # both epochs gave the same losses without a word.
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={"max_epochs": 2, "target_iou": 1.0,
                                                            "gradient_accumulation_frequency": 9})
    r = run_host(run, "--quiet")
    assert r.returncode == 1, r.stderr[-3000:]
    line = next(n for n, text in enumerate(run.read_text().splitlines(), 1)
                if text.startswith("gradient_accumulation_frequency"))
    assert (f"deepcam-host: note: {run}:{line} [run] gradient_accumulation_frequency = 9 is more than the 8 batches "
            "this run reads (2 epochs of 4): it makes no optimizer step, and the weights stay as they are") \
        in r.stderr, r.stderr[-3000:]
    r = run_host(run, "--quiet", "--set", "run.gradient_accumulation_frequency=8",
                 "--set", f"run.output_dir={tmp_path / 'out8'}")
    assert r.returncode == 1 and "makes no optimizer step" not in r.stderr, r.stderr[-3000:]
