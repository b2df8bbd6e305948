"""The standard streams: closed ones take nothing else's place, and ones
that cannot be written (a full disk under a job's output file, /dev/full)
end no work, while a result printed there that is lost is no success."""

import json
import os
import shutil
import subprocess

import pytest

from helpers import DATA_TOOL, HOST, plugin_env, synth, write_run

MLLOG = ":::MLLOG "

# /dev/full stands in for a full disk under a redirect.
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this machine")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("streams") / "set", train=4, validation=2, height=32, width=48)


def shell(command, **paths):
    """Runs `command` in sh, with $HOST, $DATA and each keyword as a variable:
    redirections such as >&- need a shell."""
    env = plugin_env()
    env.update(HOST=str(HOST), DATA=str(DATA_TOOL), **{k: str(v) for k, v in paths.items()})
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env, timeout=600)


def log_records(path):
    """The MLPerf log's records; every line must be one."""
    lines = path.read_text().splitlines()
    bad = [line for line in lines if not line.startswith(MLLOG)]
    assert not bad, f"{len(bad)} lines that are not records, the first: {bad[0]!r}"
    return [json.loads(line[len(MLLOG):]) for line in lines]


@pytest.mark.parametrize("closed", ["stdout", "stderr"])
def test_a_closed_stream_puts_nothing_into_the_log(data, tmp_path, closed):
    # With descriptor 1 or 2 closed the log would be opened under its number,
    # and the echo (stdout) or the progress lines (stderr) would land in it.
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    redirect = ">&- 2>err.txt" if closed == "stdout" else "2>&- >out.txt"
    proc = shell(f'cd "$WORK" && "$HOST" "$RUN" {redirect}', WORK=tmp_path, RUN=run)
    assert proc.returncode in (0, 1), (tmp_path / ("err.txt" if closed == "stdout" else "out.txt")).read_text()
    keys = [r["key"] for r in log_records(tmp_path / "out" / "mlperf.log")]
    assert keys.count("run_start") == 1 and keys.count("run_stop") == 1 and keys[-1] == "run_stop", keys
    if closed == "stderr":
        # The echo went where stdout went, as always.
        assert (tmp_path / "out.txt").read_text().count(MLLOG + '{"namespace"') == len(keys)


def test_deepcam_data_whose_reader_quit_finishes_its_work_with_its_own_status(data, tmp_path):
    """`convert ... 2>&1 | head`: SIGPIPE at a progress line ended convert in the middle of a file, with no
    stats.h5 and its temporaries left; verify's verdict became status 141."""
    def closed_pipe():
        read_end, write_end = os.pipe()
        os.close(read_end)
        return write_end

    env = plugin_env()
    out = tmp_path / "npy"
    pipe = closed_pipe()
    proc = subprocess.run([str(DATA_TOOL), "convert", str(data), str(out), "--threads", "1", "--progress-seconds",
                           "0.001"], stdout=pipe, stderr=pipe, env=env, timeout=600)
    os.close(pipe)
    assert proc.returncode == 0
    assert (out / "stats.h5").exists() and len(list(out.glob("*/*.npy"))) == 2 * 6
    assert not [p for p in out.rglob(".*")], list(out.rglob(".*"))
    sample = sorted((out / "train").glob("data-*.npy"))[0]
    sample.write_bytes(sample.read_bytes()[:200])
    pipe = closed_pipe()
    proc = subprocess.run([str(DATA_TOOL), "verify", str(out)], stdout=pipe, stderr=pipe, env=env, timeout=600)
    os.close(pipe)
    assert proc.returncode == 1


@needs_dev_full
def test_verify_does_not_point_above_to_a_list_that_was_lost(data, tmp_path):
    damaged = tmp_path / "set"
    shutil.copytree(data, damaged)
    sample = sorted((damaged / "train").iterdir())[0]
    sample.write_bytes(sample.read_bytes()[:100])
    proc = shell('"$DATA" verify "$SET"', SET=damaged)
    assert proc.returncode == 1 and sample.name in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.endswith(" in 1 file (listed above)\n"), proc.stderr
    proc = shell('"$DATA" verify "$SET" >/dev/full', SET=damaged)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-2].endswith(" in 1 file (their list did not reach standard output)"), proc.stderr
    assert lines[-1] == "deepcam-data: cannot write to standard output: No space left on device; what it shows there " \
                        "is lost", proc.stderr


@needs_dev_full
def test_deepcam_data_works_on_with_a_stderr_it_cannot_write(data, tmp_path):
    # fmt::print threw there: std::terminate (SIGABRT) after the work, or at
    # the first progress line in the middle of it.
    proc = shell('"$DATA" synth --out "$OUT" --train 2 --validation 1 --height 16 --width 16 2>/dev/full',
                 OUT=tmp_path / "synth")
    assert proc.returncode == 0
    proc = shell('"$DATA" convert "$SRC" "$OUT" --threads 1 --progress-seconds 0.001 2>/dev/full',
                 SRC=data, OUT=tmp_path / "npy")
    assert proc.returncode == 0
    proc = shell('"$DATA" verify "$OUT" 2>&-', OUT=tmp_path / "npy")
    assert proc.returncode == 0 and "no problems" in proc.stdout, proc.stdout
    # An error still ends with its status when it cannot be told.
    proc = shell('"$DATA" stats "$OUT" 2>/dev/full', OUT=tmp_path / "missing")
    assert proc.returncode == 1


@needs_dev_full
@pytest.mark.parametrize("command", [
    '"$DATA" verify "$SET"',
    '"$DATA" --help',
    '"$DATA" read "$RUN"',
    '"$HOST" --version',
    '"$HOST" --list-plugins',
    '"$HOST" --describe run',
    '"$HOST" "$RUN" --benchmark 1 --quiet',
])
def test_a_result_that_cannot_reach_stdout_is_no_success(data, tmp_path, command):
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    proc = shell(command + " >/dev/full", SET=data, RUN=run)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(command[2:6].lower().replace("data", "deepcam-data").replace("host", "deepcam-host") +
                           ": cannot write to standard output"), proc.stderr
    # With the cause of the failed write.
    assert last.endswith(": No space left on device; what it shows there is lost"), proc.stderr
    # Its reader gone (`| head` that quit): both programs ignore SIGPIPE,
    # do their work and end with its status.
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = plugin_env()
    env.update(HOST=str(HOST), DATA=str(DATA_TOOL), SET=str(data), RUN=str(run))
    proc = subprocess.run(["sh", "-c", "exec " + command], stdout=write_end, stderr=subprocess.PIPE, text=True,
                          env=env, timeout=600)
    os.close(write_end)
    assert proc.returncode == 0 and "standard output" not in proc.stderr, proc.stderr


@needs_dev_full
def test_training_whose_echo_is_lost_is_still_a_success(data, tmp_path):
    # Its result is the log file, which has every line; the echo is for the eye.
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"target_iou": 0.01})
    proc = shell('"$HOST" "$RUN" >/dev/full', RUN=run)
    assert proc.returncode == 0, proc.stderr
    assert log_records(tmp_path / "out" / "mlperf.log")[-1]["metadata"]["status"] == "success"
