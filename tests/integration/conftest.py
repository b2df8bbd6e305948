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


# The test files that take a minute or more, started first in this order. scripts/test.sh runs the
# files two at a time (pytest-xdist's --dist loadfile, --no-loadscope-reorder: in collection order),
# and a long file started last would keep one worker busy while the other has nothing left to do.
LONG_FILES_FIRST = ("test_ranks", "test_checkpoints_hardening", "test_precision", "test_package", "test_reader_inputs",
                    "test_slurm", "test_device_bundle", "test_training", "test_host_cli", "test_sdk")


def pytest_collection_modifyitems(config, items):
    first = {name: n for n, name in enumerate(LONG_FILES_FIRST)}
    # A stable sort: each file's tests keep their order.
    items.sort(key=lambda item: first.get(Path(str(item.fspath)).stem, len(first)))


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
