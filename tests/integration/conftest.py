"""Shared fixtures of the integration tests: where the build and the test
vectors are. DEEPCAM_BUILD_DIR points the tests at another build directory."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def pytest_configure(config):
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
