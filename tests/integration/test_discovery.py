"""Finding plugins and describing them as a new user meets them: the host of
the build tree without any variable, `meson devenv`, --list-plugins and
--describe KIND (which check a file's name as a run does, and see a file
reached twice once), and a folder given as the run file."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import BUILD_DIR, FIXTURES, HOST, PLUGINS, plugin_env, run_host, synth, write_run


def env_without_plugin_path():
    env = dict(os.environ)
    env.pop("DEEPCAM_PLUGIN_PATH", None)
    return env


def test_the_build_tree_host_finds_the_build_tree_plugins_without_a_variable(tmp_path):
    r = run_host("--list-plugins", env=env_without_plugin_path())
    assert r.returncode == 0, r.stderr
    for name in ("hdf5", "npy", "prefetch", "deeplabv3plus", "adam", "adamw", "lamb", "multistep",
                 "cosine_annealing"):
        assert f" {name} " in r.stdout
    assert str(PLUGINS) in r.stdout
    data = synth(tmp_path / "data", train=2, validation=1)
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"train_batch_size": 2})
    r = run_host(run, env=env_without_plugin_path())
    assert r.returncode in (0, 1), r.stderr
    assert f'library = "{PLUGINS}/readers/hdf5/libdeepcam_reader_hdf5.so"  # loaded' in r.stderr


def test_meson_devenv_sets_the_plugin_path():
    meson = Path(sys.executable).parent / "meson"
    r = subprocess.run([str(meson), "devenv", "-C", str(BUILD_DIR), "env"], capture_output=True, text=True,
                       env=env_without_plugin_path())
    assert r.returncode == 0, r.stderr
    assert f"DEEPCAM_PLUGIN_PATH={PLUGINS}" in r.stdout.splitlines()


def test_list_plugins_fails_when_it_finds_none(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_host("--list-plugins", env=plugin_env(tmp_path / "empty"))
    assert r.returncode == 1
    assert "no plugins found" in r.stderr and str(tmp_path / "empty") in r.stderr


def test_describe_a_kind_lists_its_plugins_with_their_summaries():
    r = run_host("--describe", "optimizer")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("optimizer plugins")
    names = sorted(l.split()[0] for l in lines[1:])
    assert names == ["adam", "adamw", "lamb"]
    assert any("LAMB" in l for l in lines if l.split()[0] == "lamb")
    r = run_host("--describe", "scheduler")
    assert sorted(l.split()[0] for l in r.stdout.splitlines()[1:]) == ["cosine_annealing", "multistep"]
    r = run_host("--describe", "sampler")
    assert r.returncode == 2 and "no plugin kind 'sampler'" in r.stderr


def test_listing_skips_a_file_whose_plugin_has_another_name_as_a_run_refuses_it(tmp_path):
    # libdeepcam_scheduler_alias.so holds the scheduler 'fixture': it was listed as 'fixture' without a word,
    # while a run naming either name could not use it.
    folder = tmp_path / "alias"
    folder.mkdir()
    shutil.copy(FIXTURES / "libdeepcam_scheduler_alias.so", folder)
    says = (f"skipped {folder / 'libdeepcam_scheduler_alias.so'}: is the scheduler plugin 'fixture', whose file "
            "must be named libdeepcam_scheduler_fixture.so")
    for args in (["--list-plugins"], ["--describe", "scheduler"]):
        r = run_host(*args, env=plugin_env(f"{PLUGINS}:{folder}"))
        assert r.returncode == 0, r.stderr
        assert says in r.stderr and "fixture" not in r.stdout, r.stdout + r.stderr


def test_a_folder_on_the_path_twice_is_one_place(tmp_path):
    # P:P said "provided twice: P/x.so and P/x.so"; a link to P is the same place too.
    (tmp_path / "link").symlink_to(PLUGINS)
    for path in (f"{PLUGINS}:{PLUGINS}", f"{PLUGINS}:{tmp_path / 'link'}"):
        r = run_host("--describe", "optimizer/adam", env=plugin_env(path))
        assert r.returncode == 0, r.stderr
        r = run_host("--list-plugins", env=plugin_env(path))
        assert r.returncode == 0 and r.stdout.count("libdeepcam_optimizer_adam.so") == 1, r.stdout


def test_a_library_file_on_the_path_is_named_not_passed_over(tmp_path):
    """DEEPCAM_PLUGIN_PATH=.../libx.so was skipped in silence: an installed host took its installed copy
    of the plugin instead, and a build tree's host said only that the plugin was not found."""
    library = next(PLUGINS.glob("optimizers/adam/libdeepcam_optimizer_adam.so"))
    path = f"{library}:{PLUGINS}:{tmp_path / 'not-there'}"
    said = (f"DEEPCAM_PLUGIN_PATH entry {library}: not a folder (a file); the variable lists folders that hold "
            "plugin libraries: give the folder, or name the file with the table's `library` key")
    r = run_host("--describe", "optimizer/adam", env=plugin_env(path))
    assert r.returncode == 2 and r.stderr == f"deepcam-host: {said}\n", r.stderr
    # A listing lists the rest; an entry that is not there (another node's folder) is no problem.
    r = run_host("--list-plugins", env=plugin_env(path))
    assert r.returncode == 0 and "libdeepcam_optimizer_adam.so" in r.stdout, r.stdout
    assert r.stderr == f"deepcam-host: skipped {said}\n", r.stderr
    # A run says it alone too: it was blamed on the run file's [reader] name, the first plugin loaded.
    data = synth(tmp_path / "data", train=2, validation=1)
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = run_host(run, env=plugin_env(path))
    assert r.returncode == 2 and r.stderr.endswith(f"deepcam-host: {said}\n"), r.stderr


def test_a_folder_as_the_run_file_is_named_as_one(tmp_path):
    r = run_host(tmp_path)
    assert r.returncode == 2
    assert f"{tmp_path}: is a directory; give the run file" in r.stderr


def test_a_reader_pointed_at_the_other_format_names_the_reader_that_reads_it(tmp_path):
    h5 = synth(tmp_path / "h5", train=2, validation=1)
    npy = tmp_path / "npy"
    subprocess.run([str(BUILD_DIR / "core" / "deepcam-data"), "convert", str(h5), str(npy)], check=True,
                   capture_output=True)
    run = write_run(tmp_path / "run.toml", npy, tmp_path / "out")
    r = run_host(run)
    assert r.returncode == 2
    assert 'no .h5 files in the train split (it holds .npy files: read them with reader "npy")' in r.stderr
    r = run_host(run, "--set", f"data.root={h5}", "--set", "reader.name=npy")
    assert r.returncode == 2
    assert "no data-*.npy files in the train split (it holds .h5 files" in r.stderr


def test_a_device_as_the_run_file_is_refused_not_read(tmp_path):
    # /dev/zero was read as an empty file and then blamed for missing keys.
    r = run_host("/dev/zero", timeout=60)
    assert r.returncode == 2
    assert "/dev/zero: is not a regular file (a device or socket); give the run file" in r.stderr, r.stderr


def test_a_run_file_through_a_pipe_is_read_to_its_end(tmp_path):
    """`deepcam-host <(generate-run-file)`: the shell gives a pipe, read as a shell reads a script."""
    data = synth(tmp_path / "data", train=2, validation=1)
    write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = subprocess.run(["bash", "-c", f'exec "{HOST}" <(cat "$0") --benchmark 1 --set run.device=cpu',
                        tmp_path / "run.toml"], capture_output=True, text=True, env=plugin_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert '"steps": 1' in r.stdout and f'root = "{data}"' in r.stderr


def test_relative_paths_of_a_piped_run_file_are_taken_from_the_current_directory(tmp_path):
    """A pipe has no folder of the user's: data.root = "data" was read as /dev/fd/data ("no such
    directory"), and a relative output_dir as a folder under /dev/fd (or /dev, for /dev/stdin)."""
    synth(tmp_path / "data", train=2, validation=1)
    text = write_run(tmp_path / "run.toml", tmp_path / "data", tmp_path / "out").read_text()
    text = text.replace(f'"{tmp_path / "data"}"', '"data"').replace(f'"{tmp_path / "out"}"', '"out"')
    assert 'root = "data"' in text and 'output_dir = "out"' in text
    (tmp_path / "relative.toml").write_text(text)
    for source in ('<(cat relative.toml)', '/dev/stdin < relative.toml'):
        r = subprocess.run(["bash", "-c", f'exec "{HOST}" {source} --benchmark 1 --set run.device=cpu'],
                           capture_output=True, text=True, env=plugin_env(), cwd=tmp_path, timeout=300)
        assert r.returncode == 0, (source, r.stderr[-3000:])
        assert f'root = "{tmp_path / "data"}"' in r.stderr and f'output_dir = "{tmp_path / "out"}"' in r.stderr, \
            (source, r.stderr[-3000:])


def test_a_relative_plugin_path_is_recorded_absolute_so_the_config_reruns_from_anywhere(tmp_path):
    # DEEPCAM_PLUGIN_PATH=relp gave `library = "relp/..."  # loaded`, which config.toml kept; rerun from its
    # own folder, that path named a file that was not there.
    (tmp_path / "relp").mkdir()
    shutil.copy(FIXTURES / "libdeepcam_optimizer_sgd.so", tmp_path / "relp")
    data = synth(tmp_path / "data", train=2, validation=1)
    write_run(tmp_path / "run.toml", data, tmp_path / "out", optimizer={"name": "sgd", "lr": 0.001})
    r = subprocess.run([str(HOST), "run.toml", "--benchmark", "1", "--set", "run.device=cpu"], capture_output=True,
                       text=True, env=plugin_env(f"relp:{PLUGINS}"), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f'library = "{tmp_path}/relp/libdeepcam_optimizer_sgd.so"  # loaded' in r.stderr, r.stderr


def test_the_build_tree_host_says_its_own_plugins_are_not_searched_while_the_variable_is_set(tmp_path):
    (tmp_path / "mine").mkdir()
    r = run_host("--describe", "optimizer/adam", env=plugin_env(tmp_path / "mine"))
    assert r.returncode == 2
    assert (f"the host of a build tree searches DEEPCAM_PLUGIN_PATH alone while it is set, not its own {PLUGINS}: "
            f"DEEPCAM_PLUGIN_PATH={tmp_path / 'mine'}:{PLUGINS}") in r.stderr, r.stderr
    r = run_host("--describe", "optimizer/adma")  # the folder is on the variable: nothing to add
    assert r.returncode == 2 and "searches DEEPCAM_PLUGIN_PATH alone" not in r.stderr, r.stderr


def test_a_copy_of_the_build_folder_finds_its_own_plugins(tmp_path):
    # Its core library is not where it was built: it took itself for an install and searched
    # core/deepcam-host/plugins, a path through the program file, and found none.
    copy = tmp_path / "copy"
    for part in ("core", "plugins"):
        shutil.copytree(BUILD_DIR / part, copy / part, ignore=shutil.ignore_patterns("*.p"))
    env = env_without_plugin_path()
    r = subprocess.run([copy / "core" / "deepcam-host", "--describe", "optimizer/lamb"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0 and f"{copy}/plugins/optimizers/lamb/libdeepcam_optimizer_lamb.so" in r.stdout, r.stderr
    env["DEEPCAM_PLUGIN_PATH"] = str(tmp_path / "mine")
    r = subprocess.run([copy / "core" / "deepcam-host", "--describe", "optimizer/adagrad"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and f"not its own {copy}/plugins: DEEPCAM_PLUGIN_PATH=" in r.stderr, r.stderr


def test_listings_mark_a_plugin_that_a_run_would_not_take(tmp_path):
    # Two files of one plugin on DEEPCAM_PLUGIN_PATH were listed alike, while a run refuses both.
    (tmp_path / "dup").mkdir()
    copy = tmp_path / "dup" / "libdeepcam_optimizer_adam.so"
    shutil.copy(PLUGINS / "optimizers" / "adam" / "libdeepcam_optimizer_adam.so", copy)
    env = plugin_env(f"{tmp_path / 'dup'}:{PLUGINS}")
    # Both are marked, each naming the other: the first listed was not, as if a run would take it.
    built = PLUGINS / "optimizers" / "adam" / "libdeepcam_optimizer_adam.so"
    marks = [f"(provided twice, with {other}: a run refuses both; remove one or set the table's `library`)"
             for other in (built, copy)]
    r = run_host("--list-plugins", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    at = [i for i, l in enumerate(lines) if l.split()[:2] == ["optimizer", "adam"]]
    assert [lines[i + 1].strip() for i in at] == [f"{copy}  {marks[0]}", f"{built}  {marks[1]}"], r.stdout
    r = run_host("--describe", "optimizer", env=env)
    adams = [l for l in r.stdout.splitlines() if l.split()[:1] == ["adam"]]
    assert len(adams) == 2 and adams[0].endswith(marks[0]) and adams[1].endswith(marks[1]), r.stdout
