"""scripts/setup.sh, run as a copy in a temporary checkout with stand-ins on PATH: dpkg-query says
every Debian package is installed, .venv/ is a stand-in whose requirements stamp matches, and
meson and ninja only record their arguments. So the script installs nothing and builds nothing;
the test sees which meson and ninja commands it would run, and the real build/ is never touched."""

import hashlib
import os
import shutil
import subprocess

import pytest

from helpers import REPO_ROOT

RECORD = '#!/bin/sh\necho "$(basename "$0") $*" >> "$CALLS"\n'
# meson also records the linker it was told to use.
MESON_RECORD = '#!/bin/sh\necho "meson $*${CXX_LD:+ [CXX_LD=$CXX_LD]}" >> "$CALLS"\n'


@pytest.fixture
def checkout(tmp_path):
    top = tmp_path / "top"
    (top / "scripts").mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "scripts/setup.sh", top / "scripts/setup.sh")
    shutil.copy2(REPO_ROOT / "scripts/requirements.txt", top / "scripts/requirements.txt")
    venv_bin = top / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    stand_ins = {
        venv_bin / "python": RECORD,
        venv_bin / "pip": RECORD + "exit 1\n",
        venv_bin / "meson": MESON_RECORD,
        venv_bin / "ninja": RECORD,
        tmp_path / "bin" / "dpkg-query": "#!/bin/sh\nprintf 'install ok installed'\n",
        tmp_path / "bin" / "apt-get": RECORD + "exit 1\n",
        tmp_path / "bin" / "sudo": RECORD + "exit 1\n",
    }
    for path, text in stand_ins.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    sha = hashlib.sha256((top / "scripts/requirements.txt").read_bytes()).hexdigest()
    (top / ".venv" / ".requirements.sha").write_text(sha + "\n")
    return top


def run_setup(top, **env):
    """Runs the checkout's setup.sh with the stand-ins first on PATH: its result and the commands the
    stand-ins recorded."""
    calls = top.parent / "calls.log"
    calls.unlink(missing_ok=True)
    run_env = {k: v for k, v in os.environ.items() if k != "CUDA"}
    run_env.update(PATH=f"{top.parent / 'bin'}:{os.environ['PATH']}", CALLS=str(calls), **env)
    r = subprocess.run(["bash", str(top / "scripts/setup.sh")], capture_output=True, text=True, env=run_env,
                       timeout=60)
    return r, calls.read_text().splitlines() if calls.exists() else []


def setup(top, **env):
    r, calls = run_setup(top, **env)
    assert r.returncode == 0, r.stdout + r.stderr
    return calls


def configured(top):
    (top / "build").mkdir()
    (top / "build" / "build.ninja").write_text("# configured before\n")


@pytest.mark.parametrize("cuda", ["enabled", "disabled", "auto"])
def test_cuda_given_reconfigures_a_configured_build_then_builds(checkout, cuda):
    configured(checkout)
    build = checkout / "build"
    assert setup(checkout, CUDA=cuda) == [f"meson configure {build} -Dcuda={cuda}", f"ninja -C {build}"]


def test_without_cuda_a_configured_build_is_only_built(checkout):
    configured(checkout)
    assert setup(checkout) == [f"ninja -C {checkout / 'build'}"]


def test_a_fresh_checkout_is_set_up_with_cuda_as_given(checkout):
    build = checkout / "build"
    assert setup(checkout, CUDA="enabled") == [f"meson setup {build} -Dcuda=enabled --buildtype=release [CXX_LD=lld]",
                                               f"ninja -C {build}"]
    assert setup(checkout) == [f"meson setup {build} -Dcuda=auto --buildtype=release [CXX_LD=lld]",
                               f"ninja -C {build}"]


def test_python_and_debian_packages_install_at_once_and_a_failed_pip_is_shown(checkout, tmp_path):
    """pip runs while apt does (both mostly download on a fresh machine); a pip that fails ends the
    set-up with its own output and the file it installs from, writes no stamp and builds nothing."""
    stamp = checkout / ".venv" / ".requirements.sha"
    stamp.write_text("an older requirements.txt\n")
    # apt-get waits until pip has started, and fails after 10 s: run one after the other, apt fails.
    started = tmp_path / "pip-started"
    (checkout / ".venv/bin/pip").write_text(f'#!/bin/sh\necho "$(basename "$0") $*" >> "$CALLS"\ntouch {started}\n'
                                            'echo "ERROR: no matching distribution for torch" >&2\nexit 1\n')
    (tmp_path / "bin/dpkg-query").write_text("#!/bin/sh\nexit 1\n")  # nothing installed
    (tmp_path / "bin/apt-get").write_text(f'#!/bin/sh\necho "apt-get $*" >> "$CALLS"\n'
                                          f'n=0; while [ ! -e {started} ]; do sleep 0.05; n=$((n + 1)); '
                                          '[ $n -lt 200 ] || exit 1; done\n')
    if os.getuid() != 0:
        (tmp_path / "bin/sudo").write_text('#!/bin/sh\nexec "$@"\n')
    r, recorded = run_setup(checkout)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ERROR: no matching distribution for torch" in r.stderr, r.stderr
    assert "setup: installing the Python packages (scripts/requirements.txt) failed" in r.stderr, r.stderr
    assert any(c.startswith("pip install") for c in recorded) and "apt-get update -qq" in recorded, recorded
    assert not any(c.startswith(("meson", "ninja")) for c in recorded), recorded
    assert stamp.read_text() == "an older requirements.txt\n"
