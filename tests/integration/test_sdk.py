"""The plugin SDK: `meson install` of the build into a temporary DESTDIR, the
out-of-tree SGD plugin (examples/plugins/sgd) built against that install with
pkg-config alone, run by the installed deepcam-host (through `library` and
through DEEPCAM_PLUGIN_PATH), and its updates compared with torch.optim.SGD.

The build directory is only read: `meson install --no-rebuild` copies what
the suite built (scripts/test.sh builds first) and changes no option. The
install is relocatable (deepcam-plugin.pc has a prefix relative to itself,
the programs an $ORIGIN rpath), which is what lets a DESTDIR tree work."""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.jit._pickle

from helpers import BUILD_DIR, REPO_ROOT, synth, write_run

VENV_BIN = Path(sys.executable).parent
MESON = str(VENV_BIN / "meson") if (VENV_BIN / "meson").exists() else "meson"
NINJA = str(VENV_BIN / "ninja") if (VENV_BIN / "ninja").exists() else "ninja"
EXAMPLE = REPO_ROOT / "examples" / "plugins" / "sgd"


def build_options():
    r = subprocess.run([MESON, "introspect", str(BUILD_DIR), "--buildoptions"], capture_output=True,
                       text=True, check=True)
    return {o["name"]: o["value"] for o in json.loads(r.stdout)}


def built_plugins():
    """libdeepcam_<kind>_<name>.so for every plugin folder that plugins/meson.build
    builds (a folder without plugin.cpp is shared code, not a plugin)."""
    names = re.findall(r"^subdir\('(\w+)s/(\w+)'\)", (REPO_ROOT / "plugins" / "meson.build").read_text(), re.M)
    plugins = {f"libdeepcam_{kind}_{name}.so" for kind, name in names
               if (REPO_ROOT / "plugins" / f"{kind}s" / name / "plugin.cpp").is_file()}
    assert plugins, "no plugins found in plugins/meson.build"
    return plugins


def sdk_env(sdk, plugin_path=None):
    """Only the install's pkg-config directory, no other pkg-config setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PKG_CONFIG")}
    env["PKG_CONFIG_PATH"] = str(sdk.pcdir)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DEEPCAM_PLUGIN_PATH"] = str(sdk.plugindir) if plugin_path is None else plugin_path
    return env


@pytest.fixture(scope="module")
def sdk(tmp_path_factory):
    destdir = tmp_path_factory.mktemp("sdk") / "root"
    r = subprocess.run([MESON, "install", "-C", str(BUILD_DIR), "--no-rebuild", "--destdir", str(destdir)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"meson install failed (is the build complete? run ninja -C {BUILD_DIR}):\n" \
                              + r.stdout[-3000:] + r.stderr[-3000:]
    opts = build_options()
    prefix = destdir / opts["prefix"].lstrip("/")
    libdir = prefix / opts["libdir"]
    return SimpleNamespace(prefix=prefix, bindir=prefix / opts["bindir"], libdir=libdir,
                           includedir=prefix / opts["includedir"] / "deepcam-host",
                           pcdir=libdir / "pkgconfig", plugindir=libdir / "deepcam-host" / "plugins",
                           host=prefix / opts["bindir"] / "deepcam-host")


@pytest.fixture(scope="module")
def sgd_build(sdk, tmp_path_factory):
    """examples/plugins/sgd built against the install, as an outside project would."""
    build = tmp_path_factory.mktemp("sgd") / "build"
    env = sdk_env(sdk)
    r = subprocess.run([MESON, "setup", str(build), str(EXAMPLE)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    r = subprocess.run([NINJA, "-C", str(build)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    return build


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("sdkdata") / "data", train=8, validation=2)


def test_install_has_programs_plugins_core_headers_and_pc_file(sdk):
    for program in ("deepcam-host", "deepcam-data"):
        assert os.access(sdk.bindir / program, os.X_OK), program
    assert (sdk.libdir / "libdeepcam_core.so").is_file()
    assert {p.name for p in sdk.plugindir.glob("*.so")} == built_plugins()
    # Every public header, whoever added it, and the generated build config.
    source = {p.name: p.read_bytes() for p in (REPO_ROOT / "core" / "include" / "deepcam").iterdir()}
    assert {p.name: p.read_bytes() for p in (sdk.includedir / "deepcam").iterdir()} == source
    assert (sdk.includedir / "deepcam_build_config.h").read_text() == \
        (BUILD_DIR / "deepcam_build_config.h").read_text()
    assert (sdk.pcdir / "deepcam-plugin.pc").is_file()


def test_installed_programs_run_on_the_installed_core_and_plugins(sdk):
    # Their $ORIGIN rpath finds the installed core, not the build tree's.
    for program in ("deepcam-host", "deepcam-data"):
        r = subprocess.run(["ldd", str(sdk.bindir / program)], capture_output=True, text=True, check=True)
        core = [line.split("=>")[1].split()[0] for line in r.stdout.splitlines() if "libdeepcam_core.so" in line]
        assert [Path(c).resolve() for c in core] == [(sdk.libdir / "libdeepcam_core.so").resolve()], r.stdout
    r = subprocess.run([str(sdk.host), "--list-plugins"], capture_output=True, text=True, env=sdk_env(sdk),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skipped" not in r.stderr, r.stderr
    listed = {Path(p).name for p in re.findall(r"^\s+(/\S+\.so)$", r.stdout, re.M)}
    assert listed == built_plugins(), r.stdout


def test_installed_host_finds_its_plugins_without_a_plugin_path(sdk):
    # The install was staged under DESTDIR: the host must look beside the core
    # library it loaded, not at the configured prefix.
    r = subprocess.run([str(sdk.host), "--list-plugins"], capture_output=True, text=True,
                       env=sdk_env(sdk, plugin_path=""), timeout=120)
    assert r.returncode == 0, r.stderr
    listed = [Path(p) for p in re.findall(r"^\s+(/\S+\.so)$", r.stdout, re.M)]
    assert {p.name for p in listed} == built_plugins(), r.stdout
    assert all(p.is_relative_to(sdk.plugindir) for p in listed), r.stdout


def test_pkg_config_gives_the_install_and_libtorch_flags(sdk):
    env = sdk_env(sdk)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "deepcam-plugin"], capture_output=True,
                           text=True, env=env, check=True).stdout.split()
    includes = [Path(f[2:]).resolve() for f in flags if f.startswith("-I")]
    assert sdk.includedir.resolve() in includes
    assert (sdk.includedir / "deepcam" / "plugin.hpp").is_file()
    libdirs = [Path(f[2:]).resolve() for f in flags if f.startswith("-L")]
    assert sdk.libdir.resolve() in libdirs and "-ldeepcam_core" in flags
    torch_dir = Path(torch.__file__).resolve().parent
    assert str(torch_dir / "include") in flags and f"-L{torch_dir / 'lib'}" in flags
    assert f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}" in flags
    assert f"-Wl,-rpath,{torch_dir / 'lib'}" in flags
    # libstdc++ is linked ahead of LibTorch (see torch_link_args in meson.build).
    i = flags.index("-lstdc++")
    assert flags[i - 1] == "-Wl,--push-state,--no-as-needed" and i < flags.index("-ltorch")
    # Nothing from the source or build tree.
    for f in flags:
        assert str(REPO_ROOT / "core") not in f and str(BUILD_DIR) not in f, f
    plugindir = subprocess.run(["pkg-config", "--variable=plugindir", "deepcam-plugin"], capture_output=True,
                               text=True, env=env, check=True).stdout.strip()
    assert Path(plugindir).resolve() == sdk.plugindir.resolve()


def test_example_builds_from_the_install_only(sdk, sgd_build):
    assert (sgd_build / "libdeepcam_optimizer_sgd.so").is_file()
    commands = json.loads((sgd_build / "compile_commands.json").read_text())
    assert commands
    for c in commands:
        assert str(REPO_ROOT / "core") not in c["command"] and str(BUILD_DIR) not in c["command"], c["command"]
        includes = [Path(a[2:]).resolve() for a in shlex.split(c["command"]) if a.startswith("-I/")]
        assert sdk.includedir.resolve() in includes, c["command"]


def test_example_installs_into_the_hosts_plugin_directory(tmp_path, sdk, sgd_build):
    # Staged with DESTDIR so that the shared install stays as meson installed it.
    r = subprocess.run([MESON, "install", "-C", str(sgd_build), "--no-rebuild", "--destdir", str(tmp_path)],
                       capture_output=True, text=True, env=sdk_env(sdk), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    installed = list(tmp_path.rglob("*.so"))
    assert [p.name for p in installed] == ["libdeepcam_optimizer_sgd.so"]
    assert installed[0].parent.resolve() == (tmp_path / str(sdk.plugindir.resolve()).lstrip("/")).resolve()


@pytest.mark.parametrize("params,compiles", [("kParams", True), ("nullptr", True), ("kPointer", False)],
                         ids=["array", "nullptr", "pointer"])
def test_the_plugin_macros_take_an_array_or_nullptr_and_refuse_a_pointer(tmp_path, sdk, params, compiles):
    # A pointer to the array compiled, and the macro's sizeof(PARAMS) / sizeof(PARAMS[0]) made an empty schema:
    # every key the plugin meant to declare was then an unknown key.
    source = tmp_path / "plugin.cpp"
    source.write_text(textwrap.dedent("""\
        #include "deepcam/plugin_descriptor.hpp"
        namespace {
        const deepcam::ParamSpec kParams[] = {{"k", deepcam::ParamType::Int, "1", "a key"}};
        const deepcam::ParamSpec* const kPointer = kParams;
        }
        DEEPCAM_SCHEDULER_PLUGIN("x", "1.0", "a test", PARAMS, nullptr)
        """).replace("PARAMS", params))
    env = sdk_env(sdk)
    flags = subprocess.run(["pkg-config", "--cflags", "deepcam-plugin"], capture_output=True, text=True, env=env,
                           check=True).stdout.split()
    r = subprocess.run(["c++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", *flags, str(source)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert (r.returncode == 0) == compiles, r.stderr[-3000:]
    if not compiles:
        assert "schema_of" in r.stderr, r.stderr[-3000:]


def test_describe_prints_the_sgd_parameters(sdk, sgd_build):
    r = subprocess.run([str(sdk.host), "--describe", "optimizer/sgd"], capture_output=True, text=True,
                       env=sdk_env(sdk, str(sgd_build)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(sgd_build / "libdeepcam_optimizer_sgd.so") in r.stdout
    for key, kind, default in [("lr", "float", "1e-3"), ("momentum", "float", "0.0"),
                               ("dampening", "float", "0.0"), ("weight_decay", "float", "0.0"),
                               ("nesterov", "bool", "false")]:
        assert re.search(rf"^\s+{key}\s+{kind}\s+default {re.escape(default)}\b", r.stdout, re.M), (key, r.stdout)


def train_losses(log):
    losses = {}
    for line in Path(log).read_text().splitlines():
        entry = json.loads(line[len(":::MLLOG "):])
        if entry["key"] == "train_loss":
            losses[entry["metadata"]["step_num"]] = entry["value"]
    return [losses[k] for k in sorted(losses)]


def log_values(log, prefix):
    values = {}
    for line in Path(log).read_text().splitlines():
        entry = json.loads(line[len(":::MLLOG "):])
        if entry["key"].startswith(prefix):
            values[entry["key"]] = entry["value"]
    return values


@pytest.mark.parametrize("how", ["library", "plugin_path"])
def test_installed_host_trains_with_the_outside_plugin(tmp_path, sdk, sgd_build, data, how):
    so = sgd_build / "libdeepcam_optimizer_sgd.so"
    optimizer = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-5}
    if how == "library":
        optimizer["library"] = str(so)
        env = sdk_env(sdk)
    else:
        env = sdk_env(sdk, f"{sgd_build}{os.pathsep}{sdk.plugindir}")
    # The whole training set in one batch: every step sees the same data, so
    # the loss must fall at every step.
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out", optimizer=optimizer,
                    run={"max_epochs": 4, "logging_frequency": 1, "train_batch_size": 8})
    r = subprocess.run([str(sdk.host), str(run)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1, r.stderr  # ran all epochs without reaching the target
    config = (tmp_path / "out" / "config.toml").read_text()
    assert f'library = "{so}"  # loaded' in config
    log = tmp_path / "out" / "mlperf.log"
    assert log_values(log, "opt_") == {"opt_name": "SGD", "opt_lr": 0.05, "opt_momentum": 0.9,
                                       "opt_dampening": 0.0, "opt_nesterov": True, "opt_weight_decay": 1e-5}
    losses = train_losses(log)
    assert len(losses) == 4
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0], losses


def test_the_guides_recipe_for_a_short_run_works_as_written(tmp_path, sdk, sgd_build):
    # It named the plugin with --set optimizer.name=sgd, which keeps the quickstart's other [optimizer] keys:
    # it worked for sgd alone, which happens to accept Adam's, and failed for a scheduler or a reader.
    guide = (REPO_ROOT / "docs" / "writing-plugins.md").read_text()
    recipe = guide.split("```sh\nexport PATH=/tmp/deepcam-sdk/usr/local/bin", 1)[1].split("```", 1)[0]
    recipe = ("export PATH=/tmp/deepcam-sdk/usr/local/bin" + recipe) \
        .replace("/tmp/deepcam-sdk/usr/local/bin", "SDK_BIN").replace("/tmp/", f"{tmp_path}/") \
        .replace("SDK_BIN", str(sdk.bindir)).replace("/path/to/build-sgd", str(sgd_build))
    env = {k: v for k, v in sdk_env(sdk).items() if k != "DEEPCAM_PLUGIN_PATH"}
    r = subprocess.run(["bash", "-euc", recipe], cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]  # one epoch, short of the target
    out = tmp_path / "sgd-run"
    assert f'library = "{sgd_build / "libdeepcam_optimizer_sgd.so"}"  # loaded' in (out / "config.toml").read_text()
    assert log_values(out / "mlperf.log", "opt_") == {"opt_name": "SGD", "opt_lr": 0.01, "opt_momentum": 0.0,
                                                      "opt_dampening": 0.0, "opt_nesterov": False,
                                                      "opt_weight_decay": 0.0}


def test_nesterov_without_momentum_is_refused_naming_the_file_and_key(tmp_path, sdk, sgd_build, data):
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    optimizer={"name": "sgd", "library": str(sgd_build / "libdeepcam_optimizer_sgd.so"),
                               "nesterov": True})
    r = subprocess.run([str(sdk.host), str(run)], capture_output=True, text=True, env=sdk_env(sdk), timeout=120)
    assert r.returncode != 0
    # The resolved configuration is printed first; the error is the last line.
    error = r.stderr.strip().splitlines()[-1]
    # The line that set it (the table alone, "run.toml [optimizer] nesterov", named no line).
    assert re.match(rf"deepcam-host: {re.escape(str(run))}:\d+ \[optimizer\] nesterov = true: ", error), r.stderr
    assert "momentum > 0 and dampening = 0" in error
    assert not (tmp_path / "out" / "mlperf.log").exists()


# --- the update rule against PyTorch -----------------------------------------

SHAPES = [(16, 20), (5,), (2, 2), ()]


def make_params():
    gen = torch.Generator().manual_seed(1234)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def grad(step, index):
    """Parameter 1 gets a gradient on even steps only, parameter 2 never."""
    if index == 2 or (index == 1 and step % 2 == 1):
        return None
    gen = torch.Generator().manual_seed(100 * step + index)
    return torch.randn(SHAPES[index], generator=gen) * (0.5 + index)


def python_sgd(options, steps, start=0, state=None):
    """torch.optim.SGD (single-tensor code path); parameters after each step."""
    params = make_params()
    opt = torch.optim.SGD(params, foreach=False, **options)
    history = []
    for step in range(1, start + steps + 1):
        if step == start + 1 and state is not None:
            opt = torch.optim.SGD(params, lr=0.5, foreach=False)  # every setting comes from the state
            opt.load_state_dict(state)
        for i, p in enumerate(params):
            p.grad = grad(step, i)
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt


def cpp_sgd(tmp_path, sgd_build, options, first, last, params, state=None):
    """The plugin's Sgd through sgd_steps: steps first..last from `params`."""
    grads = [[grad(step, i) for i in range(len(SHAPES))] for step in range(first, last + 1)]
    full = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, **options}
    opts = {k: (bool(v) if k == "nesterov" else float(v)) for k, v in full.items()}
    torch.save({"options": opts, "params": [p.detach() for p in params], "grads": grads, "state": state},
               tmp_path / "in.pt")
    r = subprocess.run([str(sgd_build / "sgd_steps"), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # torch::pickle_save tags dicts and lists with their C++ type through this function.
    with torch.serialization.safe_globals([torch.jit._pickle.restore_type_tag]):
        return torch.load(tmp_path / "out.pt", weights_only=True)


CASES = {
    "momentum, dampening, weight decay": {"lr": 0.01, "momentum": 0.9, "dampening": 0.25, "weight_decay": 0.1},
    "nesterov": {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-4},
    "plain": {"lr": 0.1},
}


@pytest.mark.parametrize("case", list(CASES))
def test_sgd_matches_torch_optim_sgd_bit_for_bit(tmp_path, sgd_build, case):
    options = CASES[case]
    expected, opt = python_sgd(options, 6)
    result = cpp_sgd(tmp_path, sgd_build, options, 1, 6, make_params())
    assert len(result["params"]) == 6
    for step, (ours, theirs) in enumerate(zip(result["params"], expected), start=1):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(a, b), f"step {step} parameter {i}: {a} != {b}"
    # The state_dict in PyTorch's layout: the same keys, buffers and settings.
    ours, theirs = result["state_dict"], opt.state_dict()
    assert list(ours["param_groups"][0]) == list(theirs["param_groups"][0])
    for key in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "params"):
        assert ours["param_groups"][0][key] == theirs["param_groups"][0][key], key
    assert sorted(ours["state"]) == sorted(theirs["state"])
    for i in theirs["state"]:
        assert list(ours["state"][i]) == ["momentum_buffer"]
        assert torch.equal(ours["state"][i]["momentum_buffer"], theirs["state"][i]["momentum_buffer"])


def test_sgd_state_dict_travels_both_ways_with_pytorch(tmp_path, sgd_build):
    options = {"lr": 0.02, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}
    expected, _ = python_sgd(options, 8)
    # Python's state after 4 steps continues in C++ (hyper-parameters from the state).
    _, half = python_sgd(options, 4)
    params_at_4 = expected[3]
    result = cpp_sgd(tmp_path, sgd_build, {"lr": 0.5}, 5, 8, params_at_4, state=half.state_dict())
    for a, b in zip(result["params"][-1], expected[-1]):
        assert torch.equal(a, b)
    # The C++ state after 4 steps continues in torch.optim.SGD.
    first = cpp_sgd(tmp_path, sgd_build, options, 1, 4, make_params())
    for a, b in zip(first["params"][-1], params_at_4):
        assert torch.equal(a, b)
    continued, _ = python_sgd(options, 4, start=4, state=first["state_dict"])
    for a, b in zip(continued[-1], expected[-1]):
        assert torch.equal(a, b)
