"""Where a refused value came from: every range check, the schema's and the
plugins' own, names the file and line of a TOML value or the --set item of an
override; --describe prints bounds as the checks apply them (open ones
open); and a closed-division run that cannot be closed is told so at start."""


import pytest
import torch

from helpers import SGD, run_host, synth, write_run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("messages") / "data", train=4, validation=2)


def line_of(run, section, key):
    """The 1-based line of `key = ` inside [section] of a run file."""
    current = None
    for number, line in enumerate(run.read_text().splitlines(), start=1):
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(f"{key} ="):
            return number
    raise AssertionError(f"no {section}.{key} in {run}")


def refusal(tmp_path, data_root, *extra, **changes):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data_root, out, **changes)
    r = run_host(run, *extra)
    assert r.returncode == 2, r.stderr
    assert not out.exists()
    lines = [l for l in r.stderr.splitlines() if l.startswith("deepcam-host:")]
    assert len(lines) == 1, r.stderr
    return run, lines[0]


@pytest.mark.parametrize("section,key,value,bounds", [
    ("optimizer", "lr", 0.0, "(0.0, 3.4028234663852886e+38]"),  # float32's largest: the kernels' type
    ("optimizer", "betas", [0.9, 1.0], "[0.0, 1.0)"),
    ("optimizer", "weight_decay", -1.0, "[0.0, 3.4028234663852886e+38]"),
    ("model", "width", 0.0, "(0.0, 1.0]"),
    ("scheduler", "decay_rate", 0.0, "(0.0, 1.0]"),
])
def test_a_value_out_of_its_bounds_names_file_line_and_the_open_bounds(tmp_path, data, section, key, value, bounds):
    run, msg = refusal(tmp_path, data, **{section: {key: value}})
    assert f"run.toml:{line_of(run, section, key)} [{section}] {key}:" in msg, msg
    assert f"out of range {bounds}" in msg, msg


def test_lamb_max_grad_norm_zero_is_refused_at_its_line(tmp_path, data):
    run, msg = refusal(tmp_path, data, optimizer={"name": "lamb", "lr": 0.002, "max_grad_norm": 0.0})
    assert f"run.toml:{line_of(run, 'optimizer', 'max_grad_norm')} [optimizer] max_grad_norm:" in msg, msg
    assert "(0.0, inf)" in msg


def test_an_override_out_of_bounds_names_the_set_item(tmp_path, data):
    _, msg = refusal(tmp_path, data, "--set", "optimizer.lr=0")
    assert "--set optimizer.lr=0:" in msg and "(0.0, 3.4028234663852886e+38]" in msg, msg


def test_a_number_too_small_for_a_double_is_said_to_read_as_zero(tmp_path, data):
    # TOML reads 1e-400 as 0.0; "0.0 is out of range" alone names a value nobody wrote.
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", optimizer={"lr": 0.5})
    run.write_text(run.read_text().replace("lr = 0.5", "lr = 1e-400"))
    r = run_host(run)
    assert r.returncode == 2, r.stderr
    assert (f"run.toml:{line_of(run, 'optimizer', 'lr')} [optimizer] lr: 0.0 is out of range "
            "(0.0, 3.4028234663852886e+38] (1e-400 is nearer zero than any double and reads as 0.0)") in r.stderr, \
        r.stderr
    _, msg = refusal(tmp_path, data, "--set", "optimizer.lr=-2.5e-999")
    assert msg.endswith("--set optimizer.lr=-2.5e-999: -0.0 is out of range (0.0, 3.4028234663852886e+38] "
                        "(-2.5e-999 is nearer zero than any double and reads as -0.0)"), msg
    # A zero written as one gets no such note.
    _, msg = refusal(tmp_path, data, "--set", "optimizer.lr=0e-400")
    assert msg.endswith("0.0 is out of range (0.0, 3.4028234663852886e+38]"), msg


@pytest.mark.parametrize("item", ["reader.x.y=1", "run.x.y=1"])
def test_an_unknown_key_below_a_section_names_the_set_item_not_the_file(tmp_path, data, item):
    # The table the item made was blamed on the run file, which has no such key.
    _, msg = refusal(tmp_path, data, "--set", item)
    assert msg.startswith(f"deepcam-host: --set {item}: unknown key"), msg


def test_a_training_batch_larger_than_the_training_set_is_refused_before_the_run(tmp_path, data):
    # It was found at the end of the first epoch, with the run's log kept, naming the data folder.
    _, msg = refusal(tmp_path, data, "--set", "run.train_batch_size=5")
    assert (f"--set run.train_batch_size=5: more than the 4 training samples in {data}; "
            "lower it to at most 4") in msg, msg


def test_a_channel_selected_twice_is_refused_at_its_line(tmp_path, data):
    # [0, 1, 5, 1] trained a model with 4 inputs, two of them one field.
    run, msg = refusal(tmp_path, data, data={"channels": [0, 1, 5, 1]})
    assert (f"run.toml:{line_of(run, 'data', 'channels')} [data] channels: channel 1 is selected twice "
            "(items 1 and 3)") in msg, msg
    _, msg = refusal(tmp_path, data, "--set", "data.channels=[2, 2]")
    assert "--set data.channels=[2, 2]: channel 2 is selected twice (items 0 and 1)" in msg, msg


@pytest.mark.parametrize("item,says", [
    # The reader's "no input channels selected", after the resolved configuration was printed.
    ("data.channels=[]", "--set data.channels=[]: no channel selected"),
    ("run.output_dir=", "--set run.output_dir=: empty; name the folder"),
    # Was "[data] root: : no such directory".
    ('data.root=""', "--set data.root=\"\": empty; name the data set's folder"),
    # Blamed on the run file, which says nothing of the device.
    pytest.param("run.device=cuda", '--set run.device=cuda: no CUDA device is available',
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_a_value_that_cannot_work_names_the_set_item(tmp_path, data, item, says):
    _, msg = refusal(tmp_path, data, "--set", item)
    assert says in msg, msg


@pytest.mark.parametrize("reader", ["hdf5", "prefetch"])
def test_a_validation_batch_larger_than_the_validation_set_takes_the_set(tmp_path, data, reader):
    # The readers' buffers took the batch size the range allows, not the samples: at its top, 1e6
    # samples, 884 GB here, more than any machine that runs this can reserve.
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, run={"validation_batch_size": 1000000, "target_iou": 1.0})
    nested = ["--set", "reader.name=prefetch", "--set", "reader.source.name=hdf5"] if reader == "prefetch" else []
    r = run_host(run, *nested)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "eval_accuracy" in (out / "mlperf.log").read_text()


@pytest.mark.parametrize("item,bounds", [("optimizer.lr=inf", "(0.0, 3.4028234663852886e+38]"),
                                         ("optimizer.weight_decay=inf", "[0.0, 3.4028234663852886e+38]"),
                                         ("optimizer.weight_decay=-inf", "[0.0, 3.4028234663852886e+38]")])
def test_an_infinite_value_is_outside_the_bounds_it_is_shown_with(tmp_path, data, item, bounds):
    _, msg = refusal(tmp_path, data, "--set", item)
    assert f"--set {item}:" in msg and f"out of range {bounds}" in msg, msg


def test_a_plugin_check_beyond_the_schema_names_file_and_line(tmp_path, data):
    # Two betas and output_stride in {8, 16} are the plugins' own checks.
    run, msg = refusal(tmp_path, data, optimizer={"betas": [0.9]})
    assert f"run.toml:{line_of(run, 'optimizer', 'betas')} [optimizer] betas has 1 values" in msg, msg
    run, msg = refusal(tmp_path, data, model={"output_stride": 12})
    assert f"run.toml:{line_of(run, 'model', 'output_stride')} [model] output_stride = 12: must be 8 or 16" in msg, msg
    _, msg = refusal(tmp_path, data, "--set", "model.output_stride=12")
    assert "--set model.output_stride=12: must be 8 or 16" in msg, msg


def refused_saying(r, says):
    """The one deepcam-host line of a refused run that holds `says`."""
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("deepcam-host:") and says in l]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


# A message about a value names it once: `file:line [section] key = value: ...`, or the --set item, which
# holds the value already (it printed "--set model.output_stride=12 = 12: ...").
def test_cuda_graphs_on_the_cpu_names_the_set_item_once(tmp_path, data):
    says = ", but the training step of this run cannot be captured"
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"cuda_graphs": True})
    msg = refused_saying(run_host(run), says)
    assert f"run.toml:{line_of(run, 'run', 'cuda_graphs')} [run] cuda_graphs = true{says}:" in msg, msg
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    msg = refused_saying(run_host(run, "--set", "run.cuda_graphs=true"), says)
    assert msg == f"deepcam-host: --set run.cuda_graphs=true{says}:", msg


def test_a_missing_data_root_or_a_log_file_naming_no_file_names_the_set_item_once(tmp_path, data):
    # They printed "--set data.root=/x: /x: no such directory" and "--set mlperf.log_file=: \"\" names no file".
    missing = tmp_path / "missing"
    _, msg = refusal(tmp_path, data, "--set", f"data.root={missing}")
    assert msg == f"deepcam-host: --set data.root={missing}: no such directory", msg
    # A relative path is shown as resolved, which the item does not show.
    _, msg = refusal(tmp_path, data, "--set", "data.root=missing")
    assert msg.startswith("deepcam-host: --set data.root=missing: /") and msg.endswith("/missing: no such directory")
    _, msg = refusal(tmp_path, data, "--set", "mlperf.log_file=")
    assert msg == "deepcam-host: --set mlperf.log_file=: names no file", msg


def test_a_warmup_beyond_float32_names_the_set_item_once(tmp_path, data):
    says = ": the warm-up would climb towards [optimizer] lr x lr_warmup_factor = 0.002 x 1e+308"
    scheduler = {"lr_warmup_steps": 4, "lr_warmup_factor": 1e308}
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", scheduler=scheduler)
    msg = refused_saying(run_host(run), says)
    assert f"run.toml:{line_of(run, 'scheduler', 'lr_warmup_factor')} [scheduler] lr_warmup_factor = 1e+308{says}" \
        in msg, msg
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", scheduler={"lr_warmup_steps": 4})
    msg = refused_saying(run_host(run, "--set", "scheduler.lr_warmup_factor=1e308"), says)
    assert f"deepcam-host: --set scheduler.lr_warmup_factor=1e308{says}" in msg, msg


def test_a_missing_stage_dir_names_the_set_item_once_not_the_run_file(tmp_path, data):
    # The message named "run.toml [reader] stage_dir" for an --set value too.
    missing = tmp_path / "missing"
    says = ": no such directory; give an existing node-local directory"
    source = ["--set", "reader.source.name=hdf5"]
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    reader={"name": "prefetch", "stage_dir": str(missing)})
    msg = refused_saying(run_host(run, *source), says)
    assert f'run.toml:{line_of(run, "reader", "stage_dir")} [reader] stage_dir = "{missing}"{says}' in msg, msg
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", reader={"name": "prefetch"})
    msg = refused_saying(run_host(run, *source, "--set", f"reader.stage_dir={missing}"), says)
    assert f"deepcam-host: --set reader.stage_dir={missing}{says}" in msg, msg


def describe_line(what, key):
    r = run_host("--describe", what)
    assert r.returncode == 0, r.stderr
    line = next((l for l in r.stdout.splitlines() if l.split()[:1] == [key]), None)
    assert line is not None, r.stdout
    return line


@pytest.mark.parametrize("what,key,bounds", [
    ("optimizer/lamb", "lr", "range (0.0, 3.4028234663852886e+38]"),
    ("optimizer/lamb", "betas", "range [0.0, 1.0)"),
    ("optimizer/lamb", "max_grad_norm", "range (0.0, inf)"),
    ("model/deeplabv3plus", "width", "range (0.0, 1.0]"),
    ("scheduler/multistep", "decay_rate", "range (0.0, 1.0]"),
    ("scheduler/cosine_annealing", "t_max", "range [1, inf)"),
    ("run", "max_epochs", "range [1, inf)"),
])
def test_describe_prints_bounds_as_the_check_applies_them(what, key, bounds):
    assert bounds in describe_line(what, key)


def test_a_closed_division_run_that_cannot_be_closed_is_warned_at_start(tmp_path, data):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out,
                    mlperf={"division": "closed"}, data={"channels": [0, 1, 2]},
                    optimizer={"name": "lamb", "lr": 0.002, "max_grad_norm": 2.0})
    r = run_host(run, "--quiet", "--set", "model.output_stride=8")
    assert r.returncode in (0, 1), r.stderr
    warning = r.stderr[r.stderr.index("warning:"):]
    assert f"run.toml:{line_of(run, 'mlperf', 'division')} [mlperf] division" in warning
    for expected in (f"run.toml:{line_of(run, 'model', 'width')} [model] width = 0.0625 (closed: 1.0",
                     f"run.toml:{line_of(run, 'model', 'middle_blocks')} [model] middle_blocks = 1 (closed: 16",
                     "  --set model.output_stride=8 (closed: 16, the reference network's encoder)",
                     "[data] channels selects 3 channels (closed: all 16",
                     "[optimizer] max_grad_norm = 2.0 (closed: 1.0)",
                     "4 training and 2 validation samples (closed: the full data set, 121266 and 15158)"):
        assert expected in warning, warning
    # Warned before training, not after it: the warning precedes the first epoch's lines.
    first_epoch_line = next(i for i, l in enumerate(r.stderr.splitlines()) if l.startswith("epoch "))
    warning_line = next(i for i, l in enumerate(r.stderr.splitlines()) if "warning:" in l)
    assert warning_line < first_epoch_line, r.stderr


def test_an_open_division_run_gets_no_closed_warning(tmp_path, data):
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = run_host(run, "--quiet")
    assert r.returncode in (0, 1), r.stderr
    assert "closed" not in r.stderr


@pytest.mark.parametrize("item,expected", [
    ("optimizer.lr=nan", "nan is not a number this key takes (its range: [0.0, inf))"),  # the SGD example's lr
    # dampening has no range (as in PyTorch): the message showed the schema's no-range marker as one.
    ("optimizer.dampening=nan", "nan is not a number this key takes"),
])
def test_nan_is_refused_as_no_number_with_the_range_only_where_there_is_one(tmp_path, data, item, expected):
    run, msg = refusal(tmp_path, data, "--set", item, optimizer=SGD)
    assert msg == f"deepcam-host: --set {item}: {expected}", msg
