"""Checkpoints as input (issue 9 section 2, issue 10 section 2): every field
checked and named with the file, the reference's DistributedDataParallel
keys ("module."), bit-exact resume with a gradient accumulation that spans
epochs, temporary files of killed runs, and runs that would overwrite the
record of another."""

import json
import os
import re
import shutil
import subprocess
from collections import OrderedDict

import pytest
import torch

from helpers import convert, read_events, run_host, synth, write_run

# 6 training samples, batches of 2: 3 batches per epoch, so that an
# accumulation over 2 batches spans every epoch boundary.
ODD = {"max_epochs": 1, "target_iou": 1.0, "logging_frequency": 1, "train_batch_size": 2,
       "gradient_accumulation_frequency": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("ckh") / "data", train=6, validation=2, seed=8)


@pytest.fixture(scope="module")
def npy_data(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("ckh-npy") / "data"
    return convert(data, out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """One epoch of the small model: its checkpoint (at step 3, mid-accumulation)."""
    tmp = tmp_path_factory.mktemp("ckh-run")
    run = write_run(tmp / "run.toml", data, tmp / "out", run=ODD)
    r = run_host(run)
    assert r.returncode == 1, r.stderr
    return tmp / "out" / "checkpoint-epoch1.pt"


def edited(tmp_path, trained, edit, name="edited.pt"):
    ckpt = torch.load(trained, weights_only=True)
    edit(ckpt)
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def resume(tmp_path, data, ckpt, **run):
    cfg = write_run(tmp_path / "resume.toml", data, tmp_path / "resumed",
                    run={**ODD, "max_epochs": 2, "resume": str(ckpt), **run})
    return run_host(cfg)


def evaluate(tmp_path, data, ckpt, **model):
    cfg = write_run(tmp_path / "eval.toml", data, tmp_path / "eval", model=model)
    return run_host(cfg, "--evaluate", ckpt)


def figures(r):
    assert r.returncode == 0, r.stderr
    return [l for l in r.stdout.splitlines() if l.startswith("eval_")]


# --- the reference's DistributedDataParallel keys ---------------------------

def test_module_prefixed_state_dict_from_python_evaluates_and_resumes_as_ours(tmp_path, data, trained):
    ours = torch.load(trained, weights_only=True)
    # As the MLCommons training script saves it: the model under DDP.
    ddp = OrderedDict(("module." + k, v.clone()) for k, v in ours["model"].items())
    python = tmp_path / "ddp.pt"
    torch.save({"step": ours["step"], "epoch": ours["epoch"], "model": ddp, "optimizer": ours["optimizer"]}, python)
    assert figures(evaluate(tmp_path, data, python)) == figures(evaluate(tmp_path, data, trained))
    r = resume(tmp_path, data, python)
    assert r.returncode == 1, r.stderr
    assert "resumed from" in r.stderr and "at epoch 1, step 3" in r.stderr


def test_some_keys_with_the_prefix_are_not_stripped(tmp_path, data, trained):
    def half_prefixed(c):
        c["model"] = OrderedDict((("module." + k) if i % 2 else k, v) for i, (k, v) in enumerate(c["model"].items()))
    r = evaluate(tmp_path, data, edited(tmp_path, trained, half_prefixed))
    assert r.returncode == 2 and "edited.pt: model entry" in r.stderr and "is missing" in r.stderr


# --- every field checked, named with the file -------------------------------

def drop(key):
    return lambda c: c.pop(key)


def set_to(key, value):
    return lambda c: c.__setitem__(key, value)


def first_state(c):
    return next(iter(c["optimizer"]["state"].values()))


def first_group(c):
    return c["optimizer"]["param_groups"][0]


ADAM = "'optimizer': Adam optimizer state: "
RUNNING_VAR = "xception_features.bn1.bn.running_var"
COUNTER = "xception_features.bn1.bn.num_batches_tracked"


# A valid amp_fp16 scaler's state, as torch.amp.GradScaler.state_dict() gives it.
SCALER = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
          "_growth_tracker": 3}


BAD_FIELDS = {
    "negative_step": (set_to("step", -1), "'step' is -1, expected an integer in 0.."),
    "float_step": (set_to("step", 3.5), "'step' is a Double, expected a non-negative integer"),
    "text_epoch": (set_to("epoch", "one"), "'epoch' is a String, expected a non-negative integer"),
    "vector_step": (set_to("step", torch.tensor([3, 4])), "'step' is a tensor of shape [2] and dtype Long"),
    "float_tensor_step": (set_to("step", torch.tensor(3.0)), "'step' is a tensor of shape [] and dtype Float"),
    # Above int64's range: LibTorch's conversion failed as an internal error (exit 3), naming no field.
    "uint64_step": (set_to("step", torch.tensor(2 ** 63 + 5, dtype=torch.uint64)),
                    f"'step' is {2 ** 63 + 5}, expected an integer in 0.."),
    # A cosine_annealing resume walked its recursion up to such a step, for ever, deaf to SIGTERM.
    "step_beyond_any_run": (set_to("step", 10 ** 12), "'step' is 1000000000000, expected an integer in 0..4294967296"),
    "step_below_epoch": (set_to("epoch", 7), "'step' is 3 but 'epoch' is 7"),
    # Resumed at epoch 0, step 0 (or the epoch at 0) with the optimizer's state continuing.
    "no_step_nor_epoch": (lambda c: (c.pop("step"), c.pop("epoch")),
                          "the 'optimizer' state is there but no 'step', so a resume cannot know where training "
                          "stopped"),
    "no_epoch": (drop("epoch"), "the 'optimizer' state is there but no 'epoch'"),
    "epoch_none": (set_to("epoch", None), "the 'optimizer' state is there but no 'epoch'"),
    "no_step": (drop("step"), "'epoch' is 1 but there is no 'step'"),
    "model_not_dict": (set_to("model", [1, 2]), "'model' is a GenericList, expected a dict"),
    "model_entry_not_tensor": (lambda c: c["model"].__setitem__("conv2.weight", 3),
                               "'model' entry 'conv2.weight' is a Int, expected a tensor"),
    "nan_weight": (lambda c: c["model"]["conv2.weight"].view(-1).__setitem__(0, float("nan")),
                   "model entry 'conv2.weight' holds NaN or infinite values"),
    "no_model": (drop("model"), "no 'model' state dict"),
    "no_optimizer": (drop("optimizer"), "no 'optimizer' state to resume from"),
    "moment_shape": (lambda c: first_state(c).__setitem__("exp_avg", torch.zeros(2, 2)),
                     ADAM + 'state[0]["exp_avg"] has shape [2, 2]'),
    "negative_optimizer_step": (lambda c: first_state(c).__setitem__("step", torch.tensor(-2.0)),
                                "['optimizer']['state'][0]['step'] is -2, expected a non-negative whole number"),
    "optimizer_not_dict": (set_to("optimizer", 5), "'optimizer' is a Int, expected a dict"),
    # The host's own check, for any optimizer plugin, before the plugin's.
    "nan_moment": (lambda c: first_state(c)["exp_avg"].view(-1).__setitem__(0, float("nan")),
                   "['optimizer']['state'][0]['exp_avg'] holds NaN or Inf"),
    "negative_second_moment": (lambda c: first_state(c)["exp_avg_sq"].view(-1).__setitem__(0, -1.0),
                               ADAM + 'state[0]["exp_avg_sq"] holds negative values'),
    # ATen has no isfinite for float8: a NaN moment stored so ended the resume as an internal error (exit 3).
    "nan_float8_moment": (lambda c: first_state(c).__setitem__(
        "exp_avg", torch.full_like(first_state(c)["exp_avg"], float("nan")).to(torch.float8_e4m3fn)),
        "['optimizer']['state'][0]['exp_avg'] holds NaN or Inf"),
    # torch.save writes a neg view's bit on any dtype; ATen cannot negate a uint32 (reading the step ended as
    # an internal error, exit 3).
    "neg_bit_on_uint32": (set_to("step", torch.tensor(3, dtype=torch.uint32)._neg_view()),
                          "data.pkl byte 194: neg bit on a tensor of dtype UInt32, which has no negation"),
    "betas_out_of_range": (lambda c: first_group(c).__setitem__("betas", (1.5, 0.999)),
                           ADAM + 'param_groups[0]["betas"][0] is 1.5, expected in [0, 1)'),
    "infinite_lr": (lambda c: first_group(c).__setitem__("lr", float("inf")),
                    ADAM + 'param_groups[0]["lr"] is inf, expected a finite number >= 0'),
    "negative_lr": (lambda c: first_group(c).__setitem__("lr", -0.5),
                    ADAM + 'param_groups[0]["lr"] is -0.5, expected a finite number >= 0'),
    "written_by_adamw": (lambda c: first_group(c).__setitem__("decoupled_weight_decay", True),
                         ADAM + 'param_groups[0]["decoupled_weight_decay"] is True: written by AdamW'),
    "optimizer_name_not_text": (set_to("optimizer_name", 3), "'optimizer_name' is a Int, expected a string"),
    # Taken, with a note of "a run of 1099511627776 ranks".
    "world_size_huge": (set_to("world_size", 2**40), "'world_size' is 1099511627776, expected an integer in "
                                                     "0..16777216"),
    "train_batch_size_huge": (set_to("train_batch_size", 2**40), "'train_batch_size' is 1099511627776, expected an "
                                                                 "integer in 0..1000000"),
    # Taken without a word: the model's settings are compared only as a dict of names and values.
    "model_config_list": (set_to("model_config", [1]), "'model_config' is a GenericList, expected a dict of the "
                                                       "model's settings"),
    "model_config_key": (lambda c: c["model_config"].__setitem__(3, "x"),
                         "'model_config' has a key that is a Int, expected the name of a setting"),
    "written_by_another_optimizer": (set_to("optimizer_name", "sgd"),
                                     "'optimizer' is the state of the optimizer plugin \"sgd\", and this run's "
                                     "[optimizer] name is \"adam\": resume with [optimizer] name = \"sgd\""),
    "negative_running_var": (lambda c: c["model"][RUNNING_VAR].view(-1).__setitem__(0, -1.0),
                             f"model entry '{RUNNING_VAR}' holds negative values; it is a variance"),
    "gradient_shape": (lambda c: c["accumulated_gradients"].__setitem__("conv2.weight", torch.zeros(1)),
                       "'accumulated_gradients' entry 'conv2.weight' has shape 1 Float"),
    # A dtype was said as a shape ("has shape 16 Double, the model has 16 Float"), a scalar's as nothing.
    "weight_dtype": (lambda c: c["model"].__setitem__(RUNNING_VAR, c["model"][RUNNING_VAR].double()),
                     f"model entry '{RUNNING_VAR}' has dtype Double, the model has Float (the shape is the same: "
                     "save it as Float)"),
    "counter_dtype": (lambda c: c["model"].__setitem__(COUNTER, c["model"][COUNTER].int()),
                      f"model entry '{COUNTER}' has dtype Int, the model has Long"),
    "counter_shape": (lambda c: c["model"].__setitem__(COUNTER, torch.zeros(2, dtype=torch.long)),
                      f"model entry '{COUNTER}' has shape 2 Long, the model has scalar Long"),
    # It was taken.
    "negative_counter": (lambda c: c["model"][COUNTER].fill_(-1),
                         f"model entry '{COUNTER}' holds a negative value; it counts batches"),
    "gradient_unknown": (lambda c: c["accumulated_gradients"].__setitem__("nope", torch.zeros(1)),
                         "'accumulated_gradients' entry 'nope' is no parameter of the model"),
    # A partial gradient in part, or without the batches it sums, resumed without a word to other weights.
    "gradient_missing": (lambda c: c["accumulated_gradients"].pop("conv2.weight"),
                         "'accumulated_gradients' has no entry for the parameter 'conv2.weight'"),
    "gradients_empty": (set_to("accumulated_gradients", {}), "'accumulated_gradients' has no entry for the parameter"),
    "gradients_without_batches": (lambda c: c.pop("accumulated_batches"),
                                  "'accumulated_gradients' comes without 'accumulated_batches', the batches it sums"),
    "batches_zero": (set_to("accumulated_batches", 0),
                     "'accumulated_batches' is 0, but 'accumulated_gradients' is there"),
    "batches_without_gradients": (lambda c: c.pop("accumulated_gradients"),
                                  "'accumulated_batches' is 1, but there is no 'accumulated_gradients'"),
    "nan_gradient": (lambda c: c["accumulated_gradients"]["conv2.weight"].view(-1).__setitem__(0, float("nan")),
                     "'accumulated_gradients' entry 'conv2.weight' holds NaN or infinite values"),
    "scaled_gradient": (set_to("scaler", SCALER),
                        "holds a partial gradient ('accumulated_gradients') at step 3 written with amp_fp16's loss "
                        "scaling, and this run's precision ("),
    "scaler_scale": (set_to("scaler", {"scale": -1.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                       "growth_interval": 2000, "_growth_tracker": 0}),
                     "['scaler']['scale'] is -1, expected > 0"),
    # Complex values: the moments' checks crashed ("lt_cpu" not implemented, exit 3), a cast dropped the
    # imaginary part with only LibTorch's warning, and a 0-d number crashed converting to double.
    "complex_second_moment": (lambda c: first_state(c).__setitem__(
        "exp_avg_sq", torch.complex(first_state(c)["exp_avg_sq"], first_state(c)["exp_avg_sq"])),
        ADAM + 'state[0]["exp_avg_sq"] is a complex tensor, expected real values'),
    "complex_first_moment": (lambda c: first_state(c).__setitem__(
        "exp_avg", torch.complex(first_state(c)["exp_avg"], torch.full_like(first_state(c)["exp_avg"], 5.0))),
        ADAM + 'state[0]["exp_avg"] is a complex tensor, expected real values'),
    "complex_optimizer_step": (lambda c: first_state(c).__setitem__("step", torch.tensor(2 + 1j)),
                               "['optimizer']['state'][0]['step'] is a complex tensor, expected a number"),
    "complex_lr": (lambda c: first_group(c).__setitem__("lr", torch.tensor(0.002 + 1j)),
                   ADAM + 'param_groups[0]["lr"] is a complex tensor, expected a real number'),
    # Finite in float64, infinite as the parameter's float32: it trained on to "diverged", blaming the lr.
    "moment_beyond_float32": (lambda c: first_state(c).__setitem__(
        "exp_avg", torch.full(first_state(c)["exp_avg"].shape, 1e300, dtype=torch.float64)),
        ADAM + 'state[0]["exp_avg"] holds values beyond the range of the parameter\'s Float, which become infinite'),
    # GradScaler keeps the scale as float32: 1e300 crashed (exit 3), 1e-300 became 0 and the run "diverged".
    "scaler_scale_overflows": (set_to("scaler", dict(SCALER, scale=1e300)),
                               "['scaler']['scale'] is 1e+300, beyond float32's range, where the scale is kept"),
    "scaler_scale_underflows": (set_to("scaler", dict(SCALER, scale=1e-300)),
                                "['scaler']['scale'] is 1e-300, beyond float32's range, where the scale is kept"),
    # A subnormal float32 scale: its reciprocal overflows, the unscaled gradients were NaN, and the run
    # stopped as diverged ("lower lr").
    "scaler_scale_subnormal": (set_to("scaler", dict(SCALER, scale=1e-45)),
                               "['scaler']['scale'] is 1e-45, so small that its reciprocal, by which the gradients are "
                               "unscaled, is beyond float32's range"),
    # Taken: the count never met the interval again, and the scale never grew for the rest of the run.
    "scaler_tracker_at_interval": (set_to("scaler", dict(SCALER, _growth_tracker=2000)),
                                   "['scaler']['_growth_tracker'] is 2000, expected below "
                                   "['scaler']['growth_interval'] (2000)"),
    # GradScaler's tracker is an int32 tensor: 2^31 ended the resume as an internal error (exit 3), naming no
    # field; an interval beyond int32 never let the scale grow (and ATen's CUDA kernel takes it as an int).
    "scaler_tracker_beyond_int32": (set_to("scaler", dict(SCALER, _growth_tracker=2**31)),
                                    "['scaler']['_growth_tracker'] is 2147483648, expected an integer in 0..2147483647"),
    "scaler_interval_beyond_int32": (set_to("scaler", dict(SCALER, growth_interval=2**32 + 1)),
                                     "['scaler']['growth_interval'] is 4294967297, expected an integer in "
                                     "0..2147483647"),
    # Refused as "saved in the middle of a gradient accumulation", which its own step and frequency deny.
    "partial_ranks_at_a_whole_accumulation": (
        lambda c: c.update(partial_accumulation_ranks=2, gradient_accumulation_frequency=3),
        "'partial_accumulation_ranks' is 2, but its step 3 ends an accumulation of 'gradient_accumulation_frequency' "
        "3: no accumulation was in progress"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_a_bad_field_is_refused_naming_the_file_and_the_field(tmp_path, data, trained, case):
    edit, message = BAD_FIELDS[case]
    r = resume(tmp_path, data, edited(tmp_path, trained, edit))
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{tmp_path / 'edited.pt'}: {message}" in r.stderr, r.stderr[-2000:]
    assert "internal error" not in r.stderr


def test_a_bare_or_prefixed_state_dict_is_named_as_such(tmp_path, data, trained):
    # Both said only "no 'model' state dict" and "model entry '...' is missing".
    state = torch.load(trained, weights_only=True)["model"]
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    r = evaluate(tmp_path, data, bare)
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"{bare}: no 'model' state dict: the file holds {len(state)} tensors at its top level, as "
            "torch.save(model.state_dict()) writes a bare state dict;") in r.stderr, r.stderr[-2000:]
    assert "save {'model': model.state_dict()}" in r.stderr, r.stderr[-2000:]
    compiled = tmp_path / "compiled.pt"
    torch.save({"model": {"_orig_mod." + k: v for k, v in state.items()}}, compiled)
    r = evaluate(tmp_path, data, compiled)
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.search(rf"{re.escape(str(compiled))}: model entry '[\w.]+' is missing, and no entry of the file has a "
                     rf"name of the model's \(the file's first is '_orig_mod\.{re.escape(min(state))}'\): a prefix "
                     r"other than DistributedDataParallel's 'module\.', such as torch\.compile's '_orig_mod\.', is "
                     r"not taken off", r.stderr), r.stderr[-2000:]


def test_a_checkpoint_path_with_a_newline_is_refused_before_any_record_is_written(tmp_path, data, trained):
    # The path went into the evaluation record's header comment as it was: the newline ended the comment,
    # and the rest of the path made the file invalid TOML. A word with a control character is now refused
    # on the command line, as in a run file, naming it; nothing is written.
    odd = tmp_path / "odd\ndir"
    odd.mkdir()
    ckpt = odd / "x.pt"
    shutil.copy(trained, ckpt)
    cfg = write_run(tmp_path / "eval.toml", data, tmp_path / "eval")
    r = run_host(cfg, "--evaluate", ckpt)
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"argument 3 (after --evaluate) ({json.dumps(str(ckpt))}) holds the control character 0x0a at byte "
            f"{len(str(tmp_path / 'odd')) + 1}; write it without") in r.stderr, r.stderr
    assert not (tmp_path / "eval").exists()


def test_a_checkpoint_that_cannot_be_opened_is_named_with_the_reason(tmp_path, data):
    # A loop of links was "no such file, or not readable".
    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    cfg = write_run(tmp_path / "eval.toml", data, tmp_path / "eval")
    r = run_host(cfg, "--evaluate", loop)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"--evaluate: {loop}: cannot open: Too many levels of symbolic links" in r.stderr, r.stderr
    r = run_host(cfg, "--evaluate", tmp_path / "missing.pt")
    assert f"{tmp_path / 'missing.pt'}: cannot open: No such file or directory" in r.stderr, r.stderr


def test_a_truncated_checkpoint_is_said_to_be_truncated(tmp_path, data, trained):
    whole = trained.read_bytes()
    for keep in (10, len(whole) // 2, len(whole) - 1):
        cut = tmp_path / f"cut-{keep}.pt"
        cut.write_bytes(whole[:keep])
        r = evaluate(tmp_path, data, cut)
        assert r.returncode == 2, r.stderr[-2000:]
        assert (f"{cut}: no end of central directory record: the file is truncated (a copy or a save that did not "
                "finish?)") in r.stderr, r.stderr[-2000:]


def test_a_zero_dim_integer_tensor_step_is_accepted(tmp_path, data, trained):
    def tensors(c):
        c["step"], c["epoch"] = torch.tensor(3), torch.tensor(1, dtype=torch.int32)
    r = resume(tmp_path, data, edited(tmp_path, trained, tensors))
    assert r.returncode == 1, r.stderr
    assert "at epoch 1, step 3" in r.stderr


def test_weights_only_resume_needs_the_key_and_then_works(tmp_path, data, trained):
    weights = edited(tmp_path, trained,
                     lambda c: (c.pop("optimizer"), c.pop("accumulated_gradients"), c.pop("accumulated_batches")))
    r = resume(tmp_path, data, weights)
    assert r.returncode == 2 and "set [run] resume_weights_only = true" in r.stderr, r.stderr
    r = resume(tmp_path, data, weights, resume_weights_only=True)
    assert r.returncode == 1, r.stderr
    assert "resumed from" in r.stderr


def test_a_resume_with_another_optimizer_plugin_is_refused_naming_both(tmp_path, data, trained):
    """The checkpoint says which [optimizer] plugin's state it holds. LAMB used to be refused only for the key
    its state needs and Adam's lacks; an outside plugin whose state parses as another's would have taken it."""
    assert torch.load(trained, weights_only=True)["optimizer_name"] == "adam"
    cfg = write_run(tmp_path / "lamb.toml", data, tmp_path / "lamb", optimizer={"name": "lamb"},
                    run={**ODD, "max_epochs": 2, "resume": str(trained)})
    r = run_host(cfg)
    assert r.returncode == 2, r.stderr
    assert (f"{trained}: 'optimizer' is the state of the optimizer plugin \"adam\", and this run's [optimizer] "
            f"name is \"lamb\": resume with [optimizer] name = \"adam\", or set [run] resume_weights_only = true to "
            f"start \"lamb\" afresh from the checkpoint's weights") in r.stderr, r.stderr
    assert not (tmp_path / "lamb").exists()
    r = run_host(cfg, "--set", "run.resume_weights_only=true")
    assert r.returncode == 1, r.stderr
    assert "resumed from" in r.stderr
    assert torch.load(tmp_path / "lamb" / "checkpoint-epoch2.pt", weights_only=True)["optimizer_name"] == "lamb"


# --- another model: the key that differs ------------------------------------

@pytest.mark.parametrize("key,value,saved", [("middle_blocks", 2, "1"), ("width", 0.125, "0.0625")])
def test_a_checkpoint_of_another_model_names_the_model_key(tmp_path, data, trained, key, value, saved):
    r = evaluate(tmp_path, data, trained, **{key: value})
    assert r.returncode == 2, r.stderr
    assert (f"{trained}: written for another model: [model] {key} = {saved} in the checkpoint, "
            f"{value} in this run ({tmp_path / 'eval.toml'}:") in r.stderr, r.stderr


def test_a_checkpoint_whose_weights_fit_another_output_stride_is_taken_and_the_difference_said(
        tmp_path, data, trained):
    # DeepLab evaluates at output stride 8 what it trained at 16: the same weights, another dilation.
    r = evaluate(tmp_path, data, trained, output_stride=8)
    assert r.returncode == 0, r.stderr
    assert (f"deepcam-host: note: {trained} was written by a run with other [model] settings: [model] output_stride "
            f"= 16 in the checkpoint, 8 in this run ({tmp_path / 'eval.toml'}:") in r.stderr, r.stderr
    assert "its weights fit this model, which runs as configured" in r.stderr
    # The same settings: nothing said.
    assert "note:" not in evaluate(tmp_path, data, trained).stderr


def test_model_config_values_written_by_python_as_numbers_are_compared_as_values(tmp_path, data, trained):
    # deepcam-host writes each value as TOML text; a number (Python's torch.save) was skipped without a word.
    ckpt = torch.load(trained, weights_only=True)
    ckpt["model_config"].update(width=0.0625, middle_blocks=1.0, output_stride=8)
    torch.save(ckpt, tmp_path / "python.pt")
    r = run_host(write_run(tmp_path / "eval.toml", data, tmp_path / "eval"), "--evaluate", tmp_path / "python.pt")
    assert r.returncode == 0, r.stderr[-3000:]
    # width 0.0625 and middle_blocks 1.0 are this run's values; output_stride is not.
    assert (f"note: {tmp_path / 'python.pt'} was written by a run with other [model] settings: [model] "
            "output_stride = 8 in the checkpoint, 16 in this run") in r.stderr, r.stderr[-3000:]
    note = next(l for l in r.stderr.splitlines() if "other [model] settings" in l)
    assert "width" not in note and "middle_blocks" not in note, note
    # A value of no TOML scalar type differs from any.
    ckpt["model_config"].update(output_stride=16, width=[0.0625])
    torch.save(ckpt, tmp_path / "list.pt")
    r = run_host(tmp_path / "eval.toml", "--evaluate", tmp_path / "list.pt", "--set", "run.overwrite=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[model] width = (a GenericList) in the checkpoint, 0.0625 in this run" in r.stderr, r.stderr[-3000:]


def test_a_checkpoint_of_other_input_channels_is_refused_naming_both(tmp_path, data, trained):
    # Reordered, every weight fit and the first convolution met other fields than it learnt: a silent score.
    channels = list(range(16))
    reordered = write_run(tmp_path / "eval.toml", data, tmp_path / "eval", data={"channels": channels[::-1]})
    r = run_host(reordered, "--evaluate", trained)
    assert r.returncode == 2, r.stderr[-3000:]
    assert (f"{trained}: written for other input channels: [data] channels = [{', '.join(map(str, channels))}] in "
            f"the checkpoint, [{', '.join(map(str, channels[::-1]))}] in this run ({tmp_path / 'eval.toml'}:"
            ) in r.stderr, r.stderr[-3000:]
    assert torch.load(trained, weights_only=True)["data_channels"] == channels
    # Fewer: named by the channels, not by the first convolution's shape, in the same words.
    fewer = write_run(tmp_path / "fewer.toml", data, tmp_path / "eval", data={"channels": [0, 1, 2]})
    r = run_host(fewer, "--evaluate", trained)
    assert r.returncode == 2, r.stderr[-3000:]
    assert (f"{trained}: written for other input channels: [data] channels = [{', '.join(map(str, channels))}] in "
            f"the checkpoint, [0, 1, 2] in this run ({tmp_path / 'fewer.toml'}:") in r.stderr, r.stderr[-3000:]
    assert "use the channels it was trained on" in r.stderr
    # Fewer channels and another model key: both named, as another model.
    both = write_run(tmp_path / "both.toml", data, tmp_path / "eval", data={"channels": [0, 1, 2]},
                     model={"middle_blocks": 2})
    r = run_host(both, "--evaluate", trained)
    assert r.returncode == 2, r.stderr[-3000:]
    assert (f"{trained}: written for another model: [data] channels = [{', '.join(map(str, channels))}] in the "
            "checkpoint, [0, 1, 2] in this run") in r.stderr, r.stderr[-3000:]
    assert "[model] middle_blocks = 1 in the checkpoint, 2 in this run" in r.stderr, r.stderr[-3000:]
    # A checkpoint without the key (Python's, the reference's) is taken as it was.
    ckpt = torch.load(trained, weights_only=True)
    del ckpt["data_channels"]
    torch.save(ckpt, tmp_path / "python.pt")
    assert run_host(reordered, "--evaluate", tmp_path / "python.pt").returncode == 0


# --- bit-exact resume with an accumulation that spans epochs ----------------

READERS = {
    "hdf5": {},
    "npy": {"reader": {"name": "npy", "threads": 2}},
    "prefetch": {"reader": {"name": "prefetch", "depth": 2, "threads": 2},
                 "reader.source": {"name": "hdf5", "threads": 1}},
}


def tensors_of(value, path=""):
    """Every tensor in a checkpoint, by its path."""
    if isinstance(value, torch.Tensor):
        return {path: value}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(tensors_of(v, f"{path}[{k!r}]"))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for i, v in enumerate(value):
            out.update(tensors_of(v, f"{path}[{i}]"))
        return out
    return {}


def assert_same_checkpoint(a, b):
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert (ca["step"], ca["epoch"]) == (cb["step"], cb["epoch"])
    ta, tb = tensors_of(ca), tensors_of(cb)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("reader", sorted(READERS))
def test_resume_mid_accumulation_equals_the_uninterrupted_run(tmp_path, data, npy_data, reader):
    root = npy_data if reader == "npy" else data
    changes = {k: dict(v) for k, v in READERS[reader].items()}
    common = {**ODD, "checkpoint_every": 1}
    whole = write_run(tmp_path / "whole.toml", root, tmp_path / "whole", run={**common, "max_epochs": 3}, **changes)
    r = run_host(whole)
    assert r.returncode == 1, r.stderr
    # Stopped by the epoch limit after epoch 1 (step 3: one batch of the
    # accumulation done), then resumed to epoch 3 in another folder.
    first = write_run(tmp_path / "first.toml", root, tmp_path / "first", run={**common, "max_epochs": 1}, **changes)
    r = run_host(first)
    assert r.returncode == 1, r.stderr
    saved = torch.load(tmp_path / "first" / "checkpoint-epoch1.pt", weights_only=True)
    assert saved["step"] == 3 and set(saved["accumulated_gradients"]) == {
        k for k in saved["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    rest = write_run(tmp_path / "rest.toml", root, tmp_path / "rest",
                     run={**common, "max_epochs": 3, "resume": str(tmp_path / "first" / "checkpoint-epoch1.pt")},
                     **changes)
    r = run_host(rest)
    assert r.returncode == 1, r.stderr
    assert_same_checkpoint(tmp_path / "whole" / "checkpoint-epoch1.pt", tmp_path / "first" / "checkpoint-epoch1.pt")
    for epoch in (2, 3):  # step 6 (no partial gradient), step 9 (one)
        assert_same_checkpoint(tmp_path / "whole" / f"checkpoint-epoch{epoch}.pt",
                               tmp_path / "rest" / f"checkpoint-epoch{epoch}.pt")
    losses = lambda out: [e["value"] for e in read_events(out / "mlperf.log") if e["key"] == "train_loss"]
    assert losses(tmp_path / "rest") == losses(tmp_path / "whole")[-len(losses(tmp_path / "rest")):]


def test_a_partial_gradient_with_another_accumulation_is_refused(tmp_path, data, trained):
    r = resume(tmp_path, data, trained, gradient_accumulation_frequency=3)
    assert r.returncode == 2
    assert f"{trained}: holds a partial gradient ('accumulated_gradients') at step 3" in r.stderr, r.stderr


def test_a_partial_gradient_of_another_number_of_batches_is_refused(tmp_path, data, trained):
    """Written at step 3 with k = 2, it sums 1 batch; with k = 4 the next update would take it for the sum of
    3 and add 1 more. It was taken silently (an update of 2 batches where the run's others sum 4)."""
    assert torch.load(trained, weights_only=True)["accumulated_batches"] == 1
    r = resume(tmp_path, data, trained, gradient_accumulation_frequency=4)
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"{trained}: holds a partial gradient ('accumulated_gradients') summing 1 batch at step 3, but with "
            f"{tmp_path / 'resume.toml'}:") in r.stderr, r.stderr[-2000:]
    assert ("[run] gradient_accumulation_frequency = 4, this run's next update would take it for the sum of 3"
            in r.stderr), r.stderr[-2000:]


@pytest.fixture(scope="module")
def trained_k1(tmp_path_factory, data):
    """One epoch without accumulation: 3 batches, 3 optimizer steps, no partial gradient."""
    tmp = tmp_path_factory.mktemp("ckh-k1")
    run = write_run(tmp / "run.toml", data, tmp / "out", run={**ODD, "gradient_accumulation_frequency": 1})
    r = run_host(run)
    assert r.returncode == 1, r.stderr
    return tmp / "out" / "checkpoint-epoch1.pt"


def test_a_checkpoint_records_its_accumulation_frequency_and_ranks(trained, trained_k1):
    for path, k in ((trained, 2), (trained_k1, 1)):
        saved = torch.load(path, weights_only=True)
        assert (saved["gradient_accumulation_frequency"], saved["world_size"], saved["train_batch_size"]) == (k, 1, 2)


def test_a_resume_with_another_accumulation_frequency_is_refused(tmp_path, data, trained_k1):
    """3 optimizer steps at k = 1; with k = 3 (which divides step 3, so no partial gradient is in the way) the
    schedule would have gone on from optimizer step 3 // 3 = 1, back into the warm-up, while Adam's own step
    count went on from 3. It was taken silently."""
    r = resume(tmp_path, data, trained_k1, gradient_accumulation_frequency=3)
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"{trained_k1}: written by a run with gradient_accumulation_frequency = 1, after 3 optimizer steps "
            f"(3 batches); with {tmp_path / 'resume.toml'}:") in r.stderr, r.stderr[-2000:]
    assert " [run] gradient_accumulation_frequency = 3, the learning-rate" in r.stderr, r.stderr[-2000:]
    assert "the learning-rate schedule would go on from optimizer step 1. Resume with " \
           "gradient_accumulation_frequency = 1, or set [run] resume_weights_only = true" in r.stderr
    assert not (tmp_path / "resumed" / "mlperf.log").exists()


def test_a_weights_only_resume_with_another_accumulation_frequency_says_where_its_schedule_stands(
        tmp_path, data, trained_k1):
    r = resume(tmp_path, data, trained_k1, gradient_accumulation_frequency=3, resume_weights_only=True)
    assert r.returncode == 1, r.stderr[-2000:]
    assert (f"note: {trained_k1} was written by a run with gradient_accumulation_frequency = 1, after 3 optimizer "
            f"steps; with {tmp_path / 'resume.toml'}:") in r.stderr, r.stderr[-2000:]
    assert " [run] gradient_accumulation_frequency = 3, the schedule" in r.stderr, r.stderr[-2000:]
    assert "the schedule goes on from optimizer step 1" in r.stderr


@pytest.mark.parametrize("key", ["gradient_accumulation_frequency", "world_size", "train_batch_size", "seed"])
@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_a_damaged_record_of_the_writing_run_is_refused(tmp_path, data, trained_k1, key, value):
    ckpt = edited(tmp_path, trained_k1, lambda c: c.__setitem__(key, value))
    r = resume(tmp_path, data, ckpt, gradient_accumulation_frequency=1)
    assert r.returncode == 2, r.stderr[-2000:]
    expected = {0: f"'{key}' is 0, expected >= 1", -1: f"'{key}' is -1, expected an integer in 0..",
                2.5: f"'{key}' is a Double, expected a non-negative integer"}[value]
    assert f"{ckpt}: {expected}" in r.stderr, r.stderr[-2000:]


def test_a_partial_gradient_of_one_rank_is_refused_on_two(tmp_path, data, trained):
    """The partial gradient of 1 rank's batch became each of 2 ranks' .grad, and the next update averaged it
    with their batches: an update no run makes. It was taken silently."""
    cfg = write_run(tmp_path / "resume.toml", data, tmp_path / "resumed",
                    run={**ODD, "max_epochs": 2, "resume": str(trained), "train_batch_size": 1})
    r = run_host("--nproc", 2, cfg)
    assert r.returncode == 2, r.stdout + r.stderr[-2000:]
    assert (f"{trained}: holds a partial gradient ('accumulated_gradients') at step 3, the mean over 1 rank; this "
            "run's 2 ranks would each add their batches to it") in r.stderr, r.stderr[-2000:]


def test_a_resume_on_another_number_of_ranks_is_noted(tmp_path, data, trained_k1):
    cfg = write_run(tmp_path / "resume.toml", data, tmp_path / "resumed",
                    run={**ODD, "max_epochs": 2, "resume": str(trained_k1), "train_batch_size": 1,
                         "gradient_accumulation_frequency": 1})
    r = run_host("--nproc", 2, cfg)
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    assert (f"note: {trained_k1} was written by a run of 1 rank at a batch of 2 each; this run has 2 at a batch of "
            f"1 each ({cfg}:") in r.stderr, r.stderr[-2000:]
    assert "[run] train_batch_size = 1) and trains on at a global batch of 2 samples" in r.stderr, r.stderr[-2000:]


def test_a_partial_gradient_of_another_batch_size_is_refused(tmp_path, data, trained):
    """Summed over batches of 2, it was completed with batches of 1, silently: an update no run makes (on
    two ranks of 1 each, whose global batch is the writer's, it was refused)."""
    r = resume(tmp_path, data, trained, train_batch_size=1)
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"{trained}: holds a partial gradient ('accumulated_gradients') at step 3, summed over batches of 2; "
            f"with {tmp_path / 'resume.toml'}:") in r.stderr, r.stderr[-2000:]
    assert ("[run] train_batch_size = 1, this run's next update would add batches of 1 to it, an update no "
            "uninterrupted run makes. Resume with train_batch_size = 2, or set [run] resume_weights_only = true"
            in r.stderr), r.stderr[-2000:]


def test_a_resume_at_another_batch_size_is_noted_with_its_global_batch(tmp_path, data, trained_k1):
    r = resume(tmp_path, data, trained_k1, gradient_accumulation_frequency=1, train_batch_size=1)
    assert r.returncode == 1, r.stderr[-2000:]
    assert (f"note: {trained_k1} was written by a run of 1 rank at a batch of 2 each; this run has 1 at a batch of "
            f"1 each ({tmp_path / 'resume.toml'}:") in r.stderr, r.stderr[-2000:]
    assert "[run] train_batch_size = 1) and trains on at a global batch of 1 sample\n" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("seed", [9, "auto"])
def test_a_resume_with_another_seed_names_the_one_that_continues_the_run(tmp_path, data, trained_k1, seed):
    # With seed = "auto" (configs/reference.toml's), a resume drew a new seed without a word: its epochs were
    # shuffled otherwise than the run's it continued.
    written = torch.load(trained_k1, weights_only=True)["seed"]
    assert written == 5  # helpers.SECTIONS' seed
    r = resume(tmp_path, data, trained_k1, gradient_accumulation_frequency=1, seed=seed)
    assert r.returncode == 1, r.stderr[-2000:]
    taken = int(re.search(r'"key": "seed", "value": (\d+)', (tmp_path / "resumed" / "mlperf.log").read_text()).group(1))
    assert seed == "auto" or taken == seed
    drawn = ': "auto", drawn from the clock' if seed == "auto" else ""
    assert (f"note: {trained_k1} was written by a run of seed 5; this run's seed is {taken} "
            f"({tmp_path / 'resume.toml'}:") in r.stderr, r.stderr[-2000:]
    assert (f"[run] seed{drawn}), which orders its epochs' samples otherwise than that run's: set seed = 5 to "
            "continue it exactly") in r.stderr, r.stderr[-2000:]
    assert torch.load(tmp_path / "resumed" / "checkpoint-epoch2.pt", weights_only=True)["seed"] == taken
    (tmp_path / "same").mkdir()
    r = resume(tmp_path / "same", data, trained_k1, gradient_accumulation_frequency=1)
    assert r.returncode == 1 and "was written by a run of seed" not in r.stderr, r.stderr[-2000:]


def test_an_unscaled_partial_gradient_is_refused_under_amp_fp16(tmp_path, data, trained):
    r = resume(tmp_path, data, trained, precision="amp_fp16")
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"{trained}: holds a partial gradient ('accumulated_gradients') at step 3 written without loss scaling, "
            f"and this run's precision ({tmp_path / 'resume.toml'}:") in r.stderr, r.stderr[-2000:]
    assert ' [run] precision = "amp_fp16") scales it; resume with the precision of the run that wrote it' \
        in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("case", ["scaler_dropped", "scaler_started"])
def test_a_resume_in_another_precision_says_what_becomes_of_the_loss_scaler(tmp_path, data, trained, case):
    def edit(c):
        c.pop("accumulated_gradients")
        c.pop("accumulated_batches")
        if case == "scaler_dropped":
            c["scaler"] = SCALER
    ckpt = edited(tmp_path, trained, edit)
    r = resume(tmp_path, data, ckpt, **({"precision": "amp_fp16"} if case == "scaler_started" else {}))
    assert r.returncode == 1, r.stderr[-2000:]
    run = tmp_path / "resume.toml"
    expected = {"scaler_dropped": f"note: {ckpt} was written by an amp_fp16 run; its loss scaler (scale 1024) is not "
                                  f"used, as this run scales no loss ({run} [run] precision = \"fp32\" (default))",
                "scaler_started": f"note: {ckpt} holds no loss scaler (its run was not amp_fp16); this run ({run}:"
                }[case]
    assert expected in r.stderr, r.stderr[-2000:]
    if case == "scaler_started":
        assert ' [run] precision = "amp_fp16") starts one afresh at scale 65536' in r.stderr, r.stderr[-2000:]


def test_the_empty_scaler_of_a_disabled_grad_scaler_is_no_scaler(tmp_path, data, trained):
    # torch.amp.GradScaler(enabled=False).state_dict() is {}: a script that always saves its scaler writes it
    # from a run without fp16. It was refused ("'scaler' has no 'scale'") by --evaluate and by every resume.
    def edit(c):
        c.pop("accumulated_gradients")
        c.pop("accumulated_batches")
        c["scaler"] = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    ckpt = edited(tmp_path, trained, edit)
    assert torch.load(ckpt, weights_only=True)["scaler"] == {}
    (tmp_path / "plain").mkdir()
    (tmp_path / "fp16").mkdir()
    assert figures(evaluate(tmp_path, data, ckpt)) == figures(evaluate(tmp_path / "plain", data, trained))
    r = resume(tmp_path, data, ckpt)
    assert r.returncode == 1 and "'scaler'" not in r.stderr and "loss scaler" not in r.stderr, r.stderr[-2000:]
    r = resume(tmp_path / "fp16", data, ckpt, precision="amp_fp16")
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"note: {ckpt} holds no loss scaler (its run was not amp_fp16)" in r.stderr, r.stderr[-2000:]


def test_a_loss_scaler_of_other_settings_goes_on_with_them_and_is_noted(tmp_path, data, trained):
    # As GradScaler.load_state_dict takes them; without a word, the run's scale grew 4x every 100 steps.
    def edit(c):
        c.pop("accumulated_gradients")
        c.pop("accumulated_batches")
        c["scaler"] = dict(SCALER, growth_factor=4.0, backoff_factor=0.25, growth_interval=100)
    ckpt = edited(tmp_path, trained, edit)
    r = resume(tmp_path, data, ckpt, precision="amp_fp16")
    assert r.returncode == 1, r.stderr[-2000:]
    assert (f"note: {ckpt} holds a loss scaler with growth_factor 4, backoff_factor 0.25 and growth_interval 100; "
            "the run goes on with them, as torch.amp.GradScaler's load_state_dict does (a fresh scaler has 2, 0.5 "
            "and 2000)") in r.stderr, r.stderr[-2000:]
    saved = torch.load(tmp_path / "resumed" / "checkpoint-epoch2.pt", weights_only=True)["scaler"]
    assert (saved["growth_factor"], saved["backoff_factor"], saved["growth_interval"]) == (4.0, 0.25, 100)


def test_a_resume_from_a_pipe_is_refused_at_once(tmp_path, data):
    pipe = tmp_path / "checkpoint.pt"
    os.mkfifo(pipe)
    cfg = write_run(tmp_path / "resume.toml", data, tmp_path / "resumed",
                    run={**ODD, "max_epochs": 2, "resume": str(pipe)})
    r = run_host(cfg, timeout=120)  # it waited in open() for a writer, for ever
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{pipe}: not a regular file (a pipe, socket or device)" in r.stderr, r.stderr[-2000:]


def test_a_mid_accumulation_checkpoint_of_many_ranks_is_refused_on_resume(tmp_path, data):
    run = write_run(tmp_path / "run.toml", data, tmp_path / "two", run={**ODD, "train_batch_size": 1})
    r = run_host("--nproc", 2, run)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot be resumed exactly" in r.stderr
    ckpt = tmp_path / "two" / "checkpoint-epoch1.pt"
    assert torch.load(ckpt, weights_only=True)["partial_accumulation_ranks"] == 2
    r = resume(tmp_path, data, ckpt, train_batch_size=1)
    assert r.returncode == 2
    assert f"{ckpt}: saved at step 3 in the middle of a gradient accumulation by a run of 2 ranks" in r.stderr


# --- temporary files and the record of an earlier run -----------------------

def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_temporary_files_of_dead_runs_are_removed_and_live_ones_kept(tmp_path, data):
    out = tmp_path / "out"
    out.mkdir()
    dead = dead_pid()
    stale = [out / f"checkpoint-epoch1.pt.tmp-{dead}", out / f"mlperf.log.partial-{dead}",
             out / f".config.toml.tmp{dead}-0"]
    live = out / f"checkpoint-epoch1.pt.tmp-{os.getpid()}"
    # Named like a temporary, but of no name the run writes: another program's, left alone.
    other = out / f"notes.txt.partial-{dead}"
    for f in stale + [live, other]:
        f.write_bytes(b"half a file")
    run = write_run(tmp_path / "run.toml", data, out, run={**ODD, "checkpoint_every": -1})
    r = run_host(run)
    assert r.returncode == 1, r.stderr
    assert not any(f.exists() for f in stale)
    assert live.exists()  # its writer (this test) is alive
    assert other.exists()
    assert f"removed {stale[0]}" in r.stderr


def test_a_run_that_would_overwrite_another_runs_record_is_refused(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run=ODD)
    assert run_host(run).returncode == 1
    before = (out / "mlperf.log").read_bytes(), (out / "checkpoint-epoch1.pt").read_bytes()
    r = run_host(run)
    assert r.returncode == 2
    assert (f"{tmp_path / 'run.toml'}:" in r.stderr and "[run] output_dir: " in r.stderr and
            "holds the record of an earlier run (mlperf.log, checkpoint-epoch1.pt)" in r.stderr and
            "set [run] overwrite = true" in r.stderr), r.stderr
    assert ((out / "mlperf.log").read_bytes(), (out / "checkpoint-epoch1.pt").read_bytes()) == before
    # Resuming from its checkpoint continues that run; overwrite = true replaces it.
    r = run_host(run, "--set", "run.max_epochs=2", "--set", f"run.resume={out / 'checkpoint-epoch1.pt'}")
    assert r.returncode == 1, r.stderr
    assert run_host(run, "--evaluate", out / "checkpoint-epoch2.pt").returncode == 0
    r = run_host(run, "--set", "run.overwrite=true")
    assert r.returncode == 1, r.stderr
    # Replaced as a whole: the resumed run's second epoch is gone, not left beside the new record, and so is the
    # record of its evaluation (it named a checkpoint that is no more).
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-epoch1.pt"]
    assert f"overwrite = true: removed {out / 'checkpoint-epoch2.pt'}, a checkpoint of the earlier run" in r.stderr
    assert not (out / "evaluate-mlperf.log").exists() and not (out / "evaluate-config.toml").exists()
    assert (f"overwrite = true: removed {out / 'evaluate-mlperf.log'}, the record of an --evaluate of its "
            "checkpoints") in r.stderr, r.stderr[-3000:]
    assert torch.load(out / "checkpoint-epoch1.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("case", ["log-file-is-stats", "log-file-is-the-run-file", "run-file-is-config-toml"])
def test_a_file_no_run_wrote_is_never_replaced_by_the_record_even_with_overwrite(tmp_path, data, case):
    """[mlperf] log_file may name any file: stats.h5 or the run file itself was called "the record of an earlier
    run", and the advice, overwrite = true, replaced it with the MLPerf log. A run file named config.toml in
    its own output folder was replaced by the resolved configuration without overwrite. Now refused, naming
    the key, with overwrite = true too; the file is as it was."""
    root = tmp_path / "data"
    shutil.copytree(data, root)
    folder = tmp_path / "project"
    folder.mkdir()
    if case == "run-file-is-config-toml":
        run = write_run(folder / "config.toml", root, folder, run=ODD)
        victim, key, what = run, "[run] output_dir", "resolved configuration"
    else:
        run = write_run(folder / "run.toml", root, tmp_path / "out", run=ODD)
        victim = root / "stats.h5" if case == "log-file-is-stats" else run
        key, what = "mlperf.log_file", "MLPerf log"
    before = victim.read_bytes()
    for overwrite in ("false", "true"):
        args = ["--set", f"run.overwrite={overwrite}"]
        if case != "run-file-is-config-toml":
            args += ["--set", f'mlperf.log_file="{victim}"']
        r = run_host(run, *args)
        assert r.returncode == 2, r.stderr
        assert (key in r.stderr and f": {victim} is a file that is no run's {what}" in r.stderr and
                "the run would replace it with its own" in r.stderr), r.stderr
        assert victim.read_bytes() == before


@pytest.mark.parametrize("name,what", [("config.toml", "its resolved configuration"),
                                       ("./checkpoint-epoch1.pt", "a checkpoint"),
                                       # The same files reached another way: the checkpoint was renamed over the
                                       # log, which was lost without a word; the configuration's rename failed.
                                       ("../out/checkpoint-epoch1.pt", "a checkpoint"),
                                       ("{tmp}/out/config.toml", "its resolved configuration"),
                                       ("{tmp}/link/checkpoint-epoch1.pt", "a checkpoint")])
def test_a_log_file_named_as_the_runs_own_files_is_refused(tmp_path, data, name, what):
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run=ODD)
    name = name.format(tmp=tmp_path)
    if "link" in name:
        # Through a link to the output folder, which exists then (empty).
        (tmp_path / "out").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "out")
    r = run_host(run, "--set", f'mlperf.log_file="{name}"')
    assert r.returncode == 2, r.stdout + r.stderr
    assert f'--set mlperf.log_file="{name}"' in r.stderr, r.stderr
    leaf = name.rsplit("/", 1)[-1]
    assert f"{tmp_path / 'out' / leaf} is a name the run gives {what} in its output folder" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("name, what", [("checkpoint-epoch1.pt", "a checkpoint"),
                                        ("config.toml", "its resolved configuration")])
def test_a_log_file_named_as_the_runs_own_files_is_refused_for_an_output_folder_given_with_a_slash(tmp_path, data,
                                                                                                   name, what):
    """"out/", not made yet, compared unequal to "out": the run trained, and the log was lost under the
    checkpoint renamed over it, or config.toml came to hold the MLPerf log."""
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run=ODD)
    r = run_host(run, "--set", f'run.output_dir="{tmp_path}/out/"', "--set", f'mlperf.log_file="{name}"')
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{tmp_path}/out/{name} is a name the run gives {what} in its output folder" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_log_file_of_a_checkpoints_name_in_another_folder_is_no_collision(tmp_path, data):
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run=ODD)
    (tmp_path / "logs").mkdir()
    r = run_host(run, "--set", f'mlperf.log_file="{tmp_path}/logs/checkpoint-epoch1.pt"')
    assert r.returncode in (0, 1), r.stderr
    assert (tmp_path / "logs" / "checkpoint-epoch1.pt").read_text().startswith(":::MLLOG ")


def record_of(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith("checkpoint-")}


def test_a_refused_resume_in_the_runs_folder_leaves_its_record_as_it_was(tmp_path, data):
    """A resume refused before it starts (another model, a broken checkpoint) used to remove the mlperf.log and
    config.toml of the run whose folder it was started in."""
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={**ODD, "max_epochs": 2, "checkpoint_every": 1})
    assert run_host(run).returncode == 1
    before = record_of(out)
    assert sorted(before) == ["config.toml", "mlperf.log"]
    (out / "checkpoint-epoch1.pt").write_bytes((out / "checkpoint-epoch1.pt").read_bytes()[:1000])
    for resume, change, message in [
            ("checkpoint-epoch2.pt", "model.width=0.125", "width"),
            ("checkpoint-epoch1.pt", "run.max_epochs=3", "checkpoint-epoch1.pt"),
            ("checkpoint-epoch2.pt", "run.max_epochs=2", "checkpoint-epoch2.pt: the checkpoint is at epoch 2, and "
                                                 "--set run.max_epochs=2: nothing is left to train"),
    ]:
        r = run_host(run, "--set", f"run.resume={out / resume}", "--set", change)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr, r.stderr
        assert record_of(out) == before, sorted(record_of(out))
    assert (f"deepcam-host: --set run.resume={out / 'checkpoint-epoch2.pt'}: the checkpoint is at epoch 2, and "
            "--set run.max_epochs=2: nothing is left to train; raise max_epochs to continue its run\n"
            in r.stderr), r.stderr


def test_a_resume_in_the_runs_folder_keeps_the_earlier_record_numbered(tmp_path, data):
    """The resumed run's log starts anew at run_start; the record of the run it continues used to be replaced."""
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run=ODD)
    assert run_host(run).returncode == 1
    first = record_of(out)
    r = run_host(run, "--set", "run.max_epochs=2", "--set", f"run.resume={out / 'checkpoint-epoch1.pt'}")
    assert r.returncode == 1, r.stderr
    assert (f"the record of the run this one continues is kept as {out / 'config.toml.1'} and "
            f"{out / 'mlperf.log.1'}") in r.stderr, r.stderr
    second = record_of(out)
    assert second["mlperf.log.1"] == first["mlperf.log"] and second["config.toml.1"] == first["config.toml"]
    assert [e["metadata"]["epoch_num"] for e in read_events(out / "mlperf.log") if e["key"] == "epoch_start"] == [2]
    r = run_host(run, "--set", "run.max_epochs=3", "--set", f"run.resume={out / 'checkpoint-epoch2.pt'}")
    assert r.returncode == 1, r.stderr
    third = record_of(out)
    assert third["mlperf.log.2"] == second["mlperf.log"] and third["mlperf.log.1"] == first["mlperf.log"]
    assert sorted(third) == ["config.toml", "config.toml.1", "config.toml.2", "mlperf.log", "mlperf.log.1",
                             "mlperf.log.2"]
    # overwrite = true replaces the whole record, the kept ones too.
    r = run_host(run, "--set", "run.overwrite=true")
    assert r.returncode == 1, r.stderr
    assert sorted(record_of(out)) == ["config.toml", "mlperf.log"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-epoch1.pt"]


def test_resuming_in_the_runs_folder_before_its_later_checkpoints_is_refused_unless_overwrite(tmp_path, data):
    """The resumed run would write its checkpoints over some of the later ones and leave the others: two
    histories in one folder."""
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={**ODD, "max_epochs": 3, "checkpoint_every": 1})
    assert run_host(run).returncode == 1
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    resume = ["--set", f"run.resume={out / 'checkpoint-epoch1.pt'}", "--set", "run.max_epochs=2"]
    r = run_host(run, *resume)
    assert r.returncode == 2, r.stderr
    assert ("holds checkpoints after checkpoint-epoch1.pt, which this run resumes from (checkpoint-epoch2.pt, "
            "checkpoint-epoch3.pt)") in r.stderr and "set [run] overwrite = true to remove them" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = run_host(run, *resume, "--set", "run.overwrite=true")
    assert r.returncode == 1, r.stderr
    assert f"removed {out / 'checkpoint-epoch3.pt'}, a checkpoint of the earlier run" in r.stderr, r.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-epoch1.pt", "checkpoint-epoch2.pt"]
    assert (out / "mlperf.log.1").read_bytes() == before["mlperf.log"]


@pytest.mark.parametrize("resume_from", ["elsewhere", "epoch1"])
def test_overwrite_removes_the_earlier_files_only_once_the_run_starts(tmp_path, data, resume_from):
    """[run] overwrite = true removed the earlier run's checkpoints and kept records before the resume file
    and the plugins were read: a run refused there left the folder without them."""
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={**ODD, "max_epochs": 2, "checkpoint_every": 1})
    assert run_host(run).returncode == 1
    r = run_host(run, "--set", "run.max_epochs=3", "--set", f"run.resume={out / 'checkpoint-epoch2.pt'}")
    assert r.returncode == 1, r.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"checkpoint-epoch1.pt", "checkpoint-epoch3.pt", "mlperf.log.1"} <= set(before), sorted(before)
    if resume_from == "elsewhere":
        junk = tmp_path / "junk.pt"
        junk.write_bytes(b"not a checkpoint")
        refused = ["--set", f"run.resume={junk}"]
    else:  # in the folder, with later checkpoints, and a model the checkpoint does not fit
        refused = ["--set", f"run.resume={out / 'checkpoint-epoch1.pt'}", "--set", "model.width=0.125"]
    r = run_host(run, "--set", "run.overwrite=true", "--set", "run.max_epochs=4", *refused)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "removed" not in r.stderr, r.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_resume_whose_optimizer_settings_differ_from_the_checkpoints_is_refused(tmp_path, data, trained):
    """The resume takes them from the checkpoint (as PyTorch's load_state_dict); the log and config.toml used to
    record the run file's, silently not the ones in effect."""
    checkpoint = trained
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={**ODD, "max_epochs": 2},
                    optimizer={"weight_decay": 0.5, "betas": [0.8, 0.999]})
    r = run_host(run, "--set", f"run.resume={checkpoint}")
    assert r.returncode == 2, r.stderr
    assert (f"{checkpoint}: opt_betas is [0.9, 0.999] in the checkpoint, [0.8, 0.999] in the run; opt_weight_decay "
            f"is 1e-06 in the checkpoint, 0.5 in the run: a resume continues with the checkpoint's optimizer "
            f"settings") in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    # The learning rate is the schedule's at every step: a checkpoint's last one is no difference.
    r = run_host(run, "--set", f"run.resume={checkpoint}", "--set", "optimizer.weight_decay=1e-6", "--set",
                 "optimizer.betas=[0.9, 0.999]", "--set", "optimizer.lr=0.004")
    assert r.returncode == 1, r.stderr
    logged = {e["key"]: e["value"] for e in read_events(tmp_path / "out" / "mlperf.log")}
    assert logged["opt_weight_decay"] == 1e-6 and logged["opt_lr"] == 0.004
    r = run_host(run, "--set", f"run.resume={checkpoint}", "--set", "run.resume_weights_only=true", "--set",
                 f"run.output_dir={tmp_path / 'fresh'}")
    assert r.returncode == 1, r.stderr


def test_resuming_with_another_accumulation_names_where_it_was_set(tmp_path, data):
    """The note used to say the checkpoint was not written by deepcam-host, and to credit the run file with a
    value given by --set."""
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={**ODD, "gradient_accumulation_frequency": 1})
    assert run_host(run).returncode == 1
    # A file of an earlier version, which does not record its frequency (one that does is refused: below).
    ckpt = torch.load(out / "checkpoint-epoch1.pt", weights_only=True)
    del ckpt["gradient_accumulation_frequency"]
    torch.save(ckpt, out / "checkpoint-epoch1.pt")
    r = run_host(run, "--set", f"run.resume={out / 'checkpoint-epoch1.pt'}", "--set", "run.max_epochs=2", "--set",
                 "run.gradient_accumulation_frequency=2", "--set", f"run.output_dir={tmp_path / 'again'}")
    assert r.returncode == 1, r.stderr
    assert ("was saved at step 3, which --set run.gradient_accumulation_frequency=2 does not divide, and holds no "
            "accumulated gradient (the run that wrote it accumulated over other batches, or it was not written by "
            "deepcam-host)") in r.stderr, r.stderr


def test_resume_keys_that_do_nothing_are_named(tmp_path, data, trained):
    """resume_weights_only without a resume trained from fresh weights, and --evaluate with a [run] resume
    scored its own checkpoint, neither with a word about the key."""
    cfg = write_run(tmp_path / "fresh.toml", data, tmp_path / "fresh", run={**ODD, "resume_weights_only": True})
    r = run_host(cfg, "--quiet")
    assert r.returncode == 1, r.stderr[-2000:]
    assert (f"note: {cfg}:" in r.stderr and "[run] resume_weights_only = true does nothing without [run] resume"
            in r.stderr), r.stderr[-2000:]
    cfg = write_run(tmp_path / "eval.toml", data, tmp_path / "eval", run={"resume": str(tmp_path / "other.pt")})
    r = run_host(cfg, "--evaluate", trained, "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'[run] resume = "{tmp_path / "other.pt"}" is not used: --evaluate scores {trained}' in r.stderr, \
        r.stderr[-2000:]
    # --predict and --benchmark said nothing of it.
    r = run_host(cfg, "--predict", trained, "--out", tmp_path / "predicted", "--samples", "1", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'[run] resume = "{tmp_path / "other.pt"}" is not used: --predict reads {trained}' in r.stderr, \
        r.stderr[-2000:]
    r = run_host(cfg, "--benchmark", "1", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f'[run] resume = "{tmp_path / "other.pt"}" is not used: --benchmark times steps from the model\'s '
            "initial weights") in r.stderr, r.stderr[-2000:]


def rewritten(tmp_path, checkpoint, change, name="rewritten.pt"):
    """The checkpoint's zip archive written again member by member through `change(members)`, a list of
    (ZipInfo, bytes) it may edit."""
    import warnings
    import zipfile
    with zipfile.ZipFile(checkpoint) as z:
        members = [(info, z.read(info.filename)) for info in z.infolist()]
    change(members)
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as z, warnings.catch_warnings():
        # A name written twice is the point of doubled(); zipfile warns of it.
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)
        for info, data in members:
            z.writestr(info, data)
    return path


def set_member(suffix, data):
    def change(members):
        for i, (info, _) in enumerate(members):
            if info.filename.endswith(suffix):
                members[i] = (info, data)
    return change


def deflated(suffix):
    def change(members):
        import zipfile
        for info, _ in members:
            if info.filename.endswith(suffix):
                info.compress_type = zipfile.ZIP_DEFLATED
    return change


def doubled(suffix):
    def change(members):
        import copy
        info, data = next(m for m in members if m[0].filename.endswith(suffix))
        members.append((copy.copy(info), bytes(len(data))))
    return change


def shared_entries(tmp_path, checkpoint):
    """The archive with its largest record listed again under other names, each entry pointing at the same
    bytes, until the entries add up to more than the file (a few hundred bytes of directory each, which a
    reader that reads every entry whole pays for in full)."""
    import struct
    raw = checkpoint.read_bytes()
    end = raw.rindex(b"PK\x05\x06")
    count, size, offset = struct.unpack("<HII", raw[end + 10:end + 20])
    cd, entries, pos = raw[offset:offset + size], [], 0
    while pos < len(cd):
        name_size, extra_size, comment_size = struct.unpack("<HHH", cd[pos + 28:pos + 34])
        stop = pos + 46 + name_size + extra_size + comment_size
        entries.append(cd[pos:stop])
        pos = stop
    largest = max(entries, key=lambda e: struct.unpack("<I", e[20:24])[0])
    copies = len(raw) // struct.unpack("<I", largest[20:24])[0] + 1
    name_size = struct.unpack("<H", largest[28:30])[0]
    name = largest[46:46 + name_size]
    added = b"".join(largest[:28] + struct.pack("<H", name_size + 4) + largest[30:46] + name + b"%04d" % i
                     + largest[46 + name_size:] for i in range(copies))
    tail = raw[end:end + 8] + struct.pack("<HHII", count + copies, count + copies, size + len(added), offset) \
        + raw[end + 20:]
    path = tmp_path / "shared.pt"
    path.write_bytes(raw[:offset + size] + added + tail)
    return path


def test_entries_that_share_their_bytes_are_refused_before_they_are_read(tmp_path, data, trained):
    """Each entry was read whole: a file of 13 MB made the reader hold 1.3 GB."""
    path = shared_entries(tmp_path, trained)
    r = evaluate(tmp_path, data, path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.search(rf"{re.escape(str(path))}: its records add up to \d+ bytes, more than the file's "
                     rf"{path.stat().st_size} \(entries sharing their bytes\?\)", r.stderr), r.stderr[-2000:]


@pytest.mark.parametrize("case, change, message", [
    # LibTorch reads the version with std::stoull: beyond 64 bits it threw std::out_of_range, an internal
    # error (exit 3).
    ("version_beyond_64_bits", set_member("/version", b"99999999999999999999999\n"),
     "its 'version' record holds a number beyond 64 bits"),
    # These were refused in LibTorch's words ("[enforce fail at inline_container.cc:215]"), by its reader's
    # constructor, which threw without freeing its zip reader (LeakSanitizer, scripts/sanitize_program.sh).
    ("version_not_a_number", set_member("/version", b"three\n"), "its 'version' record holds no number"),
    ("version_unsupported", set_member("/version", b"99\n"),
     "its file format version 99 is not one this LibTorch reads (1 to 10)"),
    # A few kilobytes that expand to gigabytes were read whole (torch.save stores every record as it is).
    ("compressed_pickle", deflated("/data.pkl"), "record 'data.pkl' is compressed (zip method 8)"),
    # Which of two records of one name was read was the zip library's choice (another model loaded).
    ("record_twice", doubled("/data/0"), "record 'data/0' stands twice in its central directory"),
    # A byteorder record was read whole and echoed whole in the message.
    ("long_byteorder", set_member("/byteorder", b"l" * 100000),
     "its 'byteorder' record holds 100000 bytes, where torch.save writes \"little\" or \"big\""),
])
def test_an_archive_torch_save_cannot_have_written_is_refused_before_it_is_read(tmp_path, data, trained, case,
                                                                                   change, message):
    path = rewritten(tmp_path, trained, change)
    r = evaluate(tmp_path, data, path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{path}: {message}" in r.stderr, r.stderr[-2000:]
    assert "internal error" not in r.stderr


def test_a_non_finite_optimizer_state_is_refused_for_any_optimizer_plugin(tmp_path, data):
    """The example SGD plugin checks its momentum buffers' shapes, not their values: a NaN in one resumed,
    and the run stopped later as "training diverged ... lower [optimizer] lr"."""
    from helpers import SGD
    sgd = {**SGD, "momentum": 0.9}
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={"max_epochs": 1, "target_iou": 1.0}, optimizer=sgd)
    assert run_host(run, "--quiet").returncode == 1
    checkpoint = torch.load(out / "checkpoint-epoch1.pt", weights_only=True)
    key = next(k for k, v in checkpoint["optimizer"]["state"].items() if "momentum_buffer" in v)
    checkpoint["optimizer"]["state"][key]["momentum_buffer"].view(-1)[0] = float("nan")
    bad = tmp_path / "bad.pt"
    torch.save(checkpoint, bad)
    r = run_host(run, "--quiet", "--set", "run.max_epochs=2", "--set", f"run.resume={bad}",
                 "--set", f"run.output_dir={tmp_path / 'resumed'}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert (f"['optimizer']['state'][{key}]['momentum_buffer'] holds NaN or Inf (the state of a run that "
            "diverged, or a damaged file); resume from an earlier checkpoint") in r.stderr, r.stderr[-3000:]
    assert str(bad) in r.stderr
