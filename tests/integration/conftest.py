"""Shared fixtures of the integration tests: where the build and the test
vectors are. DEEPCAM_BUILD_DIR points the tests at another build directory."""

import os
import signal
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def pytest_configure(config):
    # The tests send SIGINT to the programs they start and expect it to stop them, as from a terminal.
    # A test run started in the background (`.ci/run &`, nohup) inherits SIGINT ignored, and the
    # programs keep an ignored SIGINT ignored (tests of their own check that): catch it here, in pytest and
    # in each xdist worker, so that the programs these start inherit the default action (exec resets
    # a caught signal, not an ignored one).
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # scripts/test.sh runs the other tests two at a time, then these one by one.
    config.addinivalue_line("markers", "alone: bounds how many seconds something takes, so it runs with no other "
                                       "test beside it")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def build_dir() -> Path:
    return Path(os.environ.get("DEEPCAM_BUILD_DIR", REPO_ROOT / "build")).resolve()


@pytest.fixture(scope="session")
def deepcam_data(build_dir: Path) -> Path:
    exe = build_dir / "core" / "deepcam-data"
    if not exe.is_file():
        # A missing tool is a failure, not a skip: a skip would pass silently.
        pytest.fail(f"{exe} is not built; run: PATH=$PWD/.venv/bin:$PATH ninja -C {build_dir} deepcam-data")
    return exe


@pytest.fixture(scope="session")
def testdata() -> Path:
    return (REPO_ROOT / ".." / "shared" / "testdata").resolve()
