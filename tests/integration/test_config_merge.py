"""Several run files on one command line: merged left to right, then --set;
the resolved config says which file (and line), --set item or default set
each value; errors name the file and line where a key stands; the per-system
configs in configs/systems/ load over configs/reference.toml."""

import re
import tomllib
from pathlib import Path

import pytest


from helpers import REPO_ROOT, convert, run_host, synth, write_run

SYSTEMS = sorted((REPO_ROOT / "configs" / "systems").glob("*.toml"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("merge") / "data", train=4, validation=2)


@pytest.fixture(scope="module")
def npy_data(data):
    """The numpy form, which the system configs read."""
    out = data.parent / "npy"
    return convert(data, out, "--threads", "2")


def resolved_value(text, section, key):
    """`key = value  # origin` of [section] in the printed resolved config: (value, origin)."""
    block = re.search(rf"^\[{re.escape(section)}\]\n(.*?)(?:\n\n|\Z)", text, re.S | re.M)
    assert block, f"no [{section}] in\n{text}"
    m = re.search(rf"^{re.escape(key)} = (.*?)(?:  # (.*))?$", block.group(1), re.M)
    assert m, f"no {key} in [{section}]\n{block.group(1)}"
    return m.group(1), m.group(2)


def line_of(path, text):
    return next(n for n, line in enumerate(Path(path).read_text().splitlines(), 1) if line.startswith(text))


def benchmark(*args):
    return run_host(*args, "--benchmark", 1, "--set", "run.device=cpu", timeout=600)


def test_later_files_then_set_win_and_each_value_says_where_it_was_set(data, tmp_path):
    base = write_run(tmp_path / "base.toml", data, tmp_path / "out")
    a = tmp_path / "a.toml"
    a.write_text("# system A\n[run]\ntrain_batch_size = 1\n\n[optimizer]\nlr = 0.01\nweight_decay = 0.25\n")
    b = tmp_path / "b.toml"
    b.write_text("[optimizer]\nlr = 0.02\n")
    r = benchmark(base, a, b, "--set", "optimizer.weight_decay=0.5")
    assert r.returncode == 0, r.stderr
    text = r.stderr
    assert f"# resolved from {base} + {a} + {b} (merged left to right, then --set)" in text
    assert resolved_value(text, "optimizer", "lr") == ("0.02", f"{b}:{line_of(b, 'lr')}")
    assert resolved_value(text, "optimizer", "weight_decay") == ("0.5", "--set optimizer.weight_decay=0.5")
    assert resolved_value(text, "run", "train_batch_size") == ("1", f"{a}:{line_of(a, 'train_batch_size')}")
    assert resolved_value(text, "run", "seed") == ("5", f"{base}:{line_of(base, 'seed')}")
    adam_line = line_of(base, 'name = "adam"')
    assert resolved_value(text, "optimizer", "name") == ('"adam"', f"{base}:{adam_line}")
    assert resolved_value(text, "run", "checkpoint_every") == ("0", "default")
    assert '"local_batch": 1' in r.stdout


def test_a_table_naming_another_plugin_replaces_the_earlier_one(data, tmp_path):
    base = write_run(tmp_path / "base.toml", data, tmp_path / "out", optimizer={"weight_decay": 0.1})
    lamb = tmp_path / "lamb.toml"
    lamb.write_text('[optimizer]\nname = "lamb"\nmax_grad_norm = 0.5\n')
    r = benchmark(base, lamb)
    assert r.returncode == 0, r.stderr
    assert resolved_value(r.stderr, "optimizer", "name") == ('"lamb"', f"{lamb}:2")
    assert resolved_value(r.stderr, "optimizer", "max_grad_norm") == ("0.5", f"{lamb}:3")
    # adam's lr and weight_decay in the base file are not lamb's: defaults
    assert resolved_value(r.stderr, "optimizer", "lr")[1] == "default"
    assert resolved_value(r.stderr, "optimizer", "weight_decay")[1] == "default"


def test_an_unknown_key_names_the_file_and_line_where_it_stands(data, tmp_path):
    base = write_run(tmp_path / "base.toml", data, tmp_path / "out")
    bad = tmp_path / "system.toml"
    bad.write_text("# a system\n[optimizer]\nlrr = 0.1\n")
    r = benchmark(base, bad)
    assert r.returncode == 2
    assert f"{bad}:3 [optimizer] lrr: unknown key; did you mean 'lr'?" in r.stderr
    bad.write_text("[run]\ntrain_batch_size = 1\n[bogus]\nx = 1\n")
    r = benchmark(base, bad)
    assert r.returncode == 2 and f"{bad}:3: unknown section [bogus]" in r.stderr, r.stderr
    # A key before any section header was called an unknown section of its name.
    bad.write_text("# a system\nseed = 1\n[run]\ntrain_batch_size = 1\n")
    r = benchmark(base, bad)
    assert r.returncode == 2, r.stderr
    assert f"{bad}:2: seed stands before any section header; it is a key of [run]: write it under a [run] line" \
        in r.stderr, r.stderr
    bad.write_text("lrr = 0.1\n")
    r = benchmark(base, bad)
    assert r.returncode == 2, r.stderr
    assert (f"{bad}:1: lrr stands before any section header; each key belongs under one of the section headers "
            "[run], [data], [mlperf], [reader], [model], [optimizer], [scheduler]") in r.stderr, r.stderr
    bad.write_text("[run]\ntrain_batch_size = -1\n")
    r = benchmark(base, bad)
    assert r.returncode == 2 and f"{bad}:2 [run] train_batch_size" in r.stderr, r.stderr


def test_a_relative_path_is_taken_from_the_folder_of_the_file_that_set_it(data, tmp_path):
    base = write_run(tmp_path / "base.toml", tmp_path / "nowhere", tmp_path / "out")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "data").symlink_to(data)
    overlay = other / "data.toml"
    overlay.write_text('[data]\nroot = "data"\n')
    r = benchmark(base, overlay)
    assert r.returncode == 0, r.stderr
    assert resolved_value(r.stderr, "data", "root") == (f'"{other / "data"}"', f"{overlay}:2")


@pytest.mark.parametrize("system", SYSTEMS, ids=[p.stem for p in SYSTEMS])
def test_each_system_config_loads_over_the_reference_run_file(system, npy_data, tmp_path):
    text = system.read_text()
    assert "Where the numbers come from" in text and "hpc_results_v3.0" in text
    # The numbers the file sets are what the resolved config holds, marked as set there.
    set_here = {}
    section = None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#") and section:
            key, value = (x.strip() for x in line.split("=", 1))
            set_here[(section, key)] = (value, n)
    assert ("optimizer", "lr") in set_here and ("run", "train_batch_size") in set_here
    # Small enough to run here: a tiny model on the CPU, one benchmark step.
    r = benchmark(REPO_ROOT / "configs/reference.toml", system, "--set", f"data.root={npy_data}",
                  "--set", "model.width=0.0625", "--set", "model.middle_blocks=1", "--set", "run.precision=fp32",
                  "--set", "run.memory_format=contiguous", "--set", "run.threads=2")
    assert r.returncode == 0, r.stderr
    overridden = {("run", "device"), ("run", "precision"), ("run", "memory_format")}
    for (sec, key), (value, n) in set_here.items():
        if (sec, key) in overridden:
            continue
        got, origin = resolved_value(r.stderr, sec, key)
        if "." in sec and key == "name":  # a nested table's name: where the table was set
            assert origin.startswith(f"{system}:"), (sec, key, origin)
        else:
            assert origin == f"{system}:{n}", (sec, key, origin)
        assert got.replace(" ", "") == value.replace(" ", ""), (sec, key, got, value)
    # The global batch each file aims at, NVIDIA's: 128 (2048 for the 256-node run).
    local = int(set_here[("run", "train_batch_size")][0])
    accumulation = int(set_here.get(("run", "gradient_accumulation_frequency"), ("1", 0))[0])
    ranks_said = re.search(r"\((\d+) ranks", text.splitlines()[0])  # "(128 ranks, one per GPU)"; one GPU: none
    ranks = int(ranks_said.group(1)) if ranks_said else 1
    assert local * accumulation * ranks in (128, 2048), (local, accumulation, ranks)


def test_a_section_that_is_not_a_table_is_named_in_its_own_file_whatever_follows(data, tmp_path):
    """`run = 5` in the first file was dropped without a word when a later file had a [run] table, and
    blamed on an --set item that set a key of [run]."""
    base = write_run(tmp_path / "base.toml", data, tmp_path / "out")
    bad = tmp_path / "bad.toml"
    bad.write_text("# a key where a table belongs\nrun = 5\n")
    later = tmp_path / "later.toml"
    later.write_text("[run]\nmax_epochs = 1\n")
    for args in ([base, bad, later], [base, bad, "--set", "run.max_epochs=1"]):
        r = benchmark(*args)
        assert r.returncode == 2, r.stderr
        assert f"{bad}:2: 'run' must be a table [run]" in r.stderr, r.stderr
        assert "--set" not in r.stderr.splitlines()[-1]
    bad.write_text("[runn]\nmax_epochs = 1\n")
    r = benchmark(base, bad, later)
    assert r.returncode == 2 and f"{bad}:1: unknown section [runn]; did you mean 'run'?" in r.stderr, r.stderr


@pytest.mark.parametrize("system", SYSTEMS, ids=[p.stem for p in SYSTEMS])
def test_each_system_configs_batchnorm_covers_as_many_samples_as_nvidias_recipe(system):
    """dgxh100_16x8 and dgxa100_16x8 said they carried NVIDIA's instance recipe unchanged, "BatchNorm per
    rank", at local batch 1: statistics of 1 sample where the recipe's (local batch 8, per rank) cover 8."""
    text = system.read_text()
    run = tomllib.loads(text)["run"]
    ranks_said = re.search(r"\((\d+) ranks", text.splitlines()[0])
    ranks = int(ranks_said.group(1)) if ranks_said else 1
    group = min(run.get("batchnorm_group_size", 1), ranks)  # larger than the ranks: all of them
    # NVIDIA's v3.0 recipes: the strong-scaling run at local batch 1 in groups of 2, the instances at local
    # batch 8 on each rank alone.
    recipe = 2 if "config_DGXA100_256x8x1.sh" in text else 8
    assert "config_DGXA100_256x2x8x8_weak.sh" in text or recipe == 2
    assert run["train_batch_size"] * group == recipe, (run["train_batch_size"], group)
    comment = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    if group > 1:
        assert f"groups of {group} GPUs" in comment, comment
