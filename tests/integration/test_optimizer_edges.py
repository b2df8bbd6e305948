"""The optimizer plugins at the edges of what a checkpoint's optimizer state may hold: a learning rate of 0
(a warmup's first step, SPEC 6.3), options PyTorch's load_state_dict would continue with but these
optimizers do not have (amsgrad, maximize, another eps than SPEC 5's), and LAMB's step count."""

import pytest
import torch

from helpers import read_events, run_host, synth, write_run

# 6 training samples, batches of 2, an update every 2 batches: epoch 1 makes one optimizer step (step 0),
# which a warmup with lr_warmup_factor 1 runs at learning rate 0.
ODD = {"max_epochs": 1, "target_iou": 1.0, "logging_frequency": 1, "train_batch_size": 2,
       "gradient_accumulation_frequency": 2, "checkpoint_every": 1}
WARMUP = {"name": "multistep", "milestones": [100], "lr_warmup_steps": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("optedges") / "data", train=6, validation=2, seed=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """Each optimizer's checkpoint after one epoch, without warmup."""
    tmp = tmp_path_factory.mktemp("optedges-run")
    out = {}
    for name in ("adam", "lamb"):
        run = write_run(tmp / f"{name}.toml", data, tmp / name, run=ODD, optimizer={"name": name})
        r = run_host(run)
        assert r.returncode == 1, r.stderr
        out[name] = tmp / name / "checkpoint-epoch1.pt"
    return out


def tensors_of(checkpoint):
    out = dict(checkpoint["model"])
    for i, entry in checkpoint["optimizer"]["state"].items():
        out.update({f"state{i}.{k}": v for k, v in entry.items()})
    return out


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "lamb"])
def test_a_checkpoint_at_learning_rate_zero_resumes_as_the_uninterrupted_run(tmp_path, data, optimizer):
    """The state records the learning rate of its last step, 0 during a warmup's first step. PyTorch's
    load_state_dict takes it; the plugins refused it (lr "expected > 0"), so a run could not resume
    from its own checkpoint."""
    common = {"optimizer": {"name": optimizer}, "scheduler": WARMUP}
    whole = write_run(tmp_path / "whole.toml", data, tmp_path / "whole", run={**ODD, "max_epochs": 2}, **common)
    assert run_host(whole).returncode == 1
    first = write_run(tmp_path / "first.toml", data, tmp_path / "first", run=ODD, **common)
    assert run_host(first).returncode == 1
    saved = torch.load(tmp_path / "first" / "checkpoint-epoch1.pt", weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["lr"] == 0.0
    if optimizer != "lamb":
        # PyTorch's own optimizer takes this state as it is.
        state = saved["optimizer"]
        params = [torch.nn.Parameter(state["state"][i]["exp_avg"].clone()) for i in sorted(state["state"])]
        state = {**state, "param_groups": [{**state["param_groups"][0], "params": sorted(state["state"])}]}
        python = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam)(params, lr=1.0, eps=1e-6)
        python.load_state_dict(state)
        assert python.param_groups[0]["lr"] == 0.0

    rest = write_run(tmp_path / "rest.toml", data, tmp_path / "rest",
                     run={**ODD, "max_epochs": 2, "resume": str(tmp_path / "first" / "checkpoint-epoch1.pt")},
                     **common)
    r = run_host(rest)
    assert r.returncode == 1, r.stderr[-2000:]
    a = torch.load(tmp_path / "whole" / "checkpoint-epoch2.pt", weights_only=True)
    b = torch.load(tmp_path / "rest" / "checkpoint-epoch2.pt", weights_only=True)
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"] == 0.002 * 2 / 4
    ta, tb = tensors_of(a), tensors_of(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    lrs = lambda out: [e["value"] for e in read_events(out / "mlperf.log") if e["key"] == "learning_rate"]
    assert lrs(tmp_path / "rest") == lrs(tmp_path / "whole")[-len(lrs(tmp_path / "rest")):]


def group(c):
    return c["optimizer"]["param_groups"][0]


def amsgrad(c):
    # As torch.optim.Adam(amsgrad=True) writes it: the flag and a running maximum per parameter.
    group(c)["amsgrad"] = True
    for entry in c["optimizer"]["state"].values():
        entry["max_exp_avg_sq"] = entry["exp_avg_sq"] * 2


ADAM = "'optimizer': Adam optimizer state: "
LAMB = "'optimizer': LAMB optimizer state: "

# What PyTorch's load_state_dict would continue with, and these optimizers cannot: they used to ignore the
# key and continue as plain Adam / LAMB with eps 1e-6.
OTHER_OPTIONS = {
    "adam_amsgrad": ("adam", amsgrad, ADAM + 'param_groups[0]["amsgrad"] is True'),
    "adam_maximize": ("adam", lambda c: group(c).__setitem__("maximize", True),
                      ADAM + 'param_groups[0]["maximize"] is True'),
    "adam_eps": ("adam", lambda c: group(c).__setitem__("eps", 1e-8),
                 ADAM + 'param_groups[0]["eps"] is 1e-08, and SPEC 5 fixes eps at 1e-06'),
    "adam_eps_nan": ("adam", lambda c: group(c).__setitem__("eps", float("nan")),
                     ADAM + 'param_groups[0]["eps"] is nan, and SPEC 5 fixes eps at 1e-06'),
    "lamb_eps": ("lamb", lambda c: group(c).__setitem__("eps", 1e-8),
                 LAMB + 'param_groups[0]["eps"] is 1e-08, and SPEC 5 fixes eps at 1e-06'),
}

# LAMB's step count sits in the group (APEX FusedLAMB's layout), where the core's check of the per-parameter
# "step" entries does not look: -1 used to end the run as diverged (bias correction 1 - b^0 = 0), the others
# to train on with another count.
LAMB_STEPS = {"negative": -1, "fraction": 2.5, "nan": float("nan")}


def resume_edited(tmp_path, data, checkpoint, optimizer, edit):
    c = torch.load(checkpoint, weights_only=True)
    edit(c)
    path = tmp_path / "edited.pt"
    torch.save(c, path)
    cfg = write_run(tmp_path / "resume.toml", data, tmp_path / "resumed",
                    run={**ODD, "max_epochs": 2, "resume": str(path)}, optimizer={"name": optimizer})
    return path, run_host(cfg)


@pytest.mark.parametrize("case", sorted(OTHER_OPTIONS))
def test_a_state_with_options_these_optimizers_lack_is_refused(tmp_path, data, trained, case):
    optimizer, edit, message = OTHER_OPTIONS[case]
    path, r = resume_edited(tmp_path, data, trained[optimizer], optimizer, edit)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{path}: {message}" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "resumed").exists()


@pytest.mark.parametrize("case", sorted(LAMB_STEPS))
def test_a_lamb_step_count_that_is_no_whole_number_is_refused(tmp_path, data, trained, case):
    value = LAMB_STEPS[case]
    path, r = resume_edited(tmp_path, data, trained["lamb"], "lamb", lambda c: group(c).__setitem__("step", value))
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f'{path}: {LAMB}param_groups[0]["step"] is {value:g}, expected a non-negative whole number'
            in r.stderr), r.stderr[-2000:]


@pytest.mark.parametrize("value", [2**32 + 1, 2**62])
def test_a_lamb_step_count_beyond_2_to_32_is_refused_as_the_checkpoint_s_step_is(tmp_path, data, trained, value):
    """The checkpoint's own step above 2^32 is a damaged file; LAMB's group step of 2^62 was taken."""
    path, r = resume_edited(tmp_path, data, trained["lamb"], "lamb", lambda c: group(c).__setitem__("step", value))
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f'{path}: {LAMB}param_groups[0]["step"] is {value:.0f}, expected a non-negative whole number up to '
            "2^32 (years of training): a larger one is a damaged file" in r.stderr), r.stderr[-2000:]


def test_a_lamb_state_without_a_step_count_starts_it_at_zero(tmp_path, data, trained):
    """FusedLAMB adds "step" to the group at its first step: a state saved before has none."""
    path, r = resume_edited(tmp_path, data, trained["lamb"], "lamb", lambda c: group(c).pop("step"))
    assert r.returncode == 1, r.stderr[-2000:]
    saved = torch.load(tmp_path / "resumed" / "checkpoint-epoch2.pt", weights_only=True)
    assert group(saved)["step"] == 2  # the two optimizer steps of epoch 2 (3 batches, one carried over)


@pytest.mark.parametrize("key", ["lr", "weight_decay"])
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "lamb"])
def test_a_rate_beyond_float32_is_refused_before_the_run(tmp_path, data, optimizer, key):
    """The fused kernels take both as float32: 1e39 failed as an "internal error" (exit 3) once training had
    begun, leaving a record of an aborted run."""
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, optimizer={"name": optimizer})
    r = run_host(run, "--set", f"optimizer.{key}=1e39")
    assert r.returncode == 2, r.stderr
    low = "(0.0" if key == "lr" else "[0.0"
    assert f"deepcam-host: --set optimizer.{key}=1e39: 1e+39 is out of range {low}, 3.4028234663852886e+38]" \
        in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("scheduler", ["multistep", "cosine_annealing"])
def test_a_warmup_whose_top_overflows_float32_is_refused_before_the_run(tmp_path, data, scheduler):
    """lr and lr_warmup_factor each within bounds, their product beyond float32: the run trained two steps and
    stopped as an "internal error" blaming the scheduler plugin (exit 3)."""
    out = tmp_path / "out"
    extra = {"t_max": 5, "milestones": None} if scheduler == "cosine_annealing" else {}
    run = write_run(tmp_path / "run.toml", data, out,
                    scheduler={"name": scheduler, "lr_warmup_steps": 4, "lr_warmup_factor": 1e308, **extra})
    r = run_host(run)
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"deepcam-host: {run}:" in r.stderr
            and "[scheduler] lr_warmup_factor = 1e+308: the warm-up would climb towards [optimizer] lr x "
                "lr_warmup_factor = 0.002 x 1e+308, beyond float32's largest number 3.4028234663852886e+38"
            in r.stderr), r.stderr[-2000:]
    assert not out.exists()


def test_a_cosine_floor_beyond_float32_is_refused_before_the_run(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out,
                    scheduler={"name": "cosine_annealing", "t_max": 5, "milestones": None})
    r = run_host(run, "--set", "scheduler.eta_min=1e39")
    assert r.returncode == 2, r.stderr
    assert ("deepcam-host: --set scheduler.eta_min=1e39: 1e+39 is out of range [0.0, 3.4028234663852886e+38]"
            in r.stderr), r.stderr
    assert not out.exists()
