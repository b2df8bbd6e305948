"""scripts/bench_step.py, the training-step benchmark beside the MLCommons
reference: its reference loop runs (here over a stand-in for the reference's
model and loss, as the real one takes minutes per step on a CPU, and is not
part of this repository), its arguments are checked before anything is
measured, and a run stopped part way keeps its rows, marked as incomplete."""

import argparse
import json
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "bench_step.py"
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import bench_step  # noqa: E402


@pytest.fixture
def ref(tmp_path):
    """The two modules of mlcommons/hpc the loop imports, with the reference's names and signatures: a 1 x 1
    convolution for the model, a weighted cross entropy for the loss."""
    root = tmp_path / "hpc" / "deepcam" / "src" / "deepCam"
    (root / "architecture").mkdir(parents=True)
    (root / "utils").mkdir()
    (root / "architecture" / "deeplab_xception.py").write_text(
        "import torch\n"
        "class DeepLabv3_plus(torch.nn.Module):\n"
        "    def __init__(self, n_input, n_classes, os, pretrained, _print):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(n_input, n_classes, 1)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x)\n")
    (root / "utils" / "losses.py").write_text(
        "import torch\n"
        "class CELoss(torch.nn.Module):\n"
        "    def __init__(self, weight):\n"
        "        super().__init__()\n"
        "        self.loss = torch.nn.CrossEntropyLoss(weight=torch.tensor(weight))\n"
        "    def forward(self, logits, labels):\n"
        "        return self.loss(logits.float(), labels)\n")
    return tmp_path / "hpc"


def test_the_reference_loop_measures_each_setup_it_is_given(ref):
    # It ended in "NameError: name 'statistics' is not defined" after its first set-up, on every run.
    r = subprocess.run([sys.executable, "-c", bench_step.REFERENCE_LOOP, str(ref), "cpu", "1", "1", "3",
                        str(bench_step.WARMUP)], input="fp32:contiguous\namp_bf16:channels_last\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert [l["setup"] for l in lines] == ["fp32:contiguous", "amp_bf16:channels_last"], r.stdout
    for line in lines:
        assert line["samples_per_s"] > 0 and line["step_ms_p50"] > 0


@pytest.mark.parametrize("args,says", [
    (["--device", "gpu"], "--device: invalid choice: 'gpu'"),
    (["--steps", "0"], "--steps: 0 is not a whole number >= 1"),
    (["--threads", "0"], "--threads: 0 is not a whole number >= 1"),
    (["--setups", "fp16:contiguous"], "'fp16:contiguous': the precision is one of fp32, amp_fp16, amp_bf16"),
    (["--setups", "fp32:nhwc"], "'fp32:nhwc': the precision is one of"),
    (["--setups", "fp32:contiguous:graphs"], "'fp32:contiguous:graphs': CUDA graphs need --device cuda"),
    # A warm-up of the reference alone made the two sides' step counts differ; both now warm up 5.
    (["--warmup", "2"], "unrecognized arguments: --warmup 2"),
])
def test_bad_arguments_are_refused_before_anything_is_measured(ref, tmp_path, args, says):
    # They ran the reference for a whole measurement first (an unknown precision as fp32), or ended in its
    # traceback (ZeroDivisionError, RuntimeError).
    r = subprocess.run([sys.executable, str(SCRIPT), "--ref", str(ref), "--docs", str(tmp_path / "b.md"), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "b.md").exists()


def test_a_report_of_fewer_rows_than_setups_says_it_is_incomplete():
    args = argparse.Namespace(section="## S", threads=2, batch=1, steps=3)
    rows = [("amp_bf16", "channels_last", False, (10.0, 100.0), (8.0, 125.0))]
    partial = bench_step.report(args, rows, 3, "cpu", "abc1234")
    assert "**Incomplete: 1 of the 3 set-ups asked for had been measured when the run stopped.**" in partial
    assert "| amp_bf16 | channels_last | off | 10.000 | 100 | 8.000 | 125 | 1.25 |" in partial
    assert f"after {bench_step.WARMUP} warm-up steps on both sides" in partial
    assert "Incomplete" not in bench_step.report(args, rows, 1, "cpu", "abc1234")


def test_the_report_names_an_allocator_put_in_front_of_both_sides(monkeypatch):
    args = argparse.Namespace(section="## S", threads=2, batch=1, steps=3)
    rows = [("fp32", "contiguous", False, (10.0, 100.0), (8.0, 125.0))]
    monkeypatch.setattr(sys, "argv", ["bench_step.py", "--steps", "3"])
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert " with `scripts/bench_step.py --steps 3` (commit " in bench_step.report(args, rows, 1, "cpu", "abc1234")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libtcmalloc_minimal.so.4")
    assert (" with `LD_PRELOAD=/usr/lib/libtcmalloc_minimal.so.4 scripts/bench_step.py --steps 3` (commit "
            in bench_step.report(args, rows, 1, "cpu", "abc1234"))


def test_a_run_stopped_part_way_keeps_the_rows_it_measured(ref, tmp_path, monkeypatch):
    """A deadline on a borrowed GPU stopped the run in its second set-up: the table was written only at the end,
    so nothing measured was kept. Both sides are stand-ins here (the real ones take minutes per step)."""
    monkeypatch.setattr(bench_step, "REPO", tmp_path)
    data = tmp_path / "runs" / "bench-step" / "data"
    data.mkdir(parents=True)
    (data / "stats.h5").touch()  # only named in the run file, which the stand-in for ours does not read
    calls = []

    def ours(args, run, precision, memory_format, graphs):
        calls.append(precision)
        if len(calls) == 2:
            raise SystemExit(143)  # SIGTERM's handler, in the second set-up
        return 2.0, 500.0

    class Reference:
        def __init__(self, args):
            pass

        def measure(self, precision, memory_format):
            return 1.0, 1000.0

        def close(self):
            pass

        def kill(self):
            pass

    monkeypatch.setattr(bench_step, "ours", ours)
    monkeypatch.setattr(bench_step, "Reference", Reference)
    monkeypatch.setattr(bench_step.signal, "signal", lambda *args: None)  # pytest's own SIGTERM stays
    docs = tmp_path / "b.md"
    monkeypatch.setattr(sys, "argv", ["bench_step.py", "--ref", str(ref), "--docs", str(docs),
                                      "--setups", "fp32:contiguous,amp_bf16:channels_last"])
    with pytest.raises(SystemExit):
        bench_step.main()
    text = docs.read_text()
    assert "**Incomplete: 1 of the 2 set-ups asked for had been measured when the run stopped.**" in text, text
    assert "| fp32 | contiguous | off | 2.000 | 500 | 1.000 | 1000 | 2.00 |" in text, text
    assert "amp_bf16" not in text.split("| precision |")[1], text
