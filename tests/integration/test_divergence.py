"""Runs that diverge for real (an absurd learning rate makes the weights, and
then the loss, NaN): the run stops with a message naming the step and the
epoch, exits with status 4, writes no checkpoint, and its MLPerf log ends
with run_stop status "aborted" and still passes the official checker's
per-line checks."""

import re

import h5py
import pytest

from helpers import mlperf_check, read_events, run_host, synth, write_run

DIVERGED = 4  # deepcam::kDivergedStatus


def checker_complaints(log):
    """The checker's failed per-line checks, and its missing required keys as
    sorted tuples of alternatives (it names them in no fixed order)."""
    status, output = mlperf_check(log)
    assert "Running compliance on file" in output, output
    assert "Traceback" not in output and "Could not parse" not in output, output
    failed = re.findall(r"Failed checks for (\w+)", output) + re.findall(r"CHECK for '(\w+)' failed", output)
    missing = [tuple(sorted(re.findall(r"'(\w+)'", line))) for line in output.splitlines()
               if "Required AT_LEAST_ONE" in line]
    return status, sorted(failed), sorted(missing), output


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 8 training samples in batches of 2: 4 steps per epoch.
    return synth(tmp_path_factory.mktemp("diverge") / "data", train=8, validation=4)


def diverge(tmp_path, data, *sets, **changes):
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", **changes)
    args = [run, "--set", "optimizer.lr=1e9"]
    for s in sets:
        args += ["--set", s]
    r = run_host(*args)
    return tmp_path / "out", r


def test_nan_loss_stops_the_run_at_the_step_it_appears(tmp_path, data):
    # The first update (step 1) uses LR 1e9; the loss of step 2 is NaN, and
    # the check at the logging interval (every 2 steps) stops the run there.
    out, r = diverge(tmp_path, data, run={"max_epochs": 2, "checkpoint_every": 1})
    assert r.returncode == DIVERGED, r.stderr
    assert re.search(r"training diverged at step 2 \(epoch 1\): the loss is (NaN|-?Infinity)\. ", r.stderr), r.stderr
    assert ("lower [optimizer] lr, or the schedule's [scheduler] lr_warmup_factor if it raises the rate above lr "
            "and run again") in r.stderr, r.stderr[-2000:]
    # No step past the interval that found it, no validation, no checkpoint.
    assert "epoch 1 step 4/4" not in r.stderr and "epoch 1 validation:" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "mlperf.log"]

    lines = read_events(out / "mlperf.log")
    keys = [l["key"] for l in lines]
    assert keys[-3:] == ["epoch_start", "epoch_stop", "run_stop"], keys
    assert lines[-1]["metadata"]["status"] == "aborted" and lines[-1]["metadata"]["epoch_num"] == 1
    assert lines[-2]["metadata"]["epoch_num"] == 1 and lines[-2]["metadata"]["step_num"] == 2
    # The epoch was cut short, not finished.
    assert lines[-2]["metadata"]["status"] == "aborted"
    # The NaN was caught before it was logged as a training loss.
    assert "train_loss" not in keys

    status, failed, missing, output = checker_complaints(out / "mlperf.log")
    assert status != 0
    # Every line passes its checks; what a run stopped before its first
    # validation cannot have is the evaluation events.
    assert failed == [], output
    assert missing == [("block_start", "eval_start"), ("block_stop", "eval_stop"), ("eval_accuracy",)], output


def test_first_bad_step_is_named_when_only_the_epoch_end_checks(tmp_path, data):
    # logging_frequency 0: nothing reads the loss until the end of the epoch,
    # two NaN steps later; the message still names step 2, where it started.
    out, r = diverge(tmp_path, data, run={"max_epochs": 2, "logging_frequency": 0})
    assert r.returncode == DIVERGED, r.stderr
    assert re.search(r"training diverged at step 2 \(epoch 1\): the loss is (NaN|-?Infinity)\. ", r.stderr), r.stderr
    lines = read_events(out / "mlperf.log")
    assert [l["key"] for l in lines][-2:] == ["epoch_stop", "run_stop"]
    assert lines[-2]["metadata"]["step_num"] == 4  # the epoch ran to its end before the check
    assert lines[-2]["metadata"]["status"] == "aborted"
    assert lines[-1]["metadata"]["status"] == "aborted"


def test_nan_weights_from_the_last_update_of_an_epoch_stop_at_validation(tmp_path, data):
    # With 4 batches per optimizer step the only update of epoch 1 comes after
    # its last loss; the validation loss is the first NaN, and the run stops
    # before epoch 2.
    out, r = diverge(tmp_path, data, run={"max_epochs": 2, "gradient_accumulation_frequency": 4})
    assert r.returncode == DIVERGED, r.stderr
    assert re.search(r"training diverged at step 4 \(epoch 1\): the validation loss is (NaN|-?Infinity)\. ",
                     r.stderr), r.stderr
    assert not list(out.glob("*.pt"))
    lines = read_events(out / "mlperf.log")
    keys = [l["key"] for l in lines]
    assert keys[-6:] == ["eval_start", "eval_accuracy", "eval_loss", "eval_stop", "epoch_stop", "run_stop"], keys
    assert "epoch_start" not in keys[keys.index("eval_start"):]
    assert lines[-1]["metadata"]["status"] == "aborted"
    assert lines[-2]["metadata"]["status"] == "aborted"
    eval_loss = (out / "mlperf.log").read_text().splitlines()[keys.index("eval_loss")]
    assert re.search(r'"value": (NaN|-?Infinity),', eval_loss), eval_loss  # json.dumps' spelling

    # A log with one validation fails only the accuracy target, as any run
    # that did not reach it.
    status, failed, missing, output = checker_complaints(out / "mlperf.log")
    assert status != 0
    assert failed == ["eval_accuracy"] and missing == [], output
    assert "v['value'] >= 0.82" in output


@pytest.mark.parametrize("optimizer, sets", [
    # Adam's first step size is lr / (1 - 0.9): 3.4e39, past float32's largest value (3.4028e38).
    ("adam", ["optimizer.lr=3.4e38"]),
    ("adamw", ["optimizer.lr=3.4e38"]),
    # LAMB's step is lr x the trust ratio (a layer's weight norm over its update's norm), above 1 for some.
    ("lamb", ["optimizer.lr=3.4e38"]),
])
def test_a_rate_whose_update_overflows_float32_diverges_as_the_float32_update_does(tmp_path, data, optimizer,
                                                                                     sets):
    """A rate within float32's range whose derived scalar is not: the update is infinite, as the CUDA
    kernels compute it, and the run stops as diverged. LibTorch refused the scalar, which ended the run as
    an internal error (exit 3)."""
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"max_epochs": 2},
                    optimizer={"name": optimizer})
    args = [run]
    for s in sets:
        args += ["--set", s]
    r = run_host(*args)
    assert r.returncode == DIVERGED, r.stderr[-3000:]
    assert re.search(r"training diverged at step 2 \(epoch 1\): the (loss|gradient norm) is (NaN|-?Infinity)\. ",
                     r.stderr), r.stderr[-3000:]
    assert "internal error" not in r.stderr
    lines = read_events(tmp_path / "out" / "mlperf.log")
    assert lines[-1]["key"] == "run_stop" and lines[-1]["metadata"]["status"] == "aborted"


def test_a_cosine_schedule_s_divergence_hint_names_its_floor(tmp_path, data):
    """A cosine's eta_min far above lr makes the rate climb to it: the hint named only lr and the warm-up."""
    out, r = diverge(tmp_path, data, "scheduler.eta_min=1e9",
                     scheduler={"name": "cosine_annealing", "t_max": 1, "milestones": None})
    assert r.returncode == DIVERGED, r.stderr[-2000:]
    assert ("lower [optimizer] lr, or the schedule's [scheduler] lr_warmup_factor or [scheduler] eta_min if it "
            "raises the rate above lr and run again") in r.stderr, r.stderr[-2000:]


def test_an_amp_fp16_divergence_hint_names_float16_s_range(tmp_path, data):
    """A float16 overflow in the forward pass ends an amp_fp16 run as diverged whatever the rate; the hint
    only said to lower lr."""
    out, r = diverge(tmp_path, data, "run.precision=amp_fp16")
    assert r.returncode == DIVERGED, r.stderr[-2000:]
    assert ("and run again. Under amp_fp16 (--set run.precision=amp_fp16) activations beyond float16's largest "
            "value (65504) end a run so too: amp_bf16 has float32's range") in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("table", ["reader", "reader.source"])
def test_a_divergence_from_data_a_reader_lets_through_names_the_setting_that_let_it(tmp_path, table):
    """A NaN in a sample makes the loss NaN at once: the message only said to lower the learning rate, though
    the run file had switched the reader's check off (or its reader plugin has none)."""
    data = synth(tmp_path / "data", train=4, validation=2, height=32, width=48)
    for f in sorted((data / "train").glob("*.h5")):
        with h5py.File(f, "r+") as h:
            h["climate/data"][0, 0, 0] = float("nan")
    # Behind the prefetch reader, the source's table says whether its files are checked.
    nested = ({"reader": {"name": "prefetch", "depth": 2, "threads": 1},
               "reader.source": {"name": "hdf5", "threads": 1}} if table == "reader.source" else {})
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"logging_frequency": 1}, **nested)
    r = run_host(run, "--set", f"{table}.check_finite=false")
    assert r.returncode == DIVERGED, r.stderr[-2000:]
    assert re.search(r"training diverged at step 1 \(epoch 1\): the loss is NaN\. ", r.stderr), r.stderr[-2000:]
    assert ("and run again. A NaN or infinity in the data ends a run so too, and nothing refuses it here: "
            f"--set {table}.check_finite=false\n") in r.stderr, r.stderr[-2000:]
    # With the check on (the default), the reader refuses the file, naming it.
    r = run_host(run, "--set", "run.overwrite=true")
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.search(r"train/data-\S+\.h5: climate/data at \(0, 0, 0\) holds nan; ", r.stderr), r.stderr[-2000:]
    assert "nothing refuses it here" not in r.stderr


def test_a_divergence_with_the_data_checked_does_not_blame_the_data(tmp_path, data):
    out, r = diverge(tmp_path, data, run={"max_epochs": 2})
    assert r.returncode == DIVERGED, r.stderr
    assert "A NaN or infinity in the data" not in r.stderr, r.stderr[-2000:]
