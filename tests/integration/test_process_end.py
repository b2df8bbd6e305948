"""How deepcam-host and deepcam-data end (core/tools/process_end.hpp): a process that never loaded the
CUDA driver skips the static destructors (LibTorch's take a fifth of a second), after flushing what
it printed; one that loaded the driver ends normally, so that a profiler's exit handlers still run.

A small library stands in for each side, preloaded: its ELF destructor says that the destructors ran.
Named with the driver's soname (libcuda.so.1), it is the driver as far as the programs can tell."""

import re
import subprocess

import pytest

from helpers import DATA_TOOL, HOST, REPO_ROOT, plugin_env, synth, write_run

SAID = "static destructors ran"
# The project's version, as meson.build declares it and --version prints it.
VERSION = re.search(r"^\s*version:\s*'([^']+)'", (REPO_ROOT / "meson.build").read_text(), re.M).group(1)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stand-ins")
    source = folder / "said.c"
    source.write_text('#include <unistd.h>\n'
                      '__attribute__((destructor)) static void said(void) {\n'
                      f'  static const char m[] = "{SAID}\\n";\n'
                      '  (void)write(2, m, sizeof m - 1);\n'
                      '}\n')
    built = {}
    for name in ("libcuda.so.1", "libother.so.1"):
        subprocess.run(["cc", "-shared", "-fPIC", f"-Wl,-soname,{name}", "-o", str(folder / name), str(source)],
                       check=True, capture_output=True)
        built[name] = folder / name
    return built


def run(program, *args, preload):
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=dict(plugin_env(), LD_PRELOAD=str(preload)))


@pytest.mark.parametrize("program, args, status, printed", [
    (HOST, ["--version"], 0, f"deepcam-host {VERSION}"),
    (DATA_TOOL, ["--help"], 0, "deepcam-data synth"),
    (HOST, ["no-such-run.toml"], 2, "no-such-run.toml"),
    (DATA_TOOL, ["verify", "no-such-folder"], 1, "no-such-folder"),
])
def test_without_the_driver_the_destructors_are_skipped_and_the_output_and_status_kept(stand_ins, program, args,
                                                                                        status, printed):
    r = run(program, *args, preload=stand_ins["libother.so.1"])
    assert r.returncode == status, r.stdout + r.stderr
    assert printed in r.stdout + r.stderr  # flushed, though stdout is a pipe here (fully buffered)
    assert SAID not in r.stderr


@pytest.mark.parametrize("program, args, status", [(HOST, ["--version"], 0), (HOST, ["no-such-run.toml"], 2),
                                                   (DATA_TOOL, ["--help"], 0)])
def test_with_the_driver_loaded_the_process_ends_normally(stand_ins, program, args, status):
    r = run(program, *args, preload=stand_ins["libcuda.so.1"])
    assert r.returncode == status, r.stdout + r.stderr
    assert r.stderr.rstrip().endswith(SAID)


def test_a_training_run_ends_with_its_log_and_checkpoint_whole(stand_ins, tmp_path):
    data = synth(tmp_path / "data", train=2, validation=1)
    out = tmp_path / "out"
    path = write_run(tmp_path / "run.toml", data, out, run={"max_epochs": 1, "target_iou": 1.0,
                                                             "checkpoint_every": 1, "device": "cpu"})
    r = run(HOST, path, preload=stand_ins["libother.so.1"])
    assert r.returncode == 1, r.stderr  # short of the target
    assert SAID not in r.stderr
    assert '"key": "run_stop"' in (out / "mlperf.log").read_text().splitlines()[-1]
    assert "wall time" in r.stderr.splitlines()[-1]
    assert (out / "checkpoint-epoch1.pt").stat().st_size > 0
