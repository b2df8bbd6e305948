"""deepcam-host's and deepcam-data's malloc is tcmalloc (meson.build, README "Dependencies"): in a
training run and in a conversion, every call to the C and C++ allocation functions that the dynamic
linker binds, from LibTorch, HDF5, the core library and each plugin, binds to libtcmalloc_minimal,
none to the C library's malloc."""

import re

from helpers import plugin_env, run_data, run_host, synth, write_run

ALLOCATION = {"malloc", "free", "calloc", "realloc", "posix_memalign", "aligned_alloc", "memalign",
              "_Znwm", "_Znam", "_ZdlPv", "_ZdaPv", "_ZdlPvm"}
BINDING = re.compile(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: normal symbol `([^']+)'")


def allocation_bindings(folder):
    """(library, symbol, the library it binds to) of each allocation function bound in the run."""
    found = []
    for f in folder.iterdir():
        for m in BINDING.finditer(f.read_text(errors="replace")):
            if m.group(3) in ALLOCATION:
                found.append((m.group(1).rsplit("/", 1)[-1], m.group(3), m.group(2).rsplit("/", 1)[-1]))
    return found


def binding_log_env(folder):
    """The tests' environment, with the dynamic linker writing each binding into `folder`."""
    folder.mkdir()
    return dict(plugin_env(), LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(folder / "bindings"))


def binders_all_on_tcmalloc(folder):
    """The (library, symbol) pairs bound, after checking that each binds to tcmalloc."""
    bindings = allocation_bindings(folder)
    elsewhere = sorted({b for b in bindings if not b[2].startswith("libtcmalloc_minimal.so")})
    assert not elsewhere, elsewhere
    return {(library, symbol) for library, symbol, _ in bindings}


def test_a_training_run_allocates_through_tcmalloc_in_every_library(tmp_path):
    data = synth(tmp_path / "data", train=2, validation=1)
    run = write_run(tmp_path / "run.toml", data, tmp_path / "out",
                    run={"train_batch_size": 2, "threads": 1}, optimizer={"name": "lamb"})
    debug = tmp_path / "ld"
    env = binding_log_env(debug)
    r = run_host(run, "--benchmark", 1, env=env)
    assert r.returncode == 0, r.stderr
    binders = binders_all_on_tcmalloc(debug)
    # The tensors' memory (c10's CPU allocator), the core library's and each plugin's own.
    assert ("libc10.so", "posix_memalign") in binders, sorted(binders)
    for library in ("libdeepcam_core.so", "libtorch_cpu.so", "libdeepcam_reader_hdf5.so",
                    "libdeepcam_model_deeplabv3plus.so", "libdeepcam_optimizer_lamb.so"):
        assert any(b[0] == library for b in binders), (library, sorted(binders))


def test_a_conversion_and_its_verification_allocate_through_tcmalloc(tmp_path):
    data = synth(tmp_path / "data", train=2, validation=1)
    debug = tmp_path / "ld"
    env = binding_log_env(debug)
    for args in (["convert", data, tmp_path / "npy"], ["verify", tmp_path / "npy"]):
        r = run_data(*args, env=env)
        assert r.returncode == 0, r.stderr
    binders = binders_all_on_tcmalloc(debug)
    # HDF5's buffers (it reads the samples), the core library's and the program's own.
    for library in ("libhdf5", "libdeepcam_core.so", "deepcam-data"):
        assert any(b[0].startswith(library) for b in binders), (library, sorted(binders))
