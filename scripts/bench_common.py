"""What the benchmark scripts share: writing their section of docs/benchmarks.md."""

import os
import subprocess


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
    """The short hash of the checkout's HEAD, for the record of a measurement."""
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"
