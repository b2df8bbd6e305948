"""Helpers shared by the integration tests: run the tools, write run files."""

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("DEEPCAM_BUILD_DIR", REPO_ROOT / "build")).resolve()
HOST = BUILD_DIR / "core" / "deepcam-host"
DATA_TOOL = BUILD_DIR / "core" / "deepcam-data"
PLUGINS = BUILD_DIR / "plugins"
FIXTURES = BUILD_DIR / "tests"
# examples/plugins/sgd, built as a test fixture: plain SGD, for comparisons where Adam and LAMB would
# turn rounding noise into whole steps (they divide each gradient by its own running magnitude).
SGD = {"name": "sgd", "library": str(FIXTURES / "libdeepcam_optimizer_sgd.so"), "lr": 0.001}


def plugin_env(path=None):
    env = dict(os.environ)
    env["DEEPCAM_PLUGIN_PATH"] = str(PLUGINS if path is None else path)
    return env


def run_host(*args, env=None, timeout=900):
    return subprocess.run([str(HOST), *map(str, args)], capture_output=True, text=True,
                          env=env or plugin_env(), timeout=timeout)


def run_data(*args, env=None, timeout=600, cwd=None):
    return subprocess.run([str(DATA_TOOL), *map(str, args)], capture_output=True, text=True,
                          env=env or plugin_env(), timeout=timeout, cwd=cwd)


def convert(src, dst, *options, timeout=300):
    """deepcam-data convert SRC DST [OPTIONS], which must succeed (its messages shown if not): DST."""
    r = run_data("convert", src, dst, *options, timeout=timeout)
    assert r.returncode == 0, f"deepcam-data convert {src} {dst} failed:\n{r.stdout}{r.stderr}"[-3000:]
    return Path(dst)


def synth(out, train=8, validation=4, height=64, width=96, seed=3):
    subprocess.run([str(DATA_TOOL), "synth", "--out", str(out), "--train", str(train), "--validation",
                    str(validation), "--height", str(height), "--width", str(width), "--seed", str(seed)],
                   check=True, capture_output=True)
    return Path(out)


SECTIONS = {
    "run": {"seed": 5, "max_epochs": 1, "logging_frequency": 2, "train_batch_size": 2,
            "validation_batch_size": 2, "threads": 2},
    "reader": {"name": "hdf5", "threads": 2},
    "model": {"name": "deeplabv3plus", "width": 0.0625, "middle_blocks": 1},
    "optimizer": {"name": "adam", "lr": 0.002},
    "scheduler": {"name": "multistep", "milestones": [100]},
    "mlperf": {"org": "deepcam-host-tests", "platform": "cpu", "division": "open", "status": "research"},
}


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        # A TOML basic string: quote and backslash escaped, and the control characters, which it
        # cannot hold as they are.
        return '"' + "".join("\\" + c if c in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7f
                             else c for c in v) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write_run(path, data_root, output_dir, **changes):
    """A small run file; `changes` maps a section to keys to set (None removes)."""
    sections = {k: dict(v) for k, v in SECTIONS.items()}
    sections["run"]["output_dir"] = str(output_dir)
    sections["data"] = {"root": str(data_root)}
    for section, keys in changes.items():
        sections.setdefault(section, {})
        for k, v in keys.items():
            if v is None:
                sections[section].pop(k, None)
            else:
                sections[section][k] = v
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
        lines.append("")
    Path(path).write_text("\n".join(lines))
    return Path(path)


def mlperf_check(log):
    """Runs the official checker; returns (exit status, output)."""
    import sys
    r = subprocess.run([sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "hpc",
                        "--ruleset", "3.0.0", str(log)], capture_output=True, text=True, timeout=300,
                       cwd=Path(log).parent)  # it writes compliance_checker.log there
    return r.returncode, r.stdout + r.stderr


def numpy_scale(stats):
    """SPEC 1.4 as the reference computes it from a stats.h5: the shift (float32 minval) and
    scale (1 / (max - min) in the stored dtype, then float32) of each channel."""
    import h5py
    import numpy as np
    with h5py.File(stats, "r") as f:
        lo, hi = f["climate/minval"][...], f["climate/maxval"][...]
    return lo.astype(np.float32), (1.0 / (hi - lo)).astype(np.float32)


def read_events(log):
    """The MLPerf log's events, each line's JSON object; every line must be one."""
    import json
    events = []
    for raw in Path(log).read_text().splitlines():
        assert raw.startswith(":::MLLOG "), raw
        events.append(json.loads(raw[len(":::MLLOG "):]))
    return events


# Every variable a launcher sets to tell a process its rank. Processes the
# tests start as ranks get an environment without any of them, so that
# running pytest under Slurm or mpirun does not change what the ranks see.
RANK_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"}
RANK_PREFIXES = ("OMPI_", "SLURM_", "PMI_", "PMIX_")


def clean_env(**extra):
    env = {k: v for k, v in plugin_env().items()
           if k not in RANK_VARIABLES and not k.startswith(RANK_PREFIXES)}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port():
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank, world, port, **extra):
    """The environment torchrun gives rank `rank` of `world` on this machine."""
    return clean_env(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world,
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra)


def assert_within_spread(got, want, again):
    """`got` against `want`, where `again` is a second run identical to `want`'s: bit for bit where
    the two runs are, else within 10 times their largest difference (some CUDA kernels add with
    atomics). Each argument maps names to tensors or to lists of numbers."""
    import torch
    got, want, again = ({k: torch.as_tensor(v).double() for k, v in d.items()} for d in (got, want, again))
    assert got.keys() == want.keys() == again.keys()
    spread = max((want[k] - again[k]).abs().max().item() for k in want)
    for k in want:
        diff = (got[k] - want[k]).abs().max().item()
        if spread == 0:
            assert torch.equal(got[k], want[k]), (k, diff)
        else:
            assert diff <= 10 * spread, (k, diff, spread)
