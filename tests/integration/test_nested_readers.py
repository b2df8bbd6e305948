"""Nested reader tables ([reader.source]) and the prefetch reader through the
host: the nested table is checked against the source plugin's own schema
before anything is built, reachable with --set, printed in the resolved
config; prefetching (and staging) changes no number of a run; staging that
runs out of space fails cleanly."""

import json
import os
import resource
import shutil
import signal
import subprocess
import tomllib

import pytest

from helpers import FIXTURES, HOST, REPO_ROOT, mlperf_check, plugin_env, run_host, synth, write_run

PREFETCH = {"reader": {"name": "prefetch", "depth": 2, "threads": 2},
            "reader.source": {"name": "hdf5", "threads": 1}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("nested") / "data", train=8, validation=4)


def prefetch_run(tmp_path, data, name="run.toml", out="out", **changes):
    sections = {k: dict(v) for k, v in PREFETCH.items()}
    for section, keys in changes.items():
        sections.setdefault(section, {}).update(keys)
    # Keys set to None are removed, as write_run does.
    for keys in sections.values():
        for k in [k for k, v in keys.items() if v is None]:
            del keys[k]
    return write_run(tmp_path / name, data, tmp_path / out, **sections)


def refused(tmp_path, data, *args, **changes):
    out = tmp_path / "out"
    run = prefetch_run(tmp_path, data, **changes)
    r = run_host(run, *args)
    assert r.returncode == 2, r.stderr
    assert not out.exists(), "a refused run must not leave output"
    lines = [l for l in r.stderr.splitlines() if l.startswith("deepcam-host:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def line_of(path, text):
    return next(i for i, l in enumerate(path.read_text().splitlines(), 1) if l.startswith(text))


def test_describe_shows_the_nested_table():
    r = run_host("--describe", "reader/prefetch")
    assert r.returncode == 0, r.stderr
    source = next(l for l in r.stdout.splitlines() if l.split()[:1] == ["source"])
    assert "reader table" in source and "(required)" in source
    assert "[reader.source]" in r.stdout and "deepcam-host --describe reader/NAME" in r.stdout
    for key in ("depth", "threads", "shuffle_mode", "data_oversampling_factor", "stage_dir"):
        assert any(l.split()[:1] == [key] for l in r.stdout.splitlines()), r.stdout


def test_unknown_key_in_the_nested_table_names_file_line_table_and_suggestion(tmp_path, data):
    msg = refused(tmp_path, data, **{"reader.source": {"thredas": 2}})
    line = line_of(tmp_path / "run.toml", "thredas")
    assert f"run.toml:{line} [reader.source] thredas: unknown key; did you mean 'threads'?" in msg
    assert "check_finite" in msg  # the known keys are the source plugin's own


def test_wrong_type_and_range_in_the_nested_table(tmp_path, data):
    assert "[reader.source] threads: expected int, got string" in refused(
        tmp_path, data, **{"reader.source": {"threads": "two"}})
    msg = refused(tmp_path, data, **{"reader.source": {"threads": 0}})
    assert "[reader.source] threads: 0" in msg and "is out of range [1" in msg


def test_nested_table_missing_misnamed_or_not_a_table(tmp_path, data):
    run = prefetch_run(tmp_path, data)
    run.write_text(run.read_text().replace('[reader.source]\nname = "hdf5"\nthreads = 1\n', ""))
    r = run_host(run)
    assert r.returncode == 2
    assert "[reader]: missing required key 'source' (a table [reader.source] with name = \"<reader plugin>\")" \
        in r.stderr

    msg = refused(tmp_path, data, **{"reader.source": {"name": None}})
    assert "[reader] source: [reader.source] needs name = \"<reader plugin>\"" in msg

    msg = refused(tmp_path, data, **{"reader.source": {"name": "hdf6"}})
    assert "[reader.source] name: no reader plugin named 'hdf6' (did you mean 'hdf5'?); found: " in msg, msg

    # A plugin of another kind is not a reader.
    assert "no reader plugin named 'adam'" in refused(tmp_path, data, **{"reader.source": {"name": "adam"}})

    run = prefetch_run(tmp_path, data)
    run.write_text(run.read_text().replace('[reader.source]\nname = "hdf5"\nthreads = 1\n', "")
                   .replace('name = "prefetch"', 'name = "prefetch"\nsource = "hdf5"'))
    r = run_host(run)
    assert r.returncode == 2
    assert "[reader] source: expected a table [reader.source] naming a reader plugin" in r.stderr
    assert "got string" in r.stderr


def test_a_library_other_than_the_loaded_plugin_of_its_name_is_refused(tmp_path, data, build_dir):
    # prefetch over prefetch over hdf5: the inner table's library was passed over in silence, the
    # outer table's prefetch being loaded already.
    hdf5 = build_dir / "plugins" / "readers" / "hdf5" / "libdeepcam_reader_hdf5.so"
    nested = {"reader.source": {"name": "prefetch"}, "reader.source.source": {"name": "hdf5", "threads": 1}}
    msg = refused(tmp_path, data, "--set", f"reader.source.library={hdf5}", **nested)
    assert (f"--set reader.source.library={hdf5}: {hdf5}: another file than "
            f"{build_dir / 'plugins' / 'readers' / 'prefetch' / 'libdeepcam_reader_prefetch.so'}, from which the "
            "reader plugin 'prefetch' is loaded already for another table") in msg, msg
    msg = refused(tmp_path, data, "--set", "reader.source.library=/nonexistent.so", **nested)
    assert "/nonexistent.so: no such plugin library" in msg, msg


@pytest.mark.parametrize("fault, says", [
    # It was reported under prefetch's file, the reader that called the factory.
    ("throw", "the plugin's factory failed: deliberate failure of the fixture"),
    # As the host says it of its own factory calls (status 3); prefetch said it as bad input (status 2).
    ("nothing", "a bug in the plugin: the factory returned nothing (nullptr)"),
])
def test_a_nested_factory_that_fails_names_the_nested_plugins_file(tmp_path, data, fault, says):
    lib = FIXTURES / "libdeepcam_reader_faulty.so"
    run = prefetch_run(tmp_path, data, **{"reader.source": {"name": "faulty", "library": str(lib),
                                                            "fault": fault, "threads": None}})
    r = run_host(run)
    assert r.returncode == 3, r.stderr
    assert f"internal error: {lib}: {says}" in r.stderr, r.stderr


def test_prefetch_keys_are_checked_too(tmp_path, data):
    assert "[reader] shuffle_mode: \"nodes\" is not one of global, node, gpu; did you mean 'node'?" in refused(
        tmp_path, data, reader={"shuffle_mode": "nodes"})
    msg = refused(tmp_path, data, reader={"data_oversampling_factor": 2})
    assert "run.toml [reader] data_oversampling_factor = 2 with shuffle_mode = \"global\"" in msg


def test_set_reaches_into_the_nested_table(tmp_path, data):
    assert "--set reader.source.thredas=3: unknown key; did you mean 'threads'?" in refused(
        tmp_path, data, "--set", "reader.source.thredas=3")
    assert "--set reader.source.threads=many: expected int, got string" in refused(
        tmp_path, data, "--set", "reader.source.threads=many")
    assert "--set reader.depth.x=1: [reader.depth] is not a table" in refused(
        tmp_path, data, "--set", "reader.depth.x=1")
    # A whole table from the command line: the item, then the key in it.
    msg = refused(tmp_path, data, "--set", 'reader.source={name = "hdf5", thread = 2}')
    assert ('--set reader.source={name = "hdf5", thread = 2}: [reader.source] thread: unknown key; '
            "did you mean 'threads'?") in msg



@pytest.mark.parametrize("key,value", [("shuffle_mode", "gpu"), ("shuffle_mode", "node"),
                                       ("data_oversampling_factor", 2)])
def test_the_training_order_keys_of_the_source_table_are_refused(tmp_path, data, key, value):
    """Under prefetch, the prefetch reader orders the samples: a source's own shuffle_mode or
    data_oversampling_factor other than its default would be ignored, so it is refused, naming where."""
    source = {"name": "npy", "threads": 1}
    msg = refused(tmp_path, data, **{"reader.source": dict(source, **{key: value})})
    line = line_of(tmp_path / "run.toml", f"{key} =")
    assert f"run.toml:{line} [reader.source] {key}: " in msg, msg
    assert f"set {key} in [reader]" in msg, msg
    setting = f"reader.source.{key}=" + (f'"{value}"' if isinstance(value, str) else str(value))
    msg = refused(tmp_path, data, "--set", setting, **{"reader.source": source})
    assert f"--set {setting}: " in msg and f"set {key} in [reader]" in msg, msg


def test_deepcam_data_read_speaks_as_itself_when_staging(tmp_path, data):
    stage = tmp_path / "stage"
    stage.mkdir()
    run = prefetch_run(tmp_path, data, reader={"stage_dir": str(stage)})
    r = subprocess.run([str(HOST.parent / "deepcam-data"), "read", str(run)], capture_output=True, text=True,
                       env=plugin_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    staged = [l for l in r.stderr.splitlines() if " staged " in l]
    # The 8 training files read reads (not the validation files: no --with-validation).
    assert len(staged) == 1 and staged[0].startswith("deepcam-data: staged 8 files"), r.stderr
    assert "deepcam-host" not in r.stderr, r.stderr

def read_log(path):
    return [json.loads(l.split(":::MLLOG ", 1)[1]) for l in path.read_text().splitlines() if ":::MLLOG" in l]


def numbers(events):
    keys = ("train_loss", "train_accuracy", "eval_accuracy", "eval_loss", "train_samples", "eval_samples")
    return [(e["key"], e["value"]) for e in events if e["key"] in keys]


def test_prefetch_and_staging_change_no_number_of_a_run(tmp_path, data):
    plain = write_run(tmp_path / "plain.toml", data, tmp_path / "plain")
    r = run_host(plain)
    assert r.returncode in (0, 1), r.stderr
    expected = numbers(read_log(tmp_path / "plain" / "mlperf.log"))
    assert len(expected) >= 6

    stage = tmp_path / "stage"
    stage.mkdir()
    run = prefetch_run(tmp_path, data, out="pre", reader={"stage_dir": str(stage)})
    r = run_host(run, "--set", "reader.source.threads=2", "--set", "reader.threads=3")
    assert r.returncode in (0, 1), r.stderr
    events = read_log(tmp_path / "pre" / "mlperf.log")
    assert numbers(events) == expected

    # Staging is logged inside init, before init_stop, and removed at the end.
    keys = [e["key"] for e in events]
    assert keys.index("init_start") < keys.index("staging_start") < keys.index("staging_stop") \
        < keys.index("init_stop")
    stop = events[keys.index("staging_stop")]
    assert stop["metadata"]["staged_files"] == 12  # 8 training + 4 validation files
    assert list(stage.iterdir()) == []
    assert "deepcam-host: staged 12 files" in r.stderr
    # The official checker accepts the staging events: one epoch on a small
    # set only misses the target accuracy.
    status, out = mlperf_check(tmp_path / "pre" / "mlperf.log")
    failed = [l for l in out.splitlines() if "Failed checks" in l]
    assert failed and all("eval_accuracy" in l for l in failed), out

    # The resolved config holds the nested table as a section, --set applied,
    # every default filled in, and it is valid TOML.
    resolved = tomllib.loads((tmp_path / "pre" / "config.toml").read_text())
    source = resolved["reader"]["source"]
    assert source["name"] == "hdf5" and source["threads"] == 2 and source["check_finite"] is True
    assert source["library"].endswith("libdeepcam_reader_hdf5.so")
    assert resolved["reader"]["threads"] == 3 and resolved["reader"]["shuffle_mode"] == "global"
    assert "[reader.source]" in r.stderr


@pytest.mark.parametrize("mode", ["resume", "--evaluate", "--predict"])
@pytest.mark.parametrize("checkpoint", ["missing.pt", "garbage.pt"])
def test_a_checkpoint_that_cannot_be_read_is_named_before_the_reader_stages(tmp_path, data, mode, checkpoint):
    # It was named only once the reader had staged every file (minutes on a real data set).
    (tmp_path / "garbage.pt").write_text("not a checkpoint\n")
    stage = tmp_path / "stage"
    stage.mkdir()
    run = prefetch_run(tmp_path, data, reader={"stage_dir": str(stage)})
    path = tmp_path / checkpoint
    args = {"resume": ["--set", f"run.resume={path}"], "--evaluate": ["--evaluate", path],
            "--predict": ["--predict", path, "--out", tmp_path / "pred"]}[mode]
    r = run_host(run, *args)
    assert r.returncode == 2, r.stderr[-3000:]
    said = "cannot open: No such file or directory" if checkpoint == "missing.pt" else \
        "not a torch.save file (not a zip archive)"
    # Named with what gave it: the setting, or the option.
    where = f"--set run.resume={path}" if mode == "resume" else mode
    assert f"deepcam-host: {where}: {path}: {said}" in r.stderr, r.stderr[-3000:]
    assert "staged" not in r.stderr and list(stage.iterdir()) == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_leftover_of_a_killed_run_is_reported_once_per_node(tmp_path, data, nproc):
    # Each rank of a node said the same warning in gpu (and global) mode.
    stage = tmp_path / "stage"
    p = subprocess.Popen(["true"])
    p.wait()
    leftover = stage / f"deepcam-stage-{p.pid}-Ab12Cd"  # its pid is no process any more
    (leftover / "train").mkdir(parents=True)
    run = prefetch_run(tmp_path, data, reader={"stage_dir": str(stage), "shuffle_mode": "gpu"},
                       run={"threads": 1})
    r = run_host(*(["--nproc", nproc] if nproc > 1 else []), run)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    said = [l for l in r.stderr.splitlines() if f"warning: {leftover} was left by a run that is no longer running" in l]
    assert len(said) == 1, r.stderr[-3000:]
    assert sorted(p.name for p in stage.iterdir()) == [leftover.name]  # reported, not removed


def test_staging_that_runs_out_of_space_fails_cleanly(tmp_path, data):
    stage = tmp_path / "stage"
    stage.mkdir()
    out = tmp_path / "out"
    run = prefetch_run(tmp_path, data, reader={"stage_dir": str(stage)})

    def limit_file_size():
        # A sample file is ~400 kB: the first staged copy hits the limit. With
        # SIGXFSZ ignored, write() fails with EFBIG, as a full disk fails
        # with ENOSPC.
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    r = subprocess.run([str(HOST), str(run)], capture_output=True, text=True, env=plugin_env(),
                       preexec_fn=limit_file_size, timeout=600)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("deepcam-host:")]
    assert len(lines) == 1, r.stderr
    assert "cannot write the staged copy of" in lines[0] and "File too large" in lines[0]
    assert str(data) in lines[0] and "stage_dir" in lines[0]
    assert list(stage.iterdir()) == [], "no partial copies may be left behind"
    assert not out.exists()


# ---- configs/fs-*.toml: each loads and trains two steps, scaled down to the CPU ----

CONFIGS = sorted((REPO_ROOT / "configs").glob("fs-*.toml"))


def npy_copy(h5_root, out):
    """The SPEC 1.5 .npy layout of an HDF5 data set, written with NumPy."""
    import h5py
    import numpy as np
    for split in ("train", "validation"):
        (out / split).mkdir(parents=True)
        for f in sorted((h5_root / split).glob("*.h5")):
            stem = f.name[len("data-"):-len(".h5")]
            with h5py.File(f, "r") as h:
                np.save(out / split / f"data-{stem}.npy", h["climate/data"][...])
                np.save(out / split / f"label-{stem}.npy", h["climate/labels_0"][...])
    shutil.copy(h5_root / "stats.h5", out / "stats.h5")
    return out


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("fs")
    h5 = synth(base / "h5", train=4, validation=2)
    return {"h5": h5, "npy": npy_copy(h5, base / "npy")}


def test_every_fs_config_is_covered():
    names = {c.stem for c in CONFIGS}
    assert {"fs-parallel", "fs-nvme", "fs-hdf5-shared", "fs-stage-shm"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_fs_config_loads_and_trains_two_steps(tmp_path, small_sets, config):
    text = config.read_text()
    assert text.startswith("#"), "each config says when to use it"
    resolved = tomllib.loads(text)
    reader = resolved["reader"]
    uses_npy = "npy" in (reader["name"], reader.get("source", {}).get("name"))
    out = tmp_path / "out"
    args = [config, "--set", f"data.root={small_sets['npy' if uses_npy else 'h5']}",
            "--set", f"run.output_dir={out}", "--set", "run.device=cpu", "--set", "run.max_epochs=1",
            "--set", "run.threads=2", "--set", "run.validation_batch_size=2", "--set", "run.logging_frequency=1",
            "--set", "model.width=0.0625", "--set", "model.middle_blocks=1",
            "--set", "scheduler.lr_warmup_steps=0", "--set", "mlperf.division=open"]
    r = run_host(*args)
    assert r.returncode in (0, 1), r.stderr  # 1: the target was not reached
    events = read_log(out / "mlperf.log")
    keys = [e["key"] for e in events]
    assert keys.count("train_loss") >= 2 and "eval_accuracy" in keys and keys[-1] == "run_stop"
    assert next(e["value"] for e in events if e["key"] == "train_samples") == 4
    written = tomllib.loads((out / "config.toml").read_text())
    assert written["reader"]["name"] == reader["name"]
    if "source" in reader:
        assert written["reader"]["source"]["name"] == reader["source"]["name"]
    if reader.get("stage_dir"):
        assert "staging_start" in keys and "staging_stop" in keys
        staged = next(l for l in r.stderr.splitlines() if l.startswith("deepcam-host: staged"))
        stage_dir = staged.split(" to ")[1].split(" in ")[0]
        assert stage_dir.startswith(reader["stage_dir"]) and not os.path.exists(stage_dir)


def test_a_runs_config_toml_under_prefetch_over_npy_runs_again(tmp_path, data):
    """config.toml writes every default of [reader.source] on a line of its own, the npy reader's
    shuffle_mode = "global" among them; reloading it was refused as an order key set in the source table,
    so README's `deepcam-host <output_dir>/config.toml` failed for fs-parallel.toml and every system file."""
    npy = tmp_path / "npy"
    subprocess.run([str(HOST.parent / "deepcam-data"), "convert", str(data), str(npy), "--quiet"], check=True,
                   capture_output=True)
    run = prefetch_run(tmp_path, npy, **{"reader.source": {"name": "npy", "threads": 1}},
                       run={"max_epochs": 1, "target_iou": 1.0})
    r = run_host(run, "--quiet")
    assert r.returncode == 1, r.stderr[-3000:]
    config = tmp_path / "out" / "config.toml"
    assert 'shuffle_mode = "global"  # default' in config.read_text()
    r = run_host(config, "--quiet", "--set", f"run.output_dir={tmp_path / 'again'}")
    assert r.returncode == 1, r.stderr[-3000:]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_fs_config_repeats_the_reference_run_file_outside_data_and_reader(config):
    """Each said "The other sections repeat configs/reference.toml's values" with seed = 1 where the
    reference has seed = "auto"."""
    text = config.read_text()
    assert "The other sections repeat configs/reference.toml's values" in text
    ours, reference = tomllib.loads(text), tomllib.loads((REPO_ROOT / "configs/reference.toml").read_text())
    assert set(ours) == set(reference)
    for section in set(reference) - {"data", "reader"}:
        differ = {key for key in set(ours[section]) | set(reference[section])
                  if ours[section].get(key) != reference[section].get(key)}
        assert differ == ({"output_dir"} if section == "run" else set()), (section, differ)
    assert ours["run"]["output_dir"] == f"../runs/{config.stem}"
    assert ours["data"]["channels"] == reference["data"]["channels"]
