"""What a plugin hands the engine is checked against the plugin interface
(docs/writing-plugins.md) on its sizes and dtypes: a reader's batch that
breaks it, or a model's logits, is a bug of that plugin, named with its file
(an internal error, status 3), never an epoch silently cut short or a
LibTorch message about the loss."""

import pytest

from helpers import FIXTURES, run_host, synth, write_run

CONTRACT = FIXTURES / "libdeepcam_reader_contract.so"
MODEL = FIXTURES / "libdeepcam_model_contractmodel.so"


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
])
def test_a_reader_that_breaks_the_interface_is_named(tmp_path, data, fault, says):
    r, out = contract_run(tmp_path, data, fault)
    assert r.returncode == 3, r.stderr[-3000:]
    assert f"internal error: {CONTRACT}: the reader plugin 'contract' " in r.stderr, r.stderr[-3000:]
    assert says in r.stderr and "(a bug in the plugin)" in r.stderr, r.stderr[-3000:]
    assert "frame #" not in r.stderr


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


def test_a_model_that_keeps_the_interface_trains(tmp_path, data):
    cfg = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    run={"max_epochs": 1, "target_iou": 1.0, "train_batch_size": 2},
                    reader={"name": "contract", "library": str(CONTRACT), "fault": "none", "threads": None},
                    model={"name": "contractmodel", "library": str(MODEL), "fault": "none", "width": None,
                           "middle_blocks": None})
    r = run_host(cfg, "--quiet")
    assert r.returncode == 1, r.stderr[-3000:]
