"""SIGTERM (a Slurm time limit) and SIGINT during --evaluate and --predict:
the work stops between batches with a message of ours and status 128 +
signal, as training's does; --evaluate prints no score, on one rank or
many, and --predict leaves only whole files. (Both used to die by the
signal's default action, with no word and no record of how far they got.)"""

import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from helpers import HOST, plugin_env, read_events, run_host, synth, write_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # 32 validation samples, scored one per batch: long enough to stop inside.
    tmp = tmp_path_factory.mktemp("scoring-signals")
    data = synth(tmp / "data", train=2, validation=32, height=192, width=288, seed=37)
    run = write_run(tmp / "run.toml", data, tmp / "out", run={"max_epochs": 1, "validation_batch_size": 8})
    r = run_host(run, "--quiet")
    assert r.returncode in (0, 1), r.stderr
    scoring = write_run(tmp / "score.toml", data, tmp / "unused",
                        run={"validation_batch_size": 1, "progress_seconds": 0.001})
    return scoring, tmp / "out" / "checkpoint-epoch1.pt"


def signal_frozen(p, sig):
    """Freezes `p`'s process group (its ranks too), sends `sig` to `p` alone, and lets the group go on: the
    signal lands before another batch is done."""
    group = os.getpgid(p.pid)
    os.killpg(group, signal.SIGSTOP)
    os.kill(p.pid, sig)
    os.killpg(group, signal.SIGCONT)


def evaluate_stopped(args, sig, ignored=False):
    """Starts deepcam-host with `args` in a session of its own, sends `sig` as rank 0's first validation
    progress line comes; its status and its output (standard output and error together). `ignored`: started
    with `sig` ignored, as a shell script's background job is with SIGINT, and `sig` sent to every process of
    the session."""
    def ignore():
        signal.signal(sig, signal.SIG_IGN)
    p = subprocess.Popen([str(HOST), *map(str, args)], env=plugin_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         preexec_fn=ignore if ignored else None)
    try:
        lines = []
        for line in p.stdout:
            lines.append(line)
            if "epoch 1 validation: batch " in line:  # the checkpoint's epoch; "[rank 0] " before it with --nproc
                if ignored:
                    os.killpg(os.getpgid(p.pid), sig)
                else:
                    signal_frozen(p, sig)
                break
        lines.extend(p.stdout)
        return p.wait(timeout=120), "".join(lines)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["terminate", "interrupt"])
def test_a_stop_signal_ends_evaluate_with_no_score(tmp_path, trained, sig):
    scoring, ckpt = trained
    out = tmp_path / "eval"
    status, output = evaluate_stopped([scoring, "--quiet", "--set", f"run.output_dir={out}", "--evaluate", ckpt], sig)
    assert status == 128 + sig, output
    said = [l for l in output.splitlines() if l.startswith(f"deepcam-host: --evaluate {ckpt}: stopped by ")]
    assert said and said[0].startswith(f"deepcam-host: --evaluate {ckpt}: stopped by {signal.strsignal(sig)} "
                                       f"after "), output
    assert said[0].endswith(" of 32 validation batches on rank 0, so it has no score"), output
    done = int(said[0].split(" after ")[1].split(" of ")[0])
    assert 1 <= done < 32, output
    assert "eval_accuracy" not in output, output
    # The record says what happened: the scoring began and gave nothing.
    events = read_events(out / "evaluate-mlperf.log")
    assert events[-1]["key"] == "eval_start" and not any(e["key"] == "eval_accuracy" for e in events)
    assert not [f.name for f in out.iterdir() if ".tmp-" in f.name or ".partial-" in f.name]


@pytest.mark.parametrize("ranks", [[], ["--nproc", 2, "--set", "run.threads=1"]], ids=["one rank", "two ranks"])
def test_a_sigint_ignored_from_the_start_stays_ignored(tmp_path, trained, ranks):
    # The host took SIGINT over: a shell script's background job, which ignores it, was stopped by a Ctrl-C.
    scoring, ckpt = trained
    out = tmp_path / "eval"
    status, output = evaluate_stopped([*ranks, scoring, "--quiet", "--set", f"run.output_dir={out}", "--evaluate",
                                       ckpt], signal.SIGINT, ignored=True)
    assert status == 0, output
    assert "stopped by" not in output and "eval_accuracy" in output, output
    assert any(e["key"] == "eval_accuracy" for e in read_events(out / "evaluate-mlperf.log"))


def test_sigterm_ends_a_two_rank_evaluate_on_every_rank(tmp_path, trained):
    scoring, ckpt = trained
    out = tmp_path / "eval"
    status, output = evaluate_stopped(["--nproc", 2, scoring, "--quiet", "--set", "run.threads=1",
                                       "--set", f"run.output_dir={out}", "--evaluate", ckpt], signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, output
    assert output.count("exited with status 143") == 2, output  # both ranks stopped themselves, together
    assert "lost rank" not in output, output
    # The launcher passes the signal on to each rank in turn: the ranks may agree on it between the two.
    assert re.search(rf"^\[rank 0\] deepcam-host: --evaluate {re.escape(str(ckpt))}: stopped by Terminated "
                     r"\(sent to (every rank|rank [01])\) after ", output, re.M), output
    assert " of 16 validation batches on rank 0, so it has no score" in output, output
    assert "eval_accuracy" not in output, output


def test_sigterm_ends_predict_with_whole_files_and_says_how_many(tmp_path, trained):
    scoring, ckpt = trained
    out = tmp_path / "pred"
    p = subprocess.Popen([str(HOST), str(scoring), "--quiet", "--predict", str(ckpt), "--out", str(out)],
                         env=plugin_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "sample-000000.png").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert p.poll() is None, p.stderr.read()
        signal_frozen(p, signal.SIGTERM)
        status = p.wait(timeout=120)
        stderr = p.stderr.read()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert status == 128 + signal.SIGTERM, stderr
    said = [l for l in stderr.splitlines() if l.startswith("deepcam-host: --predict stopped by Terminated: wrote ")]
    assert len(said) == 1, stderr
    written = int(said[0].split(" the first ")[1].split(" ")[0])
    assert said[0] == (f"deepcam-host: --predict stopped by Terminated: wrote the predictions of the first "
                       f"{written} validation samples to {out}"), stderr
    assert 1 <= written < 32, stderr
    names = sorted(f.name for f in out.iterdir())
    assert names == sorted([f"sample-{i:06d}.npy" for i in range(written)] +
                           [f"sample-{i:06d}.png" for i in range(written)]), names
    for i in range(written):
        assert np.load(out / f"sample-{i:06d}.npy").shape == (192, 288)
