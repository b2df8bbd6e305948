"""Relative paths in a run file are taken from the file's folder, those of
--set from the current directory; the resolved config shows them absolute,
and errors about them name the key, the resolved path and where it was set."""

import shutil
import subprocess
import tomllib

import pytest

from helpers import HOST, PLUGINS, plugin_env, synth


def run_in(cwd, *args):
    return subprocess.run([str(HOST), *map(str, args)], capture_output=True, text=True, env=plugin_env(), cwd=cwd,
                          timeout=600)


RUN = """[run]
max_epochs = 1
train_batch_size = 2
output_dir = "{output_dir}"
threads = 2
[data]
root = "{root}"
[reader]
name = "hdf5"
[model]
name = "deeplabv3plus"
width = 0.0625
middle_blocks = 1
[optimizer]
name = "adam"
library = "{library}"
[scheduler]
name = "multistep"
milestones = [100]
"""


def project(tmp_path, root="data", output_dir="out", library="libs/libdeepcam_optimizer_adam.so"):
    """A folder holding a run file, its data and a copy of a plugin, all named relatively."""
    proj = tmp_path / "project"
    synth(proj / "data", train=2, validation=1)
    (proj / "libs").mkdir()
    shutil.copy(PLUGINS / "optimizers" / "adam" / "libdeepcam_optimizer_adam.so", proj / "libs")
    (proj / "run.toml").write_text(RUN.format(root=root, output_dir=output_dir, library=library))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return proj, elsewhere


def test_relative_paths_are_taken_from_the_run_file_s_folder(tmp_path):
    proj, elsewhere = project(tmp_path)
    r = run_in(elsewhere, proj / "run.toml")
    assert r.returncode in (0, 1), r.stderr
    assert (proj / "out" / "mlperf.log").exists() and not (elsewhere / "out").exists()
    resolved = tomllib.loads((proj / "out" / "config.toml").read_text())
    assert resolved["data"]["root"] == str(proj / "data")
    assert resolved["run"]["output_dir"] == str(proj / "out")
    assert resolved["optimizer"]["library"] == str(proj / "libs" / "libdeepcam_optimizer_adam.so")


def test_relative_paths_given_with_set_are_taken_from_the_current_directory(tmp_path):
    proj, elsewhere = project(tmp_path)
    r = run_in(elsewhere, proj / "run.toml", "--set", "run.output_dir=mine")
    assert r.returncode in (0, 1), r.stderr
    assert (elsewhere / "mine" / "mlperf.log").exists() and not (proj / "mine").exists()


def test_a_missing_data_root_is_named_with_its_resolved_path_and_leaves_nothing(tmp_path):
    proj, elsewhere = project(tmp_path, root="no-such-data")
    r = run_in(elsewhere, proj / "run.toml")
    assert r.returncode == 2
    assert str(proj / "no-such-data") in r.stderr, r.stderr
    assert not (proj / "out").exists() and not (elsewhere / "out").exists()


def test_a_folder_that_is_no_data_root_is_named_with_the_key(tmp_path):
    # The reader named only <root>/train, "no such directory", and not the line that set the root.
    proj, elsewhere = project(tmp_path, root="libs")
    r = run_in(elsewhere, proj / "run.toml")
    assert r.returncode == 2
    line = next(n for n, text in enumerate((proj / "run.toml").read_text().splitlines(), 1)
                if text.startswith("root"))
    assert (f"{proj / 'run.toml'}:{line} [data] root: {proj / 'libs'} holds neither train/ nor validation/: it is "
            "no data set root") in r.stderr, r.stderr
    assert not (proj / "out").exists()


def test_library_errors_point_at_the_library_line(tmp_path):
    proj, elsewhere = project(tmp_path, library="libs/missing.so")
    r = run_in(elsewhere, proj / "run.toml")
    assert r.returncode == 2
    assert f"{proj / 'run.toml'}:16 [optimizer] library: {proj / 'libs' / 'missing.so'}: no such plugin library" \
        in r.stderr, r.stderr


def test_a_path_beyond_the_basic_plane_reads_back_from_the_resolved_config(tmp_path):
    """config.toml wrote a character beyond U+FFFF as JSON does, as a UTF-16 surrogate pair (\\ud83c\\udf89),
    which TOML forbids: the run could not be repeated from the file the program wrote. Now \\U0001f389."""
    proj, elsewhere = project(tmp_path, root="data-\U0001f389", output_dir="out-\U0001d4b3")
    (proj / "data").rename(proj / "data-\U0001f389")
    r = run_in(elsewhere, proj / "run.toml")
    assert r.returncode in (0, 1), r.stderr
    written = (proj / "out-\U0001d4b3" / "config.toml").read_text()
    assert "\\U0001f389" in written and "\\ud83c" not in written, written
    resolved = tomllib.loads(written)
    assert resolved["data"]["root"] == str(proj / "data-\U0001f389")
    r = run_in(elsewhere, proj / "out-\U0001d4b3" / "config.toml", "--set", f"run.output_dir={tmp_path / 'again'}")
    assert r.returncode in (0, 1), r.stderr
    assert (tmp_path / "again" / "mlperf.log").exists()


@pytest.mark.parametrize("key,value,says", [
    ("output_dir", "out\\u001b[7mX", "the control character 0x1b at byte 4"),
    ("output_dir", "out\\u009bX", "the control character U+009B at byte 4"),
    ("log_file", "a\\nb.log", "the control character 0x0a at byte 2"),
])
def test_control_characters_in_a_run_file_s_strings_are_refused_naming_the_key(tmp_path, key, value, says):
    """An ESC, a C1 control or a newline written as a TOML escape in a run file was taken: the lines that show
    the path ("saved ...", "log ...") printed it raw, driving the terminal or splitting the line. --set refused
    the same bytes given raw; now a run file's escapes are refused too, naming the file, line and key."""
    proj, elsewhere = project(tmp_path)
    section = "mlperf" if key == "log_file" else "run"
    with open(proj / "run.toml", "a") as f:
        if section == "mlperf":
            f.write(f'[mlperf]\n{key} = "{value}"\n')
    if section == "run":
        text = (proj / "run.toml").read_text().replace('output_dir = "out"', f'output_dir = "{value}"')
        (proj / "run.toml").write_text(text)
    r = run_in(elsewhere, proj / "run.toml")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"deepcam-host: {proj / 'run.toml'}:") and f"[{section}] {key}" in line, r.stderr
    assert says in line and "\x1b" not in r.stderr and "\u009b" not in r.stderr, r.stderr
    assert not list(proj.glob("out*"))
