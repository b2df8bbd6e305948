"""deepcam-host's command line: listing and describing plugins, checking run
files, and refusing libraries that are not plugins for this host."""

import os
import re
import shutil
import subprocess
import tempfile
import textwrap

import pytest

from helpers import BUILD_DIR, FIXTURES, HOST, PLUGINS, REPO_ROOT, plugin_env, run_data, run_host, synth, write_run

KINDS = {"reader": "hdf5", "model": "deeplabv3plus", "optimizer": "adam", "scheduler": "multistep"}


def host_abi():
    """The plugin ABI of the host under test, as --version prints it."""
    version = run_host("--version").stdout
    return int(re.search(r"plugin ABI (\d+)", version).group(1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("cli") / "data", train=4, validation=2)


def test_list_plugins_names_every_built_plugin_and_its_file():
    r = run_host("--list-plugins")
    assert r.returncode == 0, r.stderr
    for kind, name in KINDS.items():
        line = next((l for l in r.stdout.splitlines() if l.split()[:2] == [kind, name]), None)
        assert line is not None, r.stdout
        assert f"libdeepcam_{kind}_{name}.so" in r.stdout


def test_describe_prints_each_parameter_with_type_default_and_doc():
    r = run_host("--describe", "optimizer/adam")
    assert r.returncode == 0, r.stderr
    assert "optimizer/adam" in r.stdout
    for key in ("lr", "betas", "weight_decay"):
        assert any(l.split()[:1] == [key] for l in r.stdout.splitlines()), r.stdout
    assert "float list" in r.stdout and "default" in r.stdout
    lines = r.stdout.splitlines()
    at = next(i for i, l in enumerate(lines) if l.split()[:1] == ["lr"])
    assert lines[at + 1].strip() == "learning rate", r.stdout  # its doc, on the line below
    r = run_host("--describe", "run")
    assert "target_iou" in r.stdout and "0.82" in r.stdout


def test_a_plugin_declared_with_no_parameters_describes_and_refuses_any_key(tmp_path, data):
    # PARAMS nullptr: the macros' form for a plugin without parameters (an empty array does not compile).
    lib = FIXTURES / "libdeepcam_scheduler_noparams.so"
    r = run_host("--describe", "scheduler/noparams", env=plugin_env(FIXTURES))
    assert r.returncode == 0, r.stderr
    assert "scheduler/noparams" in r.stdout and str(lib) in r.stdout, r.stdout
    # Its parameters heading was followed by nothing.
    assert r.stdout.endswith("`library`):\n  (none)\n"), r.stdout
    # The test run file's scheduler table has milestones.
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", scheduler={"name": "noparams", "library": str(lib)})
    r = run_host(run)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "[scheduler] milestones: unknown key (known: library, name)" in r.stderr, r.stderr[-2000:]


def test_list_plugins_is_in_kind_and_name_order():
    # It came in the file system's order, which differs from machine to machine. tmpfs lists a folder's
    # newest entry first: the plugins copied there in name order would come out reversed.
    kinds = ["reader", "model", "optimizer", "scheduler"]
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        for kind in reversed(kinds):
            for so in sorted((PLUGINS / f"{kind}s").glob("*/*.so")):
                shutil.copy(so, folder)
        r = run_host("--list-plugins", env=plugin_env(folder))
    assert r.returncode == 0, r.stderr
    listed = [(kinds.index(l.split()[0]), l.split()[1]) for l in r.stdout.splitlines() if l.split()[:1] and
              l.split()[0] in kinds]
    assert len(listed) >= 9 and listed == sorted(listed), r.stdout


def test_describe_unknown_plugin_lists_what_exists():
    r = run_host("--describe", "optimizer/adma")
    assert r.returncode == 2
    assert "no optimizer plugin named 'adma' (did you mean 'adam'?); found: adam" in r.stderr, r.stderr
    # The host of a build tree with DEEPCAM_PLUGIN_PATH set searches the variable's folders alone: it
    # named <build>/core/deepcam-host/plugins too, below the program file, a folder that cannot exist.
    searched = r.stderr.split("Searched ", 1)[1].split(" (set DEEPCAM_PLUGIN_PATH", 1)[0].split(", ")
    assert searched == [str(PLUGINS / "libdeepcam_optimizer_adma.so"),
                        str(PLUGINS / "optimizers" / "adma" / "libdeepcam_optimizer_adma.so")], r.stderr


def test_a_target_below_the_benchmarks_is_said_at_start(tmp_path, data):
    """A run stopping at target_iou 0.5 ends in "success", but its log fails the MLPerf checker."""
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", run={"target_iou": 0.5, "max_epochs": 1})
    r = run_host(run, "--quiet")
    assert r.returncode in (0, 1), r.stderr
    assert (f"deepcam-host: note: {run}:") in r.stderr and ("[run] target_iou = 0.5 is below the benchmark's "
                                                             "target IoU 0.82") in r.stderr, r.stderr
    r = run_host(run, "--quiet", "--set", "run.target_iou=0.82", "--set", f"run.output_dir={tmp_path / 'out2'}")
    assert r.returncode in (0, 1) and "target IoU" not in r.stderr, r.stderr


def error_of(tmp_path, data, **changes):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, **changes)
    r = run_host(run)
    assert r.returncode == 2, r.stderr
    assert not out.exists(), "a refused run must not leave output"
    lines = [l for l in r.stderr.splitlines() if l.startswith("deepcam-host:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_typo_in_a_plugin_key_names_file_line_and_suggestion(tmp_path, data):
    msg = error_of(tmp_path, data, optimizer={"lrr": 0.1})
    assert "run.toml:" in msg and "[optimizer] lrr: unknown key; did you mean 'lr'?" in msg


def test_typo_in_a_host_key(tmp_path, data):
    msg = error_of(tmp_path, data, run={"max_epoch": 3})
    assert "[run] max_epoch: unknown key; did you mean 'max_epochs'?" in msg


def test_typo_in_a_plugin_name_lists_the_plugins_found(tmp_path, data):
    msg = error_of(tmp_path, data, model={"name": "deeplab"})
    assert "[model] name: no model plugin named 'deeplab'; found: deeplabv3plus" in msg


def test_wrong_type_and_range(tmp_path, data):
    assert "[run] train_batch_size: expected int, got string" in error_of(
        tmp_path, data, run={"train_batch_size": "two"})
    assert "[run] target_iou: 1.5 is out of range" in error_of(tmp_path, data, run={"target_iou": 1.5})
    assert 'is not one of cpu, cuda' in error_of(tmp_path, data, run={"device": "gpu"})


def test_unknown_section_and_missing_required_key(tmp_path, data):
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    run.write_text(run.read_text() + "\n[optimiser]\nlr = 1\n")
    r = run_host(run)
    assert r.returncode == 2 and "unknown section [optimiser]; did you mean 'optimizer'?" in r.stderr
    run = write_run(tmp_path / "run2.toml", data, tmp_path / "out", data={"root": None})
    r = run_host(run)
    assert r.returncode == 2 and "[data]: missing required key 'root'" in r.stderr


def test_set_overrides_are_checked_like_the_file(tmp_path, data):
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = run_host(run, "--set", "optimizer.lr=fast")
    assert r.returncode == 2 and "--set optimizer.lr=fast: expected float, got string" in r.stderr
    r = run_host(run, "--set", "optimizer.betaz=[0.9, 0.99]")
    assert r.returncode == 2 and "did you mean 'betas'?" in r.stderr
    # A number C and Python read, and the seed's "auto" in capitals, said only "got string".
    r = run_host(run, "--set", "optimizer.lr=.5")
    assert r.returncode == 2 and ('--set optimizer.lr=.5: expected float, got string ".5", which TOML reads as no '
                                  "number: it wants a digit on each side of a point (0.5, 5.0)") in r.stderr, r.stderr
    r = run_host(run, "--set", 'run.seed="5"')
    assert r.returncode == 2 and ('--set run.seed="5": expected int, got string "5": in quotes a number is a '
                                  "string; write it without them") in r.stderr, r.stderr
    # Quoted text whose trouble is not a point gets TOML's own reason; a quoted float for an int key is
    # not told to drop the quotes, which would only make it a float.
    r = run_host(run, "--set", 'run.seed="007"')
    assert r.returncode == 2 and ('--set run.seed="007": expected int, got string "007", which TOML reads as no '
                                  "number either (Error while parsing decimal integer: leading zeroes are "
                                  "prohibited)") in r.stderr, r.stderr
    r = run_host(run, "--set", 'optimizer.lr="0x1p3"')
    assert r.returncode == 2 and "which TOML reads as no number either (" in r.stderr, r.stderr
    assert "digit on each side" not in r.stderr
    r = run_host(run, "--set", 'run.seed="2.0"')
    assert r.returncode == 2 and ('--set run.seed="2.0": expected int, got string "2.0": in quotes a number is a '
                                  "string, and without them a float; this key takes a whole number") in r.stderr, \
        r.stderr
    r = run_host(run, "--set", 'optimizer.lr="1.e5"')
    assert r.returncode == 2 and "it wants a digit on each side of a point" in r.stderr, r.stderr
    r = run_host(run, "--set", "run.seed=AUTO")
    assert r.returncode == 2 and ('--set run.seed=AUTO: expected int, got string "AUTO"; "auto", in lower case, '
                                  "draws a seed") in r.stderr, r.stderr
    # Digits TOML cannot read were taken as a string: "expected int, got string".
    r = run_host(run, "--set", "run.seed=99999999999999999999")
    assert r.returncode == 2 and ("--set run.seed=99999999999999999999: 99999999999999999999 is not a TOML integer "
                                  "(Error while parsing decimal integer: '99999999999999999999' is not "
                                  "representable in 64 bits)") in r.stderr, r.stderr
    r = run_host(run, "--set", "mlperf.platform=8xH100", "--set", "run.seed=007")
    assert r.returncode == 2 and "--set run.seed=007: 007 is not a TOML integer" in r.stderr, r.stderr
    # A string, list or table cut short was taken as a bare string, opening quote and all: the run trained
    # into a folder named '"out'.
    for item in [f'run.output_dir="{tmp_path / "cut"}', "optimizer.betas=[0.9, 0.999", "reader.source={name = 1"]:
        r = run_host(run, "--set", item)
        assert r.returncode == 2 and f"--set {item}: {item.split('=', 1)[1]} is not a TOML value (" in r.stderr, \
            r.stderr
    assert not (tmp_path / "cut").exists()


def test_a_plugin_name_that_is_not_a_string_is_named_where_it_was_set(tmp_path, data):
    """It was "[optimizer] needs name", as if the key were missing, naming a file that did not set it."""
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = run_host(run, "--set", "optimizer.name=3")
    assert r.returncode == 2 and ("--set optimizer.name=3: expected a string, the optimizer plugin's name (see "
                                  "deepcam-host --list-plugins), got int") in r.stderr, r.stderr
    run = write_run(tmp_path / "run2.toml", data, tmp_path / "out", model={"name": True})
    line = run.read_text().splitlines().index("name = true") + 1
    r = run_host(run)
    assert r.returncode == 2 and (f"{run}:{line} [model] name: expected a string, the model plugin's name (see "
                                  "deepcam-host --list-plugins), got bool") in r.stderr, r.stderr


@pytest.mark.parametrize("item,says", [
    ("mlperf.org=a\nb", '--set "mlperf.org=a\\nb": the item holds the control character 0x0a at byte 13'),
    (os.fsdecode(b"mlperf.org=\xff"), "the item is not UTF-8 (byte 12 is 0xff)"),
    (os.fsdecode(b"mlperf.org=\xc3"), "the item is not UTF-8 (byte 12 begins a sequence cut short)"),
    (os.fsdecode(b"mlperf.org=\xed\xa0\x80"), "the item is not UTF-8 (bytes 12..14)"),  # a UTF-16 surrogate
])
def test_set_items_that_toml_cannot_hold_are_refused_not_mangled(tmp_path, data, item, says):
    # A raw newline broke config.toml's comment naming the item; a byte that is not UTF-8 was replaced.
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out)
    r = run_host(run, "--set", item)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not out.exists()


def test_set_items_in_utf8_and_with_tabs_are_taken(tmp_path, data):
    # Taken: the error that stops the run is the later item's, not theirs.
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = run_host(run, "--set", "mlperf.org=Zürich 🌀", "--set", "mlperf.platform=a\tb", "--set", "optimizer.lr=0")
    assert r.returncode == 2 and "--set optimizer.lr=0:" in r.stderr and "UTF-8" not in r.stderr, r.stderr


def test_set_items_spaced_as_in_a_run_file_are_taken(tmp_path, data):
    # `--set "run.seed = 5"` was the key 'seed ' ("unknown key; did you mean 'seed'?"), and a bare string kept
    # its blanks.
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = run_host(run, "--set", "run . seed = 7", "--set", " optimizer.betas =\t[0.9, 0.99]", "--set", "optimizer.lr= 0")
    assert r.returncode == 2 and "--set optimizer.lr= 0:" in r.stderr and "unknown" not in r.stderr, r.stderr
    r = run_host(run, "--set", "optimizer.lr = fast ")
    assert r.returncode == 2 and "--set optimizer.lr = fast : expected float, got string" in r.stderr, r.stderr
    out = tmp_path / "spaced out"
    r = run_host(run, "--benchmark", 1, "--quiet", "--set", f"run.output_dir =  {out}  ")
    assert r.returncode == 0, r.stderr
    assert f'output_dir = "{out}"  # --set run.output_dir =  {out}  ' in r.stderr, r.stderr


@pytest.mark.parametrize("item,hint", [
    # A key of another section got [run]'s list alone.
    ("run.weight_decay=0.1", "unknown key; weight_decay is a key of [optimizer] (known: "),
    ("run.lr_warmup_steps=10", "unknown key; lr_warmup_steps is a key of [scheduler] (known: "),
    ("run.betas=[0.9, 0.99]", "unknown key; betas is a key of [optimizer] (known: "),
    # Only a section whose plugin takes the key: the hdf5 reader has no shuffle_mode.
    ("data.shuffle_mode=gpu", "unknown key (known: "),
    # The reference's flags, before a did-you-mean that would guess wrong (checkpoint_every).
    ("run.checkpoint=a.pt", "unknown key; the reference's --checkpoint is [run] resume (known: "),
    ("run.local_batch_size=4", "unknown key; the reference's --local_batch_size is [run] train_batch_size"),
    ("optimizer.adam_eps=1e-8", "unknown key; the reference's --adam_eps has no key here: eps is 1e-6, as the MLPerf rules"),
    ("run.save_frequency=0", "unknown key; the reference's --save_frequency is [run] checkpoint_every (its 0, "
                             "no checkpoints, is -1 here)"),
    # A close match still comes first.
    ("run.max_epoch=3", "unknown key; did you mean 'max_epochs'?"),
])
def test_an_unknown_key_says_where_it_is_at_home(tmp_path, data, item, hint):
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = run_host(run, "--set", item)
    assert r.returncode == 2 and f"--set {item}: {hint}" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("key", ["org", "platform"])
def test_an_empty_org_or_platform_is_refused_before_training(tmp_path, data, key):
    """The run trained to its target and exited 0, and its log then failed the MLPerf checker
    (submission_org and submission_platform must not be empty)."""
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out)
    r = run_host(run, "--set", f'mlperf.{key}=""')
    assert r.returncode == 2, r.stderr[-3000:]
    assert f'--set mlperf.{key}="": empty; the MLPerf checker fails a log whose submission_{key} is empty' in r.stderr, \
        r.stderr[-3000:]
    assert not out.exists()


def refused(tmp_path, data, library, kind="optimizer"):
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, **{kind: {"library": str(library)}})
    r = run_host(run)
    assert r.returncode == 2, r.stderr
    assert not out.exists()
    return r.stderr


def test_plugin_for_another_abi_is_refused_with_both_versions(tmp_path, data):
    lib = FIXTURES / "libdeepcam_optimizer_foreignabi.so"
    msg = refused(tmp_path, data, lib)
    assert str(lib) in msg and f"built for plugin ABI 1, this host has plugin ABI {host_abi()}" in msg


def test_plugin_built_against_another_libtorch_is_refused(tmp_path, data):
    msg = refused(tmp_path, data, FIXTURES / "libdeepcam_optimizer_foreigntorch.so")
    assert "plugin built with LibTorch 1.13.0, _GLIBCXX_USE_CXX11_ABI=0, CUDA 11.7" in msg
    assert "this host is built with LibTorch 2.11.0" in msg


def test_a_cxx_abi_0_plugin_that_calls_the_core_is_refused_naming_the_abi(tmp_path, data):
    # Its MlperfLog::event takes the old std::string, which the core does not export: the loader refuses the
    # file before its descriptor (which says _GLIBCXX_USE_CXX11_ABI=0) can be read, and the message named an
    # undefined mangled symbol alone.
    lib = FIXTURES / "libdeepcam_scheduler_cxxabi0core.so"
    msg = refused(tmp_path, data, lib, kind="scheduler")
    assert f"{lib}: cannot load: " in msg and "undefined symbol: _ZN7deepcam9MlperfLog5event" in msg, msg
    assert "(deepcam::MlperfLog::event(std::string const&" in msg, msg
    assert ("the plugin takes the C++ library's old std::string, as code compiled with _GLIBCXX_USE_CXX11_ABI=0 "
            "does, and this host is built with _GLIBCXX_USE_CXX11_ABI=1; rebuild the plugin with the SDK's flags "
            "(pkg-config --cflags deepcam-plugin)") in msg, msg


def test_shared_library_that_is_not_a_plugin(tmp_path, data):
    msg = refused(tmp_path, data, FIXTURES / "libdeepcam_optimizer_notaplugin.so")
    assert f"not a deepcam-host plugin (no symbol deepcam_plugin_v{host_abi()})" in msg
    # The guide quoted deepcam_plugin_v8 to plugin authors of ABI 9.
    guide = (REPO_ROOT / "docs" / "writing-plugins.md").read_text()
    named = set(re.findall(r"deepcam_plugin_v\d+", guide))
    assert named == {f"deepcam_plugin_v{host_abi()}"}, named


def test_plugin_compiled_with_another_cxx_abi_is_refused_with_both_abis(tmp_path, data):
    # The descriptor takes the flag of the plugin's own compile, not the SDK's build config; accepted, such a
    # plugin read the host's std::string with the other layout and crashed.
    lib = FIXTURES / "libdeepcam_scheduler_cxxabi0.so"
    msg = refused(tmp_path, data, lib, kind="scheduler")
    assert "this host is built with" in msg, msg
    plugin_side, host_side = msg.split("this host is built with")
    assert f"{lib}: plugin built with LibTorch " in plugin_side and "_GLIBCXX_USE_CXX11_ABI=0" in plugin_side
    assert "_GLIBCXX_USE_CXX11_ABI=1" in host_side


def test_an_entry_point_that_returns_no_descriptor_is_named_so(tmp_path, data):
    lib = FIXTURES / "libdeepcam_scheduler_nodescriptor.so"
    msg = refused(tmp_path, data, lib, kind="scheduler")
    assert f"{lib}: its entry point deepcam_plugin_v{host_abi()} returned no descriptor (nullptr)" in msg
    assert "ABI 0" not in msg


# Fixtures with one mistake each in their own parameter schema, and what the loader says of it.
SCHEMA_MISTAKES = [
    ("nodoc", "parameter 'nodoc': no doc"),
    ("nullkey", "the parameter after 'scale' has no key (nullptr)"),
    ("duplicatekey", "parameter 'scale': declared twice"),
    ("hostkey", "parameter 'library': the host's own key of every plugin table"),
    ("defaulttype", "parameter 'factor': default \"abc\": expected float, got string"),
    ("defaultnottoml", "parameter 'factor': default 1.2.3.x: not a TOML value"),
    ("defaultrange", "parameter 'steps': default 500: 500 is out of range [1, 10]"),
    ("pluginkind", "parameter 'inner': a plugin table needs the kind of plugin it names in `choices`"),
    # Accepted, they printed contradictions: "range [0, 1]" and then "0 is out of range [0, 1]"; "one of
    # a||b" with "" taken as a choice; a doc whose second line started at the left margin.
    ("intfracbounds", "parameter 'n': range [0.5, 1.5] of an integer key: its bounds must be whole numbers"),
    ("emptychoice", "parameter 'mode': choices \"a||b\" hold an empty choice"),
    ("doclinebreak", "parameter 'k': its doc holds a line break; a doc is one line"),
]


@pytest.mark.parametrize("name,says", SCHEMA_MISTAKES)
def test_a_mistake_in_a_plugins_own_schema_is_refused_naming_the_file_and_the_key(name, says):
    # They reached users as "(null)", an internal error, or a message naming neither the file nor the key.
    lib = FIXTURES / f"libdeepcam_scheduler_{name}.so"
    r = run_host("--describe", f"scheduler/{name}", env=plugin_env(FIXTURES))
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert f"{lib}: the parameter schema of the scheduler plugin '{name}' has a mistake: {says}" in r.stderr, \
        r.stderr


def test_a_plugin_with_a_mistake_in_its_schema_is_refused_by_a_run_and_skipped_by_listing(tmp_path, data):
    lib = FIXTURES / "libdeepcam_scheduler_defaulttype.so"
    assert "parameter 'factor': default" in refused(tmp_path, data, lib, kind="scheduler")
    folder = tmp_path / "plugins"
    folder.mkdir()
    shutil.copy(lib, folder)
    r = run_host("--list-plugins", env=plugin_env(f"{PLUGINS}:{folder}"))
    assert r.returncode == 0, r.stderr
    assert f"skipped {folder / lib.name}: the parameter schema" in r.stderr and "defaulttype" not in r.stdout


def factory_run(tmp_path, data, fault):
    """A run whose reader is the fixture whose factory fails as `fault` says."""
    lib = FIXTURES / "libdeepcam_reader_faulty.so"
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    reader={"name": "faulty", "library": str(lib), "fault": fault, "threads": None})
    return lib, run_host(run)


def test_a_factory_that_throws_is_an_internal_error_naming_the_plugin_file(tmp_path, data):
    lib, r = factory_run(tmp_path, data, "throw")
    assert r.returncode == 3, r.stderr
    assert f"internal error: {lib}: the plugin's factory failed: deliberate failure of the fixture" in r.stderr


def test_a_factory_that_throws_what_is_no_std_exception_is_an_internal_error_too(tmp_path, data):
    # (It ended the host in std::terminate, status 134.)
    lib, r = factory_run(tmp_path, data, "throw-int")
    assert r.returncode == 3, r.stderr
    assert (f"internal error: {lib}: the plugin's factory threw an exception that is not a std::exception"
            in r.stderr), r.stderr
    assert "terminate called" not in r.stderr


def test_a_factory_asking_for_an_undeclared_key_is_a_bug_of_the_plugin_not_of_the_run_file(tmp_path, data):
    lib, r = factory_run(tmp_path, data, "undeclared")
    assert r.returncode == 3, r.stderr
    assert f"internal error: {lib}: a bug in the plugin: the plugin asked for parameter 'undeclared', which " \
           "its schema does not declare" in r.stderr


def test_a_factory_that_returns_nothing_is_a_bug_of_the_plugin_as_its_other_faults_are(tmp_path, data):
    # It exited 2, "bad input", where the factory's other faults are internal errors (3).
    lib, r = factory_run(tmp_path, data, "nothing")
    assert r.returncode == 3, r.stderr
    assert f"internal error: {lib}: a bug in the plugin: the factory returned nothing (nullptr)" in r.stderr, \
        r.stderr


def assert_no_backtrace(stderr):
    assert "Exception raised from" not in stderr and "frame #" not in stderr, stderr


def test_a_libtorch_error_of_a_factory_is_said_without_libtorchs_backtrace(tmp_path, data):
    lib, r = factory_run(tmp_path, data, "c10")
    assert r.returncode == 3, r.stderr
    assert f"internal error: {lib}: the plugin's factory failed: deliberate c10 failure of the fixture's factory" \
        in r.stderr, r.stderr
    assert_no_backtrace(r.stderr)


def test_a_libtorch_error_mid_run_is_said_without_libtorchs_backtrace(tmp_path, data):
    # The reader's every method fails a TORCH_CHECK: named with the plugin (it was "internal error: <what
    # ATen said>", naming none), and in deepcam-data read too, with deepcam-host's status (it was 1, bad data).
    lib, r = factory_run(tmp_path, data, "c10-reader")
    says = f"internal error: {lib}: the reader plugin 'faulty' failed in LibTorch: deliberate c10 failure of the " \
           "fixture's reader"
    assert r.returncode == 3 and f"deepcam-host: {says}" in r.stderr, r.stderr
    assert_no_backtrace(r.stderr)
    r = run_data("read", tmp_path / "run.toml", timeout=300)
    assert r.returncode == 3 and f"deepcam-data: {says}" in r.stderr, r.stderr
    assert_no_backtrace(r.stderr)


def test_the_guides_recipe_for_a_nested_plugin_says_a_nested_factorys_nullptr(tmp_path, data):
    # Written as docs/writing-plugins.md said, a wrapping reader crashed (SIGSEGV) on the nullptr.
    fixture = (REPO_ROOT / "tests" / "fixtures" / "nested_reader.cpp").read_text()
    recipe = fixture.split("// writing-plugins.md: begin\n", 1)[1].split("  // writing-plugins.md: end", 1)[0]
    guide = (REPO_ROOT / "docs" / "writing-plugins.md").read_text()
    assert f"```cpp\n{textwrap.dedent(recipe)}```" in guide, "the guide's recipe is not the fixture's"
    faulty = FIXTURES / "libdeepcam_reader_faulty.so"
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    reader={"name": "nested", "library": str(FIXTURES / "libdeepcam_reader_nested.so"),
                            "threads": None},
                    **{"reader.source": {"name": "faulty", "library": str(faulty), "fault": "nothing"}})
    r = run_host(run)
    assert r.returncode == 3, r.stderr
    assert f"internal error: {faulty}: a bug in the plugin: the factory returned nothing (nullptr)" in r.stderr, \
        r.stderr


def test_a_factorys_error_about_the_run_file_passes_as_it_is(tmp_path, data):
    _, r = factory_run(tmp_path, data, "error")
    assert r.returncode == 2, r.stderr
    line = next(l for l in r.stderr.splitlines() if "deliberate" in l)
    assert line.startswith(f"deepcam-host: {tmp_path / 'run.toml'}:") and "[reader] fault: deliberate error" in line


def test_corrupt_and_missing_library(tmp_path, data):
    bad = tmp_path / "libdeepcam_optimizer_adam.so"
    bad.write_bytes(b"\x7fELF this is not a library" * 10)
    msg = refused(tmp_path, data, bad)
    # The dynamic loader's own reason, not an errno text.
    assert "cannot load" in msg and "Bad file descriptor" not in msg
    assert "no such plugin library" in refused(tmp_path, data, tmp_path / "missing.so")


def test_a_folder_or_an_elf_file_that_is_no_shared_library_is_named_for_what_it_is(tmp_path, data):
    # A folder was "no such plugin library"; a 64-bit object file "not a 64-bit ELF library".
    folder = tmp_path / "libdeepcam_optimizer_adam.so"
    folder.mkdir()
    assert f"{folder}: a directory, not a plugin library file" in refused(tmp_path, data, folder)
    # /dev/zero was "no such plugin library", and a loop of links too.
    assert "/dev/zero: not a plugin library file (a device, pipe or socket)" in refused(tmp_path, data, "/dev/zero")
    loop = tmp_path / "loop.so"
    loop.symlink_to(loop)
    assert f"{loop}: cannot read the plugin library: Too many levels of symbolic links" in refused(tmp_path, data,
                                                                                                  loop)
    obj = next((BUILD_DIR / "core").rglob("*.o"))
    assert f"{obj}: cannot load: not a shared library (an object file)" in refused(tmp_path, data, obj)
    executable = tmp_path / "executable.so"
    elf = bytearray((PLUGINS / "optimizers" / "adam" / "libdeepcam_optimizer_adam.so").read_bytes())
    elf[16:18] = (2).to_bytes(2, "little")  # e_type ET_EXEC
    executable.write_bytes(elf)
    assert f"{executable}: cannot load: not a shared library (an executable)" in refused(tmp_path, data, executable)


def test_truncated_library_is_refused_not_crashed(tmp_path, data):
    # The dynamic loader faults (SIGBUS) on a library cut short; the host must
    # check the file first.
    whole = (PLUGINS / "optimizers" / "adam" / "libdeepcam_optimizer_adam.so").read_bytes()
    for keep in (2000, len(whole) - 5000):
        cut = tmp_path / "libdeepcam_optimizer_adam.so"
        cut.write_bytes(whole[:keep])
        assert "cannot load: truncated" in refused(tmp_path, data, cut)


def test_library_of_another_kind_is_refused(tmp_path, data):
    adam = PLUGINS / "optimizers" / "adam" / "libdeepcam_optimizer_adam.so"
    msg = refused(tmp_path, data, adam, kind="scheduler")
    assert "is the optimizer plugin 'adam', but the config asks for the scheduler plugin 'multistep'" in msg


def test_two_plugins_with_the_same_name_are_an_error_naming_both(tmp_path, data):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        shutil.copy(PLUGINS / "optimizers" / "adam" / "libdeepcam_optimizer_adam.so", d)
    env = plugin_env(f"{PLUGINS}:{a}:{b}")
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = run_host(run, env=env)
    assert r.returncode == 2
    assert "optimizer 'adam' is provided twice" in r.stderr
    assert str(PLUGINS) in r.stderr and str(a) in r.stderr


@pytest.mark.parametrize("entry,says", [("dangling", "a link to nothing"), ("folder", "not a file")])
def test_an_entry_named_as_a_plugin_that_is_not_a_file_is_named_not_passed_over(tmp_path, data, entry, says):
    first = tmp_path / "first"
    first.mkdir()
    named = first / "libdeepcam_optimizer_adam.so"
    if entry == "dangling":
        named.symlink_to(tmp_path / "gone.so")
    else:
        named.mkdir()
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = run_host(run, env=plugin_env(f"{first}:{PLUGINS}"))
    assert r.returncode == 2 and f"{named}: named as the optimizer plugin 'adam' but {says}" in r.stderr, r.stderr


def test_an_empty_library_path_is_refused_not_taken_as_absent(tmp_path, data):
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", optimizer={"library": ""})
    r = run_host(run)
    assert r.returncode == 2 and "[optimizer] library: an empty path" in r.stderr, r.stderr


def test_describe_of_an_unknown_section_prints_nothing_but_the_error():
    r = run_host("--describe", "optimizers")
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert "optimizers" in r.stderr


def test_plugin_found_through_the_search_path_only(tmp_path, data):
    env = plugin_env(str(tmp_path / "empty"))
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = run_host(run, env=env)
    assert r.returncode == 2 and "no reader plugin named 'hdf5'; found: none" in r.stderr


@pytest.mark.parametrize("name,lr", [("negativelr", "-1"), ("nanlr", "nan")])
def test_a_scheduler_giving_a_rate_no_schedule_gives_is_a_bug_of_the_plugin(tmp_path, data, name, lr):
    # A negative rate was taken (the run trained backwards); NaN ended as "diverged", with a hint to lower
    # [optimizer] lr or a warm-up key the scheduler may not have.
    lib = FIXTURES / f"libdeepcam_scheduler_{name}.so"
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    scheduler={"name": name, "library": str(lib), "milestones": None})
    r = run_host(run)
    assert r.returncode == 3, r.stderr
    assert (f"internal error: {lib}: a bug in the plugin: the scheduler gave the learning rate {lr} for optimizer "
            f"step 0") in r.stderr, r.stderr


def test_an_optimizer_whose_rate_is_nan_is_the_optimizers_bug_not_the_schedulers(tmp_path, data):
    # The scheduler scaled the NaN base rate and was named: "the scheduler gave the learning rate nan".
    lib = FIXTURES / "libdeepcam_optimizer_nanrate.so"
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", optimizer={"name": "nanrate", "library": str(lib)})
    r = run_host(run)
    assert r.returncode == 3, r.stderr
    assert (f"internal error: {lib}: a bug in the plugin: the optimizer's lr(), the base rate of the schedule, is "
            f"nan as built from {run} [optimizer]") in r.stderr, r.stderr
    assert "scheduler gave" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_scheduler_logging_a_setting_the_engine_logs_is_a_bug_of_the_plugin(tmp_path, data):
    # The log held global_batch_size twice (8, then 1024), and the open division's checker passed it.
    lib = FIXTURES / "libdeepcam_scheduler_enginekey.so"
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    scheduler={"name": "enginekey", "library": str(lib), "milestones": None})
    r = run_host(run)
    assert r.returncode == 3, r.stderr
    assert re.search(rf"internal error: {re.escape(str(lib))}: the scheduler plugin 'enginekey' failed: the MLPerf "
                     r"log line of 'global_batch_size' \(from \S*tests/fixtures/faulty_scheduler.cpp:\d+\) repeats a "
                     r"setting logged before run_start \(from \S*core/train/engine.cpp:\d+\); each is logged once",
                     r.stderr), r.stderr
    assert not (tmp_path / "out").exists()  # stopped before run_start: no record is kept


@pytest.mark.parametrize("name,threw", [("initthrows", "it threw: deliberate failure of a static initialiser"),
                                        ("initthrowsint", "it threw an exception that is not a std::exception")])
def test_a_library_whose_static_initialiser_throws_is_an_internal_error_naming_it(tmp_path, data, name, threw):
    # dlopen's caller cannot catch it: the host ended in std::terminate ("terminate called", status 134).
    lib = FIXTURES / f"libdeepcam_scheduler_{name}.so"
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    scheduler={"name": name, "library": str(lib), "milestones": None})
    for args, env in (([run], None), (["--describe", f"scheduler/{name}"], plugin_env(FIXTURES))):
        r = run_host(*args, env=env)
        assert r.returncode == 3, r.stderr
        assert (f"deepcam-host: internal error: {lib}: cannot load: {threw} while the library's static "
                "initialisers ran") in r.stderr, r.stderr
        assert "terminate called" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_library_of_another_kind_whose_initialiser_throws_does_not_stop_a_lookup():
    # Looking up an optimizer opened every libdeepcam_*.so on the path for its "found:" list, so a scheduler
    # whose static initialiser throws (libdeepcam_scheduler_initthrows.so, in FIXTURES) ended a typo's lookup
    # and --describe optimizer as that scheduler's internal error.
    env = plugin_env(FIXTURES)
    r = run_host("--describe", "optimizer/sgdd", env=env)
    assert r.returncode == 2, r.stderr
    assert "no optimizer plugin named 'sgdd' (did you mean 'sgd'?); found: " in r.stderr and " sgd (" in r.stderr, \
        r.stderr
    assert "initthrows" not in r.stderr, r.stderr
    r = run_host("--describe", "optimizer", env=env)
    assert r.returncode == 0 and "sgd" in r.stdout and "initthrows" not in r.stderr, r.stderr


@pytest.mark.parametrize("args,says", [
    # The second value was taken and the first dropped without a word.
    (["--benchmark", "2", "--benchmark", "3"], "--benchmark is given twice; give it once"),
    (["--evaluate", "a.pt", "--evaluate=b.pt"], "--evaluate is given twice; give it once"),
    (["--predict", "a.pt", "--out", "d1", "--out", "d2"], "--out is given twice; give it once"),
    # Taken for an unknown option, or for a run file.
    (["--nproc", "2"], "--nproc comes first: deepcam-host --nproc N RUN.toml"),
    (["--list-plugins"], "--list-plugins comes alone, first"),
    (["--quiet=yes"], "--quiet takes no value (given: --quiet=yes)"),
    (["--benchmark="], "--benchmark needs a value"),
])
def test_options_given_twice_or_out_of_place_are_refused(tmp_path, data, args, says):
    out = tmp_path / "out"
    r = run_host(write_run(tmp_path / "run.toml", data, out), *args)
    assert r.returncode == 2 and says in r.stderr, r.stderr[-3000:]
    assert not out.exists()


@pytest.mark.parametrize("again", [["--nproc", "2"], ["--nproc=3"]])
def test_nproc_given_twice_is_refused_before_any_rank_starts(tmp_path, data, again):
    # Each rank said it ran under a launcher already.
    out = tmp_path / "out"
    r = run_host("--nproc", "2", write_run(tmp_path / "run.toml", data, out), *again)
    assert r.returncode == 2 and r.stderr == "deepcam-host: --nproc is given twice; give it once\n", r.stderr
    assert not out.exists()


def test_option_equals_value_is_taken_as_argparse_takes_it(tmp_path, data):
    r = run_host(write_run(tmp_path / "run.toml", data, tmp_path / "out"), "--benchmark=1", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"samples_per_s"' in r.stdout.splitlines()[-1]


@pytest.mark.parametrize("args", [["--nproc=2", "--version"], ["--nproc", "2", "--describe=run"],
                                  ["--nproc", "2", "--help"]])
def test_what_prints_and_ends_is_refused_once_after_nproc(args):
    # Each rank printed the version (or the help) once, prefixed with its rank.
    r = run_host(*args)
    name = args[-1].split("=")[0]
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert f"deepcam-host: {name} comes alone, first, without --nproc" in r.stderr, r.stderr


@pytest.mark.parametrize("n", ["0", "4097", " 2", "2 ", "+2", "two", ""])
def test_nproc_takes_a_number_of_ranks_without_sign_or_spaces(tmp_path, data, n):
    out = tmp_path / "out"
    r = run_host("--nproc", n, write_run(tmp_path / "run.toml", data, out))
    assert r.returncode == 2 and f"--nproc {n}: expected a number of ranks in 1..4096" in r.stderr, r.stderr[-3000:]
    assert not out.exists()


@pytest.mark.parametrize("first", ["--help", "--version", "--list-plugins"])
def test_what_follows_an_option_that_ends_the_command_is_refused_not_ignored(first):
    r = run_host(first, "run.toml")
    assert r.returncode == 2 and f"{first} takes nothing after it (given: run.toml)" in r.stderr, r.stderr


@pytest.mark.parametrize("first", ["--help", "--version", "--list-plugins"])
def test_an_option_that_ends_the_command_given_a_value_is_refused_as_such(first):
    # It was told to come "alone, first", where it stood first.
    r = run_host(f"{first}=yes")
    assert r.returncode == 2 and r.stderr == f"deepcam-host: {first} takes no value (given: {first}=yes)\n", r.stderr


def test_describe_of_a_kind_and_a_slash_names_the_missing_plugin_name():
    # It said "no reader plugin named ''", with every search path.
    r = run_host("--describe", "reader/")
    assert r.returncode == 2 and r.stderr == ("deepcam-host: --describe reader/: no plugin name after the '/'; "
                                              "deepcam-host --describe reader lists them\n"), r.stderr


@pytest.mark.parametrize("seed, shown", [
    (9200000000000000001, "9200000000000000001"),  # rounds to the bound, 9.2e18, as a double
    (9223372036854775807, "9223372036854775807"),  # rounds to 2^63, and was printed as -2^63
])
def test_integer_bounds_are_checked_on_the_integer_not_its_nearest_double(tmp_path, data, seed, shown):
    assert f"[run] seed: {shown} is out of range [1, 9200000000000000000]" in error_of(tmp_path, data,
                                                                                     run={"seed": seed})
    r = run_host(write_run(tmp_path / "run.toml", data, tmp_path / "out"), "--set", f"run.seed={seed}")
    assert f"--set run.seed={seed}: {shown} is out of range [1, 9200000000000000000]" in r.stderr, r.stderr
    # The bound itself is taken: the error that stops this run is a later one.
    r = run_host(write_run(tmp_path / "run.toml", data, tmp_path / "out"), "--set", "run.seed=9200000000000000000",
                 "--set", "optimizer.lr=0")
    assert r.returncode == 2 and "seed" not in r.stderr and "--set optimizer.lr=0:" in r.stderr, r.stderr


@pytest.mark.parametrize("where, value, says", [
    ("run", {"output_dir": "out\0side"}, 'the string "out\\u0000side"'),
    ("model", {"name": "deeplab\0v3plus"}, 'the string "deeplab\\u0000v3plus"'),
    ("mlperf", {"org": ["a", "b\0"]}, 'the string "b\\u0000"'),
])
def test_a_nul_character_in_the_run_file_is_refused_naming_the_line(tmp_path, data, where, value, says):
    """A C string ends at U+0000: a path with one named another file, and the message that quoted it was
    cut short there."""
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.toml", data, out, **{where: value})
    r = run_host(run)
    assert r.returncode == 2, r.stderr
    line = next(n for n, text in enumerate(run.read_text().splitlines(), 1) if "\\u0000" in text)
    assert f"{run}:{line}: {says} holds the character U+0000, which no path, name or value may hold" in r.stderr, \
        r.stderr
    assert not out.exists()


def test_a_nul_character_in_a_key_is_refused_naming_the_line(tmp_path, data):
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    run.write_text(run.read_text() + '"root\\u0000x" = 1\n')  # the last table, [data]
    r = run_host(run)
    assert r.returncode == 2
    assert f'{run}:{len(run.read_text().splitlines())}: the key "root\\u0000x" holds the character U+0000' \
        in r.stderr, r.stderr


def test_a_nul_character_given_with_set_is_refused_naming_the_item(tmp_path, data):
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    item = 'run.output_dir="a\\u0000b"'
    r = run_host(run, "--set", item)
    assert r.returncode == 2
    assert f'--set {item}: the string "a\\u0000b" holds the character U+0000' in r.stderr, r.stderr


def test_describe_takes_its_value_after_an_equals_sign_as_every_option_does():
    """--describe=optimizer/lamb was refused ("--describe comes alone, first") although it came first."""
    joined, apart = run_host("--describe=optimizer/lamb"), run_host("--describe", "optimizer/lamb")
    assert joined.returncode == 0 and joined.stdout == apart.stdout and "optimizer/lamb" in apart.stdout, \
        joined.stderr
    for args in (["--describe"], ["--describe="], ["--describe", ""]):
        r = run_host(*args)
        assert r.returncode == 2 and "--describe needs what to describe" in r.stderr, (args, r.stderr)
    # A kind was given: the trouble is what follows it ("--describe needs KIND/NAME", it said).
    r = run_host("--describe", "run", "extra")
    assert r.returncode == 2 and "--describe takes one thing to describe (given also: extra)" in r.stderr, r.stderr


def test_quiet_is_given_at_most_once(tmp_path, data):
    """README: each option but --set is given at most once; --quiet --quiet was taken."""
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = run_host(run, "--quiet", "--quiet")
    assert r.returncode == 2 and "--quiet is given twice; give it once" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_an_empty_or_odd_word_on_the_command_line_is_refused_naming_it(tmp_path, data):
    """An empty run file name (an unset shell variable) said ": cannot read: No such file or directory"; a
    path with an ESC was printed raw on the lines that name it ("wrote the predictions ... to DIR")."""
    r = run_host("")
    assert r.returncode == 2 and "a run file's name is empty (an unset shell variable?)" in r.stderr, r.stderr
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out")
    r = run_host(run, "--predict", tmp_path / "nothing.pt", "--out", tmp_path / "pred\x1b[2J")
    assert r.returncode == 2, r.stderr
    assert ('argument 5 (after --out) ("' + str(tmp_path) + '/pred\\u001b[2J") holds the control character '
            '0x1b') in r.stderr, r.stderr
    assert "\x1b" not in r.stderr and not (tmp_path / "out").exists()
    r = run_host(run, "--quiet=1")
    assert r.returncode == 2 and "--quiet takes no value (given: --quiet=1)" in r.stderr, r.stderr
    # An option where a value stands: the predictions went into a folder named --quiet, not quietly.
    r = run_host(run, "--predict", tmp_path / "nothing.pt", "--out", "--quiet")
    assert r.returncode == 2, r.stderr
    assert ("--out needs a value, and --quiet is an option (a path that begins with '--' is written ./--quiet)"
            in r.stderr), r.stderr


def test_nproc_refuses_a_run_file_on_a_pipe_and_gives_the_usage_once(tmp_path):
    """Each rank reads the run files: a pipe's text went to one rank, and the others said "[data]: missing
    required key 'root'", naming a key the file holds."""
    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)
    r = run_host("--nproc", 2, fifo, timeout=60)
    assert r.returncode == 2, r.stderr
    assert (f"{fifo}: a pipe, which only one of the 2 ranks could read (each reads the run files); with --nproc, "
            "give the run file as a file") in r.stderr, r.stderr
    r = run_host("--nproc", 2, timeout=60)
    assert r.returncode == 2 and r.stderr.count("usage: deepcam-host") == 1, r.stderr
    assert "no run file given" in r.stderr, r.stderr


@pytest.mark.parametrize("args, says", [
    (["--bogus"], "unknown option --bogus"),
    (["--benchmark", "0"], "--benchmark 0: expected a number of steps in 1..1000000000"),
    (["--evaluate", "a.pt", "--benchmark", "3"], "--evaluate, --benchmark and --predict: give one of them"),
    (["--out", "dir"], "--out and --samples go with --predict CHECKPOINT"),
    (["--quiet", "--quiet"], "--quiet is given twice; give it once"),
    (["--set", "foo.bar=1"], "--set foo.bar=1: unknown section [foo]"),
    (["missing.toml"], "missing.toml: cannot read: No such file or directory"),
    (["--evaluate", "missing.pt"], "--evaluate: missing.pt: cannot open: No such file or directory"),
])
def test_a_bad_line_under_nproc_is_said_once_before_any_rank_starts(tmp_path, data, args, says):
    # Each rank parsed the line and said what was wrong with it, prefixed with its rank.
    out = tmp_path / "out"
    r = run_host("--nproc", 3, write_run(tmp_path / "run.toml", data, out), *args, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count(says) == 1 and r.stderr.startswith(f"deepcam-host: {says}"), r.stderr
    assert "rank" not in r.stderr, r.stderr
    assert not out.exists()


def test_a_run_file_that_never_ends_is_refused_past_16_mib(tmp_path):
    r = subprocess.run(["bash", "-c", f'exec "{HOST}" <(yes "# a comment")'], capture_output=True, text=True,
                       env=plugin_env(), timeout=120)
    assert r.returncode == 2, r.stderr
    assert "more than 16 MiB, which no run file is (a few KiB of TOML)" in r.stderr, r.stderr
