"""What the benchmark scripts share: writing their section of docs/benchmarks.md,
and running the project's tools so that a failure reads as the tool's own message."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_docs(path, heading, section_text):
    """Replaces the section that starts with the line `heading` (up to the next
    '## ' heading) or appends it; keeps the rest of the file. Written to a
    temporary name and renamed."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section_text.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + section_text.rstrip("\n").splitlines() + ([""] if end < len(lines) else [])
                        + lines[end:]).rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, path)


def commit(repo):
    """The short hash of the checkout's HEAD, for the record of a measurement.
    A copy made outside git names its commit in a file COMMIT (the reference in
    scripts/device_bundle.sh's bundle); a checkout copied without .git (to a
    GPU machine) in DEEPCAM_COMMIT, which scripts/gpu_check.sh sets."""
    recorded = Path(repo) / "COMMIT"
    if recorded.is_file():
        return recorded.read_text().strip()
    try:
        r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                           text=True)
    except OSError:  # no git (a GPU machine's image may lack it)
        r = subprocess.CompletedProcess([], 1, "", "")
    lines = r.stdout.split()
    if r.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == Path(repo).resolve():
        return lines[1][:7]
    return os.environ.get("DEEPCAM_COMMIT", "unknown") if Path(repo).resolve() == REPO else "unknown"


class ToolFailed(Exception):
    """A tool a benchmark runs exited non-zero; the message is the last line of its stderr."""


def run_tool(cmd, **kwargs):
    """subprocess.run with the output captured as text. A tool says what went wrong in its last
    line of stderr; check=True would hide that line behind a CalledProcessError traceback, so a
    non-zero exit raises ToolFailed with that line, for the script to print as its error."""
    cmd = [str(c) for c in cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if r.returncode != 0:
        lines = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise ToolFailed(f"{Path(cmd[0]).name} exited {r.returncode}: {lines[-1] if lines else 'no message'}")
    return r
