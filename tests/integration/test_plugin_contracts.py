"""What a plugin hands the engine is checked against the plugin interface
(docs/writing-plugins.md) on its sizes and dtypes: a reader's batch that
breaks it, or a model's logits, is a bug of that plugin, named with its file
(an internal error, status 3), never an epoch silently cut short or a
LibTorch message about the loss."""

import json
import re
import signal

import pytest

from helpers import FIXTURES, read_events, run_data, run_host, synth, write_run

CONTRACT = FIXTURES / "libdeepcam_reader_contract.so"
MODEL = FIXTURES / "libdeepcam_model_contractmodel.so"
STATEFUL = FIXTURES / "libdeepcam_optimizer_stateful.so"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # Only the data root's existence is read: the fixture makes its own samples.
    return synth(tmp_path_factory.mktemp("contract") / "data", train=2, validation=1, height=16, width=16)


def contract_run(tmp_path, data, fault, **run):
    out = tmp_path / "out"
    cfg = write_run(tmp_path / "run.toml", data, out,
                    run={"max_epochs": 1, "target_iou": 1.0, "train_batch_size": 2, "validation_batch_size": 4,
                         "logging_frequency": 1, **run},
                    reader={"name": "contract", "library": str(CONTRACT), "fault": fault, "at": 1, "threads": None})
    return run_host(cfg, "--quiet"), out


def test_a_reader_that_keeps_the_interface_trains(tmp_path, data):
    r, _ = contract_run(tmp_path, data, "none")
    assert r.returncode == 1, r.stderr[-3000:]  # target 1.0 not reached


@pytest.mark.parametrize("fault, says", [
    # A short training batch mid-epoch ended the epoch there, without a word (at batch 0 the data set was
    # blamed: "no complete training batch").
    ("short", "handed out train batch 1 with data [1, 16, 16, 16] float32 and labels [1, 16, 16] int64"),
    ("labels", "handed out train batch 1 with data [2, 16, 16, 16] float32 and labels [2, 16, 16] int32"),
    ("channels", "handed out train batch 1 with data [2, 15, 16, 16] float32"),
    ("early", "ended training epoch 1 after 1 of the 4 batches its local_samples (8) make"),
    ("validation", "handed out 7 validation samples, and its local_samples says 8"),
    # It reached the loss: "Target 7 is out of bounds." (a device-side assert on a GPU).
    ("classes", "handed out train batch 1 with labels from 0 to 7; the classes are 0 (background), 1 (tropical "
                "cyclone) and 2 (atmospheric river)"),
])
def test_a_reader_that_breaks_the_interface_is_named(tmp_path, data, fault, says):
    r, out = contract_run(tmp_path, data, fault)
    assert r.returncode == 3, r.stderr[-3000:]
    assert f"internal error: {CONTRACT}: the reader plugin 'contract' " in r.stderr, r.stderr[-3000:]
    assert says in r.stderr and "(a bug in the plugin)" in r.stderr, r.stderr[-3000:]
    assert "frame #" not in r.stderr


@pytest.mark.parametrize("fault, says", [
    ("short", "handed out train batch 1 with data [1, 16, 16, 16] float32 and labels [1, 16, 16] int64"),
    ("labels", "handed out train batch 1 with data [2, 16, 16, 16] float32 and labels [2, 16, 16] int32"),
    ("early", "ended training epoch 1 after 1 of the 4 batches its local_samples (8) make"),
    ("validation", "handed out 7 validation samples, and its local_samples says 8"),
    ("classes", "handed out train batch 1 with labels from 0 to 7"),
    ("counts", "says its train split has -5 samples over all ranks and 8 on this rank"),
    ("throws", "failed: contract reader: next() failed"),
])
def test_deepcam_data_read_checks_a_reader_as_training_does(tmp_path, data, fault, says):
    """read, which "reads as training does", passed each of these with a JSON line and status 0 (a short batch
    counted, labels of 7 read), or blamed the data (status 1) for what the plugin threw."""
    cfg = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    run={"train_batch_size": 2, "validation_batch_size": 4},
                    reader={"name": "contract", "library": str(CONTRACT), "fault": fault, "at": 1, "threads": None})
    r = run_data("read", cfg, "--with-validation", timeout=300)
    assert r.returncode == 3 and r.stdout == "", r.stdout + r.stderr[-3000:]
    assert f"deepcam-data: internal error: {CONTRACT}: the reader plugin 'contract' {says}" in r.stderr, \
        r.stderr[-3000:]
    assert "(a bug in the plugin" in r.stderr


@pytest.mark.parametrize("fault, says", [("oom", "CUDA out of memory. Tried to allocate 2.00 GiB (contract reader)"),
                                         ("hostoom", "std::bad_alloc")])
def test_running_out_of_memory_mid_run_is_said_as_such_and_closes_the_log(tmp_path, data, fault, says):
    # It was "internal error: ..." (status 3), as if deepcam-host had a bug; std::bad_alloc from a plugin was
    # blamed on the plugin.
    r, out = contract_run(tmp_path, data, fault)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"deepcam-host: out of memory: {says}\n  a smaller [run] train_batch_size" in r.stderr, r.stderr[-3000:]
    assert "internal error" not in r.stderr and "frame #" not in r.stderr
    stop = [e for e in read_events(out / "mlperf.log") if e["key"] == "run_stop"]
    assert len(stop) == 1 and stop[0]["metadata"]["status"] == "aborted", stop


def test_what_a_plugin_s_method_throws_names_its_file(tmp_path, data):
    # A reader's next() that threw a std::runtime_error ended the run as "internal error: <its message>",
    # naming no plugin.
    r, _ = contract_run(tmp_path, data, "throws")
    assert r.returncode == 3, r.stderr[-3000:]
    assert (f"deepcam-host: internal error: {CONTRACT}: the reader plugin 'contract' failed: contract reader: next() "
            "failed") in r.stderr, r.stderr[-3000:]


def test_an_optimizer_s_calls_that_throw_name_its_file(tmp_path, data):
    # Its state_dict() (a checkpoint written) or load_state_dict() (a resume) that threw a std::runtime_error
    # ended the run as "internal error: <its message>", naming no plugin, as step() no longer does.
    def run(name, fault, **more):
        out = tmp_path / name
        cfg = write_run(tmp_path / f"{name}.toml", data, out, run={"max_epochs": 1, "target_iou": 1.0, **more},
                        optimizer={"name": "stateful", "library": str(STATEFUL), "fault": fault, "lr": 0.1})
        return run_host(cfg, "--quiet"), out

    failed = f"deepcam-host: internal error: {STATEFUL}: the optimizer plugin 'stateful' failed: stateful fixture: "
    r, _ = run("save", "save")
    assert r.returncode == 3 and failed + "state_dict() failed" in r.stderr, r.stderr[-3000:]
    r, out = run("kept", "none")
    assert r.returncode == 1 and (out / "checkpoint-epoch1.pt").is_file(), r.stderr[-3000:]
    r, _ = run("load", "load", max_epochs=2, resume=str(out / "checkpoint-epoch1.pt"))
    assert r.returncode == 3 and failed + "load_state_dict() failed" in r.stderr, r.stderr[-3000:]
    # The calls of every step too: they read as "internal error: stateful fixture: set_lr() failed".
    for call in ("set_lr", "zero_grad"):
        r, _ = run(call, call)
        assert r.returncode == 3 and failed + f"{call}() failed (a bug in the plugin)" in r.stderr, r.stderr[-3000:]
    # A state_dict() no resume can load was saved as a checkpoint, and refused only at the resume, naming the
    # checkpoint (None: "a checkpoint of the model alone"), or ended as "Cannot copy out of meta tensor".
    for fault, says in [("none_state", "is a None, not a dict"),
                        ("negative_step", "['state'][0]['step'] is -8, expected a non-negative whole number"),
                        ("meta_state", "['state'][0]['exp_avg'] is a meta tensor, which holds no data"),
                        # Saved, then refused by every resume as "the state of a run that diverged".
                        ("nan_state", "['state'][0]['exp_avg'] holds NaN or Inf, which a resume refuses")]:
        r, out = run(fault, fault)
        assert r.returncode == 3, r.stderr[-3000:]
        assert failed.replace("stateful fixture: ", f"its state_dict() {says}; ") in r.stderr, r.stderr[-3000:]
        assert not list(out.glob("*.pt")) and not list(out.glob(".*")), list(out.iterdir())
    # A PluginBug from a method (a key its schema lacks) was said as the run file's error (status 2), naming
    # neither the plugin nor its file; an ATen op's failure in step() named neither either.
    r, _ = run("plugin_bug", "plugin_bug")
    assert r.returncode == 3, r.stderr[-3000:]
    assert (f"deepcam-host: internal error: {STATEFUL}: stateful fixture: step() asked for an undeclared key (a bug "
            "in the optimizer plugin 'stateful')") in r.stderr, r.stderr[-3000:]
    r, _ = run("aten", "aten")
    assert r.returncode == 3, r.stderr[-3000:]
    assert (f"deepcam-host: internal error: {STATEFUL}: the optimizer plugin 'stateful' failed in LibTorch: output "
            "with shape [3] doesn't match the broadcast shape [4, 3]") in r.stderr, r.stderr[-3000:]
    assert "Exception raised from" not in r.stderr and "frame #" not in r.stderr  # LibTorch's C++ backtrace
    # A gradient norm that is no 0-d tensor: "output with shape [] doesn't match the broadcast shape [3]".
    r, _ = run("norm", "norm")
    assert r.returncode == 3, r.stderr[-3000:]
    assert (f"deepcam-host: internal error: {STATEFUL}: the optimizer plugin 'stateful' returned the gradient norm "
            "[3] float32 on cpu; the optimizer interface wants an undefined tensor or a 0-d floating-point one on "
            "the run's device (cpu) (a bug in the plugin)") in r.stderr, r.stderr[-3000:]


def test_a_reader_s_sample_counts_are_checked_before_the_log_takes_them(tmp_path, data):
    # train_samples -5 went into the MLPerf log, which the checker passed but for the accuracy target.
    r, out = contract_run(tmp_path, data, "counts")
    assert r.returncode == 3, r.stderr[-3000:]
    assert (f"internal error: {CONTRACT}: the reader plugin 'contract' says its train split has -5 samples over "
            "all ranks and 8 on this rank (a bug in the plugin)") in r.stderr, r.stderr[-3000:]
    assert not out.exists()  # refused before run_start: no record kept


def test_a_plugin_s_stop_request_mid_run_keeps_the_record_and_says_where_it_stopped(tmp_path, data):
    # deepcam-host said of any stop request that the run had not started and kept no log, though it had
    # trained a step and kept both; signal 0 ended the process with status 128.
    r, out = contract_run(tmp_path, data, "stop")
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    assert ("deepcam-host: contract reader: stopped at its batch; the run stopped at step 1: run_stop status "
            "\"aborted\", its log and config.toml are kept") in r.stderr, r.stderr[-3000:]
    assert "had not started" not in r.stderr
    events = [json.loads(l.split(":::MLLOG ", 1)[1]) for l in (out / "mlperf.log").read_text().splitlines()]
    assert events[-1]["key"] == "run_stop" and events[-1]["metadata"]["status"] == "aborted", events[-1]
    assert (out / "config.toml").is_file()
    (tmp_path / "nosignal").mkdir()
    r, _ = contract_run(tmp_path / "nosignal", data, "nosignal")
    assert r.returncode == 3, r.stderr[-3000:]
    # Named with the plugin, as its other faults are.
    assert (f"internal error: {CONTRACT}: the reader plugin 'contract' stopped for signal 0, which is no signal: "
            "contract reader: stopped at its batch (a bug in the plugin)") in r.stderr, r.stderr[-3000:]
    # deepcam-data read raised signal 0 (nothing) and exited 128; then it named no plugin, with bad data's 1.
    r = run_data("read", tmp_path / "nosignal" / "run.toml", timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]
    assert (f"deepcam-data: internal error: {CONTRACT}: the reader plugin 'contract' stopped for signal 0, which is "
            "no signal: contract reader: stopped at its batch (a bug in the plugin)") in r.stderr, r.stderr[-3000:]


def test_a_source_reader_s_wrong_sample_shape_is_named_with_its_file(tmp_path, data):
    # Behind the prefetch reader it was blamed on prefetch ("the reader plugin 'prefetch' handed out ..."), and a
    # negative height on the run file's batch size.
    out = tmp_path / "out"
    cfg = write_run(tmp_path / "run.toml", data, out, run={"max_epochs": 1, "target_iou": 1.0},
                    reader={"name": "prefetch", "depth": 2, "threads": 1},
                    **{"reader.source": {"name": "contract", "library": str(CONTRACT), "fault": "shape"}})
    r = run_host(cfg, "--quiet")
    assert r.returncode == 3, r.stderr[-3000:]
    assert (f"internal error: {CONTRACT}: the plugin's factory failed: its sample_shape() is (17, 16, 16), and a "
            "reader reports (C, H, W) of the run's 16 channels ([data] channels), each above 0 (a bug in the "
            "plugin)") in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("fault, stage, says", [
    ("negcount", False, "its sample_count() of the train split is -5 (a bug in the plugin)"),
    ("none", True, "its sample_files() of train sample 0 is []; staging copies a sample's files, and it names none "
                   "(a bug in the plugin)"),
])
def test_a_source_reader_s_bad_listing_is_named_with_its_file(tmp_path, data, fault, stage, says):
    """Behind the prefetch reader a count of -5 was blamed on its [reader] shuffle settings, and a sample of no
    files on its stage_dir ("train sample 1 was not staged but is read"), status 2, naming no source."""
    out = tmp_path / "out"
    cfg = write_run(tmp_path / "run.toml", data, out, run={"max_epochs": 1, "target_iou": 1.0},
                    reader={"name": "prefetch", "depth": 2, "threads": 1,
                            **({"stage_dir": str(tmp_path)} if stage else {})},
                    **{"reader.source": {"name": "contract", "library": str(CONTRACT), "fault": fault}})
    r = run_host(cfg, "--quiet")
    assert r.returncode == 3, r.stderr[-3000:]
    assert f"internal error: {CONTRACT}: the plugin's factory failed: {says}" in r.stderr, r.stderr[-3000:]


def test_a_failure_behind_the_prefetch_reader_names_its_source_too(tmp_path, data):
    # The source's read_sample() throws; the message named only the prefetch reader's file.
    cfg = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"max_epochs": 1, "target_iou": 1.0},
                    reader={"name": "prefetch", "depth": 2, "threads": 1},
                    **{"reader.source": {"name": "contract", "library": str(CONTRACT), "fault": "none"}})
    r = run_host(cfg, "--quiet")
    assert r.returncode == 3, r.stderr[-3000:]
    assert re.search(r"internal error: \S+/libdeepcam_reader_prefetch\.so: the reader plugin 'prefetch' failed: the "
                     r"contract fixture reads no single samples \(a bug in the plugin, or in the reader plugin "
                     rf"'contract' it reads through \({re.escape(str(CONTRACT))}\)\)\n", r.stderr), r.stderr[-3000:]


def test_read_names_the_reader_whose_sample_files_do_not_exist(tmp_path, data):
    # It said only "train-0: cannot read its size", naming neither the reader nor what the name was.
    cfg = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    reader={"name": "contract", "library": str(CONTRACT), "fault": "phantom", "threads": None})
    r = run_data("read", cfg, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert ("deepcam-data: phantom-sample-0: cannot read its size: No such file or directory (a file of train sample "
            f"0, as the reader plugin 'contract' ({CONTRACT}) names it in sample_files(), whose files read "
            "measures)") in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("fault, shown", [("shape", "17, 16, 16"), ("noshape", "")])
@pytest.mark.parametrize("mode", ["train", "benchmark", "read"])
def test_a_reader_s_wrong_sample_shape_is_named_with_its_file_in_every_mode(tmp_path, data, fault, shown, mode):
    # Only a source behind the prefetch reader was checked: an empty shape crashed --benchmark (SIGSEGV), and
    # training blamed a wrong one on the batches it handed out.
    out = tmp_path / "out"
    cfg = write_run(tmp_path / "run.toml", data, out, run={"max_epochs": 1, "target_iou": 1.0},
                    reader={"name": "contract", "library": str(CONTRACT), "fault": fault, "threads": None})
    # read's status was bad data's 1.
    if mode == "read":
        r, said = run_data("read", cfg, timeout=300), "deepcam-data: internal error: "
    else:
        r = run_host(cfg, "--quiet", *(["--benchmark", "1"] if mode == "benchmark" else []))
        said = "deepcam-host: internal error: "
    assert r.returncode == 3, r.stderr[-3000:]
    assert (f"{said}{CONTRACT}: the plugin's factory failed: its sample_shape() is ({shown}), and "
            "a reader reports (C, H, W) of the run's 16 channels ([data] channels), each above 0 (a bug in the "
            "plugin)") in r.stderr, r.stderr[-3000:]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("fault, logits", [("classes", "[2, 2, 16, 16] float32"), ("half", "[2, 3, 8, 8] float32")])
def test_a_model_whose_logits_break_the_interface_is_named(tmp_path, data, fault, logits):
    """LibTorch's loss refused them with its own message and a C++ backtrace ("weight tensor should be
    defined either for all or no classes", "size mismatch"), naming no plugin."""
    out = tmp_path / "out"
    cfg = write_run(tmp_path / "run.toml", data, out, run={"max_epochs": 1, "target_iou": 1.0, "train_batch_size": 2},
                    reader={"name": "contract", "library": str(CONTRACT), "fault": "none", "threads": None},
                    model={"name": "contractmodel", "library": str(MODEL), "fault": fault, "width": None,
                           "middle_blocks": None})
    r = run_host(cfg, "--quiet")
    assert r.returncode == 3, r.stderr[-3000:]
    assert (f"internal error: {MODEL}: the model plugin 'contractmodel' returned logits {logits} for an input of "
            "shape [2, 16, 16, 16]") in r.stderr, r.stderr[-3000:]
    assert "frame #" not in r.stderr


def test_a_model_whose_logits_are_detached_is_named(tmp_path, data):
    """Backward refused them as LibTorch's "element 0 of tensors does not require grad", naming no plugin."""
    cfg = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    run={"max_epochs": 1, "target_iou": 1.0, "train_batch_size": 2},
                    reader={"name": "contract", "library": str(CONTRACT), "fault": "none", "threads": None},
                    model={"name": "contractmodel", "library": str(MODEL), "fault": "detached", "width": None,
                           "middle_blocks": None})
    r = run_host(cfg, "--quiet")
    assert r.returncode == 3, r.stderr[-3000:]
    assert (f"internal error: {MODEL}: the model plugin 'contractmodel' returned logits that do not require grad "
            "in training") in r.stderr, r.stderr[-3000:]
    assert "element 0 of tensors" not in r.stderr


def test_a_model_that_keeps_the_interface_trains(tmp_path, data):
    cfg = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    run={"max_epochs": 1, "target_iou": 1.0, "train_batch_size": 2},
                    reader={"name": "contract", "library": str(CONTRACT), "fault": "none", "threads": None},
                    model={"name": "contractmodel", "library": str(MODEL), "fault": "none", "width": None,
                           "middle_blocks": None})
    r = run_host(cfg, "--quiet")
    assert r.returncode == 1, r.stderr[-3000:]
