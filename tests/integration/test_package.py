"""deepcam-data package: a results package made from quickstart runs is
accepted by the official package checker and result summarizer (open
division, hpc usage, ruleset 3.0.0), its score is the summarizer's, and a
closed-division package (runs of 2 epochs) fails only on the data-set-size
and accuracy rules."""

import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import DATA_TOOL, REPO_ROOT, read_events, run_host, synth

RULESET = "3.0.0"
RUNS = 5  # what the checker wants for deepcam, strong scaling


def quickstart(data, out, seed, *sets):
    # One thread each: two such runs at a time train faster on two cores than one run on both.
    sets = ("run.threads=1", "reader.threads=1", *sets)
    r = run_host(REPO_ROOT / "configs/quickstart.toml", "--quiet", "--set", f"data.root={data}", "--set",
                 f"run.output_dir={out}", "--set", f"run.seed={seed}", *[a for s in sets for a in ("--set", s)])
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return out


def converged(run_dir):
    stop = [e for e in read_events(run_dir / "mlperf.log") if e["key"] == "run_stop"]
    return bool(stop) and stop[0]["metadata"]["status"] == "success"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("package-runs")
    # The quickstart's model and data set at 64 x 96 pixels (its 96 x 144 costs 2.25 times as much a
    # step), trained at twice its learning rate: most seeds reach the target in 7 to 10 epochs.
    data = synth(root / "data", train=64, validation=16, height=64, width=96, seed=11)

    def open_run(seed):
        return quickstart(data, root / f"open-{seed}", seed, "run.max_epochs=10", "optimizer.lr=0.004")

    with ThreadPoolExecutor(max_workers=2) as pool:
        # Five quickstart runs that reach the target (a seed that has not in 10 epochs is replaced by
        # the next one), beside the other runs.
        first = [pool.submit(open_run, seed) for seed in range(1, RUNS + 1)]
        # closed division, 2 epochs each: short of the data set and of the target
        closed = [pool.submit(quickstart, data, root / f"closed-{s}", s, "mlperf.division=closed", "run.max_epochs=2")
                  for s in range(31, 31 + RUNS)]
        # one run that stops before the target: run_stop status "aborted"
        short = pool.submit(quickstart, data, root / "short", 41, "run.max_epochs=1")
        open_runs = [d for d in (f.result() for f in first) if converged(d)]
        seed = RUNS + 1
        while len(open_runs) < RUNS and seed <= 3 * RUNS:
            seeds = range(seed, min(seed + RUNS - len(open_runs), 3 * RUNS + 1))
            open_runs += [d for d in pool.map(open_run, seeds) if converged(d)]
            seed = seeds[-1] + 1
        assert len(open_runs) >= RUNS, "the quickstart did not reach its target with most seeds"
        return {"open": open_runs[:RUNS], "closed": [f.result() for f in closed], "short": short.result()}


def package(run_dirs, out, system="cpu2-quickstart", *extra, preexec_fn=None):
    return subprocess.run([str(DATA_TOOL), "package", *map(str, run_dirs), "--system", system, "--out", str(out),
                           *map(str, extra)], capture_output=True, text=True, timeout=120, preexec_fn=preexec_fn)


def package_checker(folder):
    r = subprocess.run([sys.executable, "-m", "mlperf_logging.package_checker", str(folder), "hpc", RULESET,
                        "--log_output", str(folder.parent / f"{folder.name}-checker.log")],
                       capture_output=True, text=True, timeout=600, cwd=folder.parent)
    return r.stdout + r.stderr


def summarize(folder):
    csv_path = folder.parent / f"{folder.name}-summary.csv"
    r = subprocess.run([sys.executable, "-m", "mlperf_logging.result_summarizer", str(folder), "hpc", RULESET,
                        "--csv", str(csv_path)], capture_output=True, text=True, timeout=600, cwd=folder.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    return rows, r.stdout + r.stderr


def olympic(log_dirs):
    """The time to train of each run in minutes and their olympic mean, from the logs. A run counts as the
    checker passes it: an eval_accuracy in [0.82, 1] logged, whatever run_stop's status (open division)."""
    minutes, dropped = [], 0
    for d in log_dirs:
        events = read_events(Path(d) / "mlperf.log")
        start = next(e["time_ms"] for e in events if e["key"] == "run_start")
        stop = next(e for e in events if e["key"] == "run_stop")
        if not any(0.82 <= e["value"] <= 1 for e in events if e["key"] == "eval_accuracy"):
            dropped += 1
            continue
        minutes.append((stop["time_ms"] - start) / 60000)
    minutes.sort()
    kept = minutes[1:len(minutes) - (1 - dropped)]
    return sum(kept) / len(kept)


def test_open_package_is_accepted_and_scored_as_the_summarizer_does(runs, tmp_path):
    out = tmp_path / "pkg"
    r = package(runs["open"], out)
    assert r.returncode == 0, r.stdout + r.stderr
    results = out / "results" / "cpu2-quickstart" / "strong" / "deepcam"
    assert sorted(p.name for p in results.iterdir()) == [f"result_{n}.txt" for n in range(RUNS)]
    for n, d in enumerate(runs["open"]):
        assert (results / f"result_{n}.txt").read_bytes() == (d / "mlperf.log").read_bytes()
        run_file = out / "benchmarks/deepcam/implementations/deepcam-host/run_files/cpu2-quickstart" / f"result_{n}.toml"
        assert run_file.read_bytes() == (d / "config.toml").read_bytes()
    desc = json.loads((out / "systems" / "cpu2-quickstart.json").read_text())
    assert desc["division"] == "open" and desc["submitter"] == "deepcam-host" and desc["number_of_nodes"] == "1"
    assert desc["system_name"] == "cpu2-quickstart"

    text = package_checker(out)
    assert "PACKAGE CHECKER FOUND NO ERRORS" in text, text
    assert not [line for line in text.splitlines() if line.startswith(("ERROR", "WARNING"))], text

    rows, text = summarize(out)
    assert len(rows) == 1 and rows[0]["system"] == "cpu2-quickstart", text
    summarizer_score = float(rows[0]["deepcam"])
    ours = json.loads((out / "score.json").read_text())["score_minutes"]
    assert ours == pytest.approx(summarizer_score, rel=1e-12)
    assert ours == pytest.approx(olympic(runs["open"]), rel=1e-12)
    printed = re.search(r"score: ([0-9.]+) minutes", r.stdout)
    assert printed and float(printed.group(1)) == pytest.approx(ours, abs=1e-4), r.stdout


def test_a_run_that_did_not_converge_is_dropped_as_the_summarizer_drops_it(runs, tmp_path):
    dirs = runs["open"][:4] + [runs["short"]]
    out = tmp_path / "pkg"
    r = package(dirs, out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "run_stop status aborted" in r.stdout
    rows, text = summarize(out)
    ours = json.loads((out / "score.json").read_text())
    assert ours["dropped_runs"] == 1
    assert ours["score_minutes"] == pytest.approx(float(rows[0]["deepcam"]), rel=1e-12), text
    assert ours["score_minutes"] == pytest.approx(olympic(dirs), rel=1e-12)


def edited_copy(run_dir, to, pattern, replacement):
    """A copy of a run whose MLPerf log has `pattern` replaced (at least once)."""
    shutil.copytree(run_dir, to)
    log = to / "mlperf.log"
    text, n = re.subn(pattern, replacement, log.read_text())
    assert n > 0, pattern
    log.write_text(text)
    return to


def reseeded_copy(run_dir, to, seed):
    """A copy of a run as another run of its settings logs it: with a seed of its own (a copy with its
    original's is refused)."""
    return edited_copy(run_dir, to, r'("key": "seed", "value": )[0-9]+', rf"\g<1>{seed}")


def test_a_run_stopped_at_a_lower_target_of_its_own_is_not_counted(runs, tmp_path):
    """run_stop says success, but no eval_accuracy reached the benchmark's 0.82 (a run with target_iou
    below it): the checker fails it and the summarizer drops it, and so does the package."""
    low = edited_copy(runs["open"][4], tmp_path / "low-target", r'("key": "eval_accuracy", "value": )[0-9.e-]+',
                      r"\g<1>0.5")
    dirs = runs["open"][:4] + [low]
    out = tmp_path / "pkg"
    r = package(dirs, out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("run_stop status success; its best eval_accuracy (0.5000) is below the benchmark's target 0.82: "
            "not counted") in r.stdout, r.stdout
    rows, text = summarize(out)
    ours = json.loads((out / "score.json").read_text())
    assert ours["dropped_runs"] == 1 and [run["counted"] for run in ours["runs"]] == [True] * 4 + [False]
    assert ours["score_minutes"] == pytest.approx(float(rows[0]["deepcam"]), rel=1e-12), text


def test_a_run_that_went_on_past_the_target_counts_as_the_summarizer_counts_it(runs, tmp_path):
    """A run with a target_iou of its own above the benchmark's, aborted after its eval_accuracy reached 0.82:
    the checker passes its log, and the summarizer counts it with all its time. The package dropped it."""
    past = edited_copy(runs["open"][4], tmp_path / "past-target", r'("key": "run_stop".*"status": )"success"',
                       r'\g<1>"aborted"')
    out = tmp_path / "pkg"
    r = package(runs["open"][:4] + [past], out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("run_stop status aborted, after its eval_accuracy reached the benchmark's target 0.82 (the checker "
            "passes it, and the summarizer counts it)") in r.stdout, r.stdout
    rows, text = summarize(out)
    ours = json.loads((out / "score.json").read_text())
    assert ours["dropped_runs"] == 0 and [run["counted"] for run in ours["runs"]] == [True] * 5
    assert ours["score_minutes"] == pytest.approx(float(rows[0]["deepcam"]), rel=1e-12), text
    assert ours["score_minutes"] == pytest.approx(olympic(runs["open"][:4] + [past]), rel=1e-12)


def test_closed_division_runs_short_of_the_full_data_set_are_not_counted(runs, tmp_path):
    """Runs that reached the target on a part of the data set, logged as closed: the checker fails their
    sample counts, so the summarizer gives no score. The package printed one and exited 0."""
    closed = [edited_copy(d, tmp_path / f"closed-{n}", r'("key": "submission_division", "value": )"open"',
                          r'\g<1>"closed"')
              for n, d in enumerate(runs["open"])]
    out = tmp_path / "pkg"
    r = package(closed, out)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.count("run_stop status success; a closed-division run on 64 training and 16 validation samples, "
                          "where the checker wants the full data set's 121266 and 15158: not counted") == RUNS, r.stdout
    assert "deepcam-data: package: no score: 5 of 5 runs did not converge" in r.stderr, r.stderr
    assert json.loads((out / "score.json").read_text())["score_minutes"] is None
    rows, text = summarize(out)
    assert [row["deepcam"] for row in rows] == [""], text
    assert text.count("Compliance check failed") == RUNS, text


def test_a_log_named_by_the_runs_log_file_is_found_through_its_config(runs, tmp_path):
    # [mlperf] log_file = "custom.log": the run was refused ("no MLPerf log there").
    renamed = tmp_path / "renamed"
    shutil.copytree(runs["open"][4], renamed)
    (renamed / "mlperf.log").rename(renamed / "custom.log")
    config = renamed / "config.toml"
    text, n = re.subn(r'^log_file = "mlperf\.log"', 'log_file = "custom.log"', config.read_text(), flags=re.M)
    assert n == 1, config.read_text()
    config.write_text(text)
    out = tmp_path / "pkg"
    r = package(runs["open"][:4] + [renamed], out)
    assert r.returncode == 0, r.stdout + r.stderr
    result = out / "results" / "cpu2-quickstart" / "strong" / "deepcam" / "result_4.txt"
    assert result.read_text() == (renamed / "custom.log").read_text()
    config.write_text(text.replace('log_file = "custom.log"', 'log_file = "other.log"'))
    r = package(runs["open"][:4] + [renamed], tmp_path / "pkg2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{renamed}: no MLPerf log there (other.log, as its config.toml's [mlperf] log_file names it)" in r.stderr


def test_runs_of_another_submission_status_are_refused(runs, tmp_path):
    other = edited_copy(runs["open"][4], tmp_path / "onprem", r'("key": "submission_status", "value": )"research"',
                        r'\g<1>"onprem"')
    r = package(runs["open"][:4] + [other], tmp_path / "pkg")
    assert r.returncode == 1 and f"{other / 'mlperf.log'}: submission_status is 'onprem' but" in r.stderr, r.stderr
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--throughput", other)
    assert r.returncode == 1, r.stderr
    assert f"{other / 'mlperf.log'}: submission_status is 'onprem' but the time-to-solution run" in r.stderr, r.stderr
    assert not (tmp_path / "pkg").exists()


def test_runs_the_package_checker_would_refuse_as_a_set_are_refused(runs, tmp_path):
    """Closed packages the package checker refuses were written: a copied run (or two runs with one seed: "Seed
    checker failed"), runs of two batch sizes (its RCP check ended in a KeyError). It checks neither in the open
    division. A time-to-solution run given as a throughput instance too is refused in either."""
    closed = runs["closed"]
    copy = tmp_path / "copy"
    shutil.copytree(closed[0], copy)
    r = package(closed[:4] + [copy], tmp_path / "pkg")
    assert r.returncode == 1 and f"{copy / 'mlperf.log'}: seed " in r.stderr, r.stderr
    assert "the package checker wants each closed run's own seed" in r.stderr, r.stderr
    other = edited_copy(closed[4], tmp_path / "batch", r'("key": "global_batch_size", "value": )[0-9]+', r"\g<1>8")
    r = package(closed[:4] + [other], tmp_path / "pkg")
    assert r.returncode == 1, r.stderr
    assert (f"{other / 'mlperf.log'}: global_batch_size is '8' but {closed[0] / 'mlperf.log'} has '4': the "
            "package checker wants one batch size") in r.stderr, r.stderr
    assert not (tmp_path / "pkg").exists()
    copy = tmp_path / "open-copy"
    shutil.copytree(runs["open"][0], copy)
    r = package(runs["open"][:4] + [copy], tmp_path / "open-pkg")
    assert r.returncode == 0, r.stderr
    instances = [reseeded_copy(d, tmp_path / f"instance-{n}", 900 + n) for n, d in enumerate(runs["open"][:4])]
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--throughput", *instances, copy)
    assert r.returncode == 1, r.stderr
    assert (f"{copy / 'mlperf.log'}: the run of {runs['open'][0] / 'mlperf.log'} (its seed and run_start), given "
            "as a throughput instance too") in r.stderr, r.stderr
    assert not (tmp_path / "pkg").exists()


def test_a_closed_run_that_breaks_the_closed_hyper_parameters_is_not_counted(runs, tmp_path):
    """The full data set's counts, logged as closed: four runs count, and one whose log breaks a closed rule
    (Adam's eps) is left out, as the summarizer leaves it out. The package counted it."""
    full = [r'("key": "submission_division", "value": )"open"', r'\g<1>"closed"',
            r'("key": "train_samples", "value": )[0-9]+', r"\g<1>121266",
            r'("key": "eval_samples", "value": )[0-9]+', r"\g<1>15158"]
    closed = []
    for n, d in enumerate(runs["open"]):
        closed.append(d)
        for pattern, replacement in zip(full[::2], full[1::2]):
            closed[-1] = edited_copy(closed[-1], tmp_path / f"closed-{n}-{len(pattern)}", pattern, replacement)
    closed[4] = edited_copy(closed[4], tmp_path / "eps", r'("key": "opt_eps", "value": )[0-9.e-]+', r"\g<1>1e-08")
    out = tmp_path / "pkg"
    r = package(closed, out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("a closed-division run whose log breaks the checker's closed rules: opt_eps 1e-08 "
                          "(closed: 1e-06): not counted") == 1, r.stdout
    rows, text = summarize(out)
    assert text.count("Compliance check failed") == 1, text
    assert json.loads((out / "score.json").read_text())["score_minutes"] == pytest.approx(float(rows[0]["deepcam"]),
                                                                                          rel=1e-12), text


def test_two_runs_that_did_not_converge_leave_no_score(runs, tmp_path):
    # A second folder with the same record: the same folder twice is refused (test_bad_input_is_named).
    again = reseeded_copy(runs["short"], tmp_path / "short-again", 999)
    r = package(runs["open"][:3] + [runs["short"], again], tmp_path / "pkg")
    assert r.returncode == 1, r.stdout + r.stderr
    # It said the olympic mean "needs at least 0 converged runs" (-2 with five such runs).
    assert ("no score: 2 of 5 runs did not converge (the benchmark's target IoU 0.82 not reached, or a "
            "closed-division run short of the full data set or of its rules); the olympic mean allows at most 1 such "
            "run\n") \
        in r.stderr, r.stderr
    r = package(runs["open"][:1] + [runs["short"]], tmp_path / "pkg2")
    assert r.returncode == 1 and ("of its rules); the olympic mean needs at least 2 converged runs beside 1 such\n"
                                  in r.stderr), r.stderr
    assert json.loads((tmp_path / "pkg" / "score.json").read_text())["score_minutes"] is None


def test_closed_package_fails_only_on_data_set_size_and_accuracy(runs, tmp_path):
    out = tmp_path / "pkg"
    r = package(runs["closed"], out)
    assert r.returncode == 1, r.stdout + r.stderr  # no run converged: no score
    assert (out / "results" / "cpu2-quickstart" / "strong" / "deepcam" / "result_4.txt").is_file()
    text = package_checker(out)
    assert "PACKAGE CHECKER FOUND ERRORS" in text, text
    # Each of the 5 results fails the closed division's data set size (121266
    # training and 15158 validation samples) and its accuracy rule (IoU 0.82
    # reached), nothing else.
    checks = re.findall(r"CHECK for '(\w+)' failed", text) + re.findall(r"Failed checks for (\w+)", text)
    assert sorted(set(checks)) == ["eval_accuracy", "eval_samples", "train_samples"], text
    assert checks.count("train_samples") == RUNS and checks.count("eval_accuracy") == RUNS, text
    # What the package checker then says: the results do not comply, and the
    # convergence (RCP) check of the closed division, an accuracy rule too.
    errors = [line for line in text.splitlines() if line.startswith("ERROR")]
    other = [line for line in errors if line.strip() not in ("ERROR - FAILED",)
             and "files do not comply" not in line and "RCP" not in line]
    assert other == [], text
    assert "System description checker failed" not in text, text


def test_bad_input_is_named(runs, tmp_path):
    r = package([tmp_path / "nowhere"], tmp_path / "pkg")
    assert r.returncode == 1 and "nowhere: not a directory" in r.stderr, r.stderr
    r = package([runs["open"][0], runs["closed"][0]], tmp_path / "pkg")
    assert r.returncode == 1 and "submission_division is 'closed'" in r.stderr, r.stderr
    assert not (tmp_path / "pkg").exists()
    (tmp_path / "taken").mkdir()
    r = package(runs["open"], tmp_path / "taken")
    assert r.returncode == 1 and "exists already" in r.stderr, r.stderr
    r = package(runs["open"], tmp_path / "pkg", "bad/name")
    assert r.returncode == 2 and "--system 'bad/name'" in r.stderr, r.stderr
    # '..' was told to use letters, digits and _ - . +, which it does.
    r = package(runs["open"], tmp_path / "pkg", "..")
    assert r.returncode == 2 and "--system '..': a folder's name, not a system's" in r.stderr, r.stderr
    empty = tmp_path / "empty-run"
    empty.mkdir()
    r = package([empty], tmp_path / "pkg")
    assert r.returncode == 1 and "empty-run: no config.toml there (the resolved run file" in r.stderr, r.stderr
    desc = tmp_path / "desc.json"
    desc.write_text('{"accelerator_model_name": ["a"]}')
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--system-desc", desc)
    assert r.returncode == 1 and "\"accelerator_model_name\" must be a string or a number" in r.stderr, r.stderr
    assert not (tmp_path / "pkg").exists() and not list(tmp_path.glob(".pkg.tmp*"))
    # The same run twice, through a link: refused, not scored as two runs.
    link = tmp_path / "same-run"
    link.symlink_to(runs["open"][0])
    r = package([runs["open"][0], link, *runs["open"][1:]], tmp_path / "pkg")
    assert r.returncode == 1 and f"{link}: the same run as {runs['open'][0]}" in r.stderr, r.stderr
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--out", tmp_path / "other")
    assert r.returncode == 2 and "--out is given twice" in r.stderr, r.stderr
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--system-desc", tmp_path)
    assert r.returncode == 1 and f"--system-desc {tmp_path}: {tmp_path}: a folder, not a file" in r.stderr, r.stderr
    assert not (tmp_path / "pkg").exists() and not (tmp_path / "other").exists()
    # /dev/zero was read until memory ran out, and a FIFO's open waited for a writer, deaf to SIGTERM;
    # an empty --system-desc packaged with no description, as if it was not given.
    fifo = tmp_path / "desc.fifo"
    os.mkfifo(fifo)
    for odd in ("/dev/zero", fifo):
        r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--system-desc", odd)
        assert r.returncode == 1, r.stderr
        assert f"--system-desc {odd}: {odd}: not a regular file (a device, a pipe or a socket)" in r.stderr, r.stderr
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--system-desc=")
    assert r.returncode == 2 and "package: --system-desc is empty; give its value" in r.stderr, r.stderr
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--system-desc", "")
    assert r.returncode == 2 and "package: argument" in r.stderr and "(after --system-desc) is empty" in r.stderr, \
        r.stderr
    assert not (tmp_path / "pkg").exists()
    # JSON nested a hundred thousand deep: an error naming the file, not a stack overflow.
    deep = "[" * 100000 + "]" * 100000
    desc.write_text(deep)
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--system-desc", desc)
    assert r.returncode == 1 and f"--system-desc {desc}: arrays and objects nest deeper than 256 levels" in r.stderr, \
        r.stderr
    run = tmp_path / "deep-run"
    shutil.copytree(runs["open"][0], run)
    with open(run / "mlperf.log", "a") as log:
        log.write(":::MLLOG " + deep + "\n")
    r = package([run], tmp_path / "pkg")
    assert r.returncode == 1 and f"{run / 'mlperf.log'}:" in r.stderr and "nest deeper than 256" in r.stderr, r.stderr
    assert not (tmp_path / "pkg").exists()


def test_a_full_disk_is_named_and_leaves_no_package(runs, tmp_path):
    """RLIMIT_FSIZE (ulimit -f) stands in for a full disk. The tool used to die of SIGXFSZ, leaving its
    temporary folder, and a real full disk was reported as std::filesystem's "Input/output error"."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))  # an MLPerf log here is over 20 KB

    r = package(runs["open"], tmp_path / "pkg", preexec_fn=limit_file_size)
    assert r.returncode == 1, (r.returncode, r.stderr)
    # Named as the package would hold it, not in the hidden folder it was written in, with the cause.
    target = tmp_path / "pkg" / "results" / "cpu2-quickstart" / "strong" / "deepcam" / "result_0.txt"
    assert re.fullmatch(re.escape(f"deepcam-data: {target}: cannot write: File too large (the file would exceed "
                                  "the file-size limit, ulimit -f, ") + r".*\n", r.stderr), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_system_desc_fields_replace_the_generated_ones(runs, tmp_path):
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({"host_storage_type": "NVMe", "accelerator_model_name": "none", "cooling": "air"}))
    out = tmp_path / "pkg"
    r = package(runs["open"], out, "cpu2-quickstart", "--system-desc", desc)
    assert r.returncode == 0, r.stderr
    got = json.loads((out / "systems" / "cpu2-quickstart.json").read_text())
    assert got["host_storage_type"] == "NVMe" and got["cooling"] == "air"


@pytest.mark.parametrize("field, value, logged", [
    ("status", "available", "research"),
    ("accelerators_per_node", "8", "0"),
    ("accelerators_per_node", 8, "0"),
    ("number_of_nodes", "0", "1"),
    ("number_of_nodes", "1.5", "1"),
])
def test_system_desc_fields_the_logs_fix_are_refused_when_they_differ(runs, tmp_path, field, value, logged):
    # status and the accelerator count were replaced without a word, and the summarizer published them.
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({field: value}))
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--system-desc", desc)
    assert r.returncode == 1, r.stderr
    assert f'--system-desc {desc}: {field} is "{value}" but the logs say "{logged}"' in r.stderr, r.stderr
    assert not (tmp_path / "pkg").exists()


def test_system_desc_may_describe_more_nodes_than_the_runs_used(runs, tmp_path):
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({"number_of_nodes": "4", "accelerators_per_node": "0", "status": "research"}))
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--system-desc", desc)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "pkg" / "systems" / "cpu2-quickstart.json").read_text())["number_of_nodes"] == "4"


def summarized_throughput(folder):
    """The result summarizer's weak-scaling (throughput) row: the summarizer appends its table to the CSV
    after the strong-scaling one, under a header of its own."""
    csv_path = folder.parent / f"{folder.name}-summary.csv"
    r = subprocess.run([sys.executable, "-m", "mlperf_logging.result_summarizer", str(folder), "hpc", RULESET,
                        "--csv", str(csv_path)], capture_output=True, text=True, timeout=600, cwd=folder.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = csv_path.read_text().splitlines()
    header = next((k for k, line in enumerate(lines) if "time_to_train_all" in line), None)
    assert header is not None, r.stdout + r.stderr + "\n".join(lines)
    return list(csv.DictReader(lines[header:])), r.stdout + r.stderr


def test_throughput_package_is_accepted_and_scored_as_the_summarizer_does(runs, tmp_path):
    """The instances of a throughput (weak scaling) measurement go under weak/ beside the time-to-solution
    runs; the score is the summarizer's: the instances, their scale and the first run_start to the last
    run_stop. The five converged quickstart runs trained two at a time, as instances do."""
    tts = [reseeded_copy(d, tmp_path / f"tts-{n}", 900 + n) for n, d in enumerate(runs["open"])]
    out = tmp_path / "pkg"
    r = package(tts, out, "cpu2-quickstart", "--throughput", *runs["open"])
    assert r.returncode == 0, r.stdout + r.stderr
    weak = out / "results" / "cpu2-quickstart" / "weak" / "deepcam"
    assert sorted(p.name for p in weak.iterdir()) == [f"result_{n}.txt" for n in range(RUNS)]
    for n, d in enumerate(runs["open"]):
        assert (weak / f"result_{n}.txt").read_bytes() == (d / "mlperf.log").read_bytes()
        run_file = (out / "benchmarks/deepcam/implementations/deepcam-host/run_files/cpu2-quickstart/weak" /
                    f"result_{n}.toml")
        assert run_file.read_bytes() == (d / "config.toml").read_bytes()

    text = package_checker(out)
    assert "PACKAGE CHECKER FOUND NO ERRORS" in text, text
    assert not [line for line in text.splitlines() if line.startswith(("ERROR", "WARNING"))], text

    rows, text = summarized_throughput(out)
    assert len(rows) == 1 and rows[0]["system"] == "cpu2-quickstart", text
    starts, stops = [], []
    for d in runs["open"]:
        events = read_events(d / "mlperf.log")
        starts.append(next(e["time_ms"] for e in events if e["key"] == "run_start"))
        stops.append(next(e["time_ms"] for e in events if e["key"] == "run_stop"))
    expected = (max(stops) - min(starts)) / 60000
    ours = json.loads((out / "score.json").read_text())["throughput"]
    assert ours["time_to_train_all_minutes"] == pytest.approx(float(rows[0]["deepcam:time_to_train_all"]),
                                                               rel=1e-12), text
    assert ours["time_to_train_all_minutes"] == pytest.approx(expected, rel=1e-12)
    assert ours["number_of_models"] == RUNS == float(rows[0]["deepcam:number_of_models"])
    assert ours["instance_scale"] == 1 == float(rows[0]["deepcam:instance_scale"])
    # Counted again from the logs: the instances running at each run_start (one ending as another begins
    # is not two at once). Two at a time on the fixture's pool; one at a time would be 1.
    at_once = max(sum(start <= t < stop for start, stop in zip(starts, stops)) for t in starts)
    assert ours["most_instances_at_once"] == at_once == 2
    printed = re.search(r"throughput: 5 models of instance scale 1 \(at most 2 at once\) in ([0-9.]+) minutes",
                        r.stdout)
    assert printed and float(printed.group(1)) == pytest.approx(expected, abs=1e-4), r.stdout
    # The system description counts the time-to-solution runs' one node; two instances at once used two.
    assert "the throughput instances used up to 2 x 1 at once" in r.stdout, r.stdout


def test_throughput_instances_are_refused_when_the_rules_leave_them_out(runs, tmp_path):
    def refused(instances, needle, code=1):
        r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--throughput", *instances)
        assert r.returncode == code and needle in r.stderr, r.stderr
        assert not (tmp_path / "pkg").exists() and not list(tmp_path.glob(".pkg.tmp*"))

    copies = []
    for n, d in enumerate(runs["open"]):
        copies.append(tmp_path / f"instance-{n}")
        shutil.copytree(d, copies[-1])
    # An instance that did not reach the target.
    refused(copies[:4] + [runs["short"]], f"{runs['short'] / 'mlperf.log'}: run_stop status aborted; its best "
                                           "eval_accuracy (")
    # An instance that ended in success at a lower target of its own.
    low = edited_copy(runs["open"][3], tmp_path / "low-target", r'("key": "eval_accuracy", "value": )[0-9.e-]+',
                      r"\g<1>0.5")
    refused(copies[:3] + [low], f"{low / 'mlperf.log'}: run_stop status success; its best eval_accuracy "
                                "(0.5000) is below the benchmark's target 0.82: every throughput instance")
    # Two instances with one seed (a copy of a run).
    again = tmp_path / "again"
    shutil.copytree(copies[0], again)
    refused(copies + [again], f"{again / 'mlperf.log'}: seed ")
    # One instance at another scale.
    log = copies[4] / "mlperf.log"
    log.write_text(log.read_text().replace('"key": "number_of_nodes", "value": 1,',
                                           '"key": "number_of_nodes", "value": 2,'))
    refused(copies, f"{log}: instance scale 2 (number_of_nodes x accelerators_per_node) but "
                    f"{copies[0] / 'mlperf.log'} has 1")
    # The same run as a time-to-solution run and as an instance.
    refused([runs["open"][0]], f"{runs['open'][0]}: the same run as {runs['open'][0]}")
    # Instances of another division.
    refused(runs["closed"][:1], "submission_division is 'closed' but the time-to-solution run")
    # Usage: instances alone, none after --throughput, --throughput twice or with a value.
    r = package([], tmp_path / "pkg", "cpu2-quickstart", "--throughput", *copies[:4])
    assert r.returncode == 2 and "only beside a time-to-solution score" in r.stderr, r.stderr
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--throughput")
    assert r.returncode == 2 and "give the output folders of the instances after it" in r.stderr, r.stderr
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--throughput", copies[0], "--throughput",
                copies[1])
    assert r.returncode == 2 and "--throughput is given twice" in r.stderr, r.stderr
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", f"--throughput={copies[0]}")
    assert r.returncode == 2 and "--throughput takes no value" in r.stderr, r.stderr


def test_fewer_than_five_throughput_instances_leave_no_throughput_score(runs, tmp_path):
    copies = [reseeded_copy(d, tmp_path / f"instance-{n}", 900 + n) for n, d in enumerate(runs["open"][:4])]
    r = package(runs["open"], tmp_path / "pkg", "cpu2-quickstart", "--throughput", *copies)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "deepcam-data: package: no throughput score: 4 instances; the rules want at least 5 for deepcam" in r.stderr
    score = json.loads((tmp_path / "pkg" / "score.json").read_text())
    assert score["score_minutes"] is not None and score["throughput"]["time_to_train_all_minutes"] is None
    assert score["throughput"]["number_of_models"] == 4


# ---------------------------------------------------------------------------
# Inputs package must refuse, on run folders made without training: the lines
# of an MLPerf log package reads, as deepcam-host writes them (json.dumps).

def fake_run(folder, start_ms, minutes, seed):
    """A finished run's folder: its mlperf.log (run_start at `start_ms`, run_stop `minutes` later, success at
    IoU 0.85) and its config.toml. Returns the folder."""
    folder.mkdir(parents=True)
    stop_ms = start_ms + round(minutes * 60000)
    events = [(start_ms, "submission_benchmark", "deepcam", {}), (start_ms, "submission_division", "open", {}),
              (start_ms, "submission_org", "x", {}), (start_ms, "submission_status", "research", {}),
              (start_ms, "submission_platform", "p", {}), (start_ms, "number_of_nodes", 1, {}),
              (start_ms, "accelerators_per_node", 0, {}), (start_ms, "seed", seed, {}),
              (start_ms, "run_start", None, {}), (start_ms, "epoch_start", None, {"epoch_num": 1, "step_num": 0}),
              (stop_ms - 1, "eval_accuracy", 0.85, {"epoch_num": 1}),
              (stop_ms, "run_stop", None, {"status": "success"})]
    (folder / "mlperf.log").write_text("".join(
        ":::MLLOG " + json.dumps({"namespace": "", "time_ms": t, "event_type": "POINT", "key": key, "value": value,
                                  "metadata": meta}) + "\n" for t, key, value, meta in events))
    (folder / "config.toml").write_text("[run]\n")
    return folder


@pytest.fixture
def fake_runs(tmp_path):
    return [fake_run(tmp_path / f"run-{n}", 1_000_000 + n, n, seed=n) for n in range(1, RUNS + 1)]


def replace_in_log(run_dir, pattern, replacement):
    """Edits the run's mlperf.log; returns the number of the (first) line changed."""
    log = run_dir / "mlperf.log"
    lines = log.read_text().splitlines(keepends=True)
    changed = [n for n, line in enumerate(lines) if re.search(pattern, line)]
    assert changed, pattern
    lines[changed[0]] = re.sub(pattern, replacement, lines[changed[0]])
    log.write_text("".join(lines))
    return changed[0] + 1


@pytest.mark.parametrize("key, pattern, replacement, cause", [
    # run_stop 10 minutes before run_start: a time to train below zero, scored as -10 minutes
    ("run_stop", r'"time_ms": \d+', '"time_ms": 400000', "run_stop's time_ms (400000.0) is before run_start's"),
    # NaN and an overflowing number: a score of NaN or inf, written into score.json as no JSON holds it
    ("run_start", r'"time_ms": \d+', '"time_ms": NaN', '"time_ms" is NaN, not a finite number of milliseconds'),
    ("run_stop", r'"time_ms": \d+', '"time_ms": 1e999', '"time_ms" is Infinity, not a finite number of milliseconds'),
])
def test_a_time_that_is_no_time_to_train_is_refused_naming_the_line(fake_runs, tmp_path, key, pattern, replacement,
                                                                   cause):
    line = replace_in_log(fake_runs[1], pattern + rf'(?=, "event_type": "POINT", "key": "{key}")', replacement)
    r = package(fake_runs, tmp_path / "pkg")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"deepcam-data: {fake_runs[1] / 'mlperf.log'}:{line}: {cause}" in r.stderr, r.stderr
    assert not (tmp_path / "pkg").exists() and not list(tmp_path.glob(".pkg.tmp*"))


def test_a_resumed_runs_log_is_refused_naming_its_first_epoch(fake_runs, tmp_path):
    """A resumed run's log begins at the epoch it resumes (README, Checkpoints): its run_start to run_stop
    left out the epochs before, and it was scored as a whole run."""
    line = replace_in_log(fake_runs[2], r'"epoch_num": 1, "step_num": 0', '"epoch_num": 4, "step_num": 96')
    r = package(fake_runs, tmp_path / "pkg")
    assert r.returncode == 1, r.stdout + r.stderr
    assert (f"deepcam-data: {fake_runs[2] / 'mlperf.log'}:{line}: the first epoch_start has epoch_num 4.0: a resumed "
            "run, whose time to train leaves out the epochs before its resume") in r.stderr, r.stderr
    assert not (tmp_path / "pkg").exists()


def test_nan_and_infinity_values_in_a_log_are_still_read(fake_runs, tmp_path):
    # json.dumps writes them, and the MLPerf checker reads them: values, not times.
    replace_in_log(fake_runs[0], r'("key": "accelerators_per_node", "value": 0, "metadata": \{)\}',
                   r'\g<1>"note": NaN, "other": -Infinity}')
    with open(fake_runs[0] / "mlperf.log", "a") as log:
        log.write(':::MLLOG {"namespace": "", "time_ms": 1, "event_type": "POINT", "key": "train_loss", '
                  '"value": Infinity, "metadata": {}}\n')
    r = package(fake_runs, tmp_path / "pkg")
    assert r.returncode == 0, r.stdout + r.stderr
    score = json.loads((tmp_path / "pkg" / "score.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert score["score_minutes"] == pytest.approx(3.0)


@pytest.mark.parametrize("text, cause", [
    (b'{"host_memory_capacity": "1 TB", "host_memory_capacity": "2 TB"}',
     'key "host_memory_capacity" is given twice at character 34'),
    (b'{"host_processor_frequency": NaN}', "NaN is not JSON"),
    (b'{"host_storage_capacity": Infinity}', "Infinity is not JSON"),
    (b'{"host_storage_capacity": -Infinity}', "-Infinity is not JSON"),
    (b'{"host_storage_capacity": 1e999}', "number 1e999 is beyond a double's range"),
    (b'{"host_networking": "a\xffb"}', "not UTF-8 (byte 23 is 0xff)"),
    (b'{"host_networking": "\\uZZZZ"}', "bad \\u escape '\\uZZZZ'"),
    (b'{"host_networking": "\\u12"}', "bad \\u escape '\\u12\"}'"),
    (b'{"host_networking": "\\ud83d and no pair"}', "a lone UTF-16 surrogate \\ud83d"),
    (b'{"host_networking": "\\ude00"}', "a lone UTF-16 surrogate \\ude00"),
    (b'{"host_networking": "\\q"}', "bad escape '\\q'"),
    (b'{"host_networking": 012}', "malformed number '012'"),
])
def test_a_system_desc_that_is_not_strict_json_is_refused(fake_runs, tmp_path, text, cause):
    """A duplicate key silently took the last value, NaN and Infinity were written into systems/NAME.json
    (which no JSON parser then reads), invalid UTF-8 became U+FFFD, and '\\uZZZZ' was an internal error."""
    desc = tmp_path / "desc.json"
    desc.write_bytes(text)
    r = package(fake_runs, tmp_path / "pkg", "s", "--system-desc", desc)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"deepcam-data: --system-desc {desc}: {cause}" in r.stderr, r.stderr
    assert not (tmp_path / "pkg").exists() and not list(tmp_path.glob(".pkg.tmp*"))


def test_system_desc_characters_beyond_the_bmp_are_decoded(fake_runs, tmp_path):
    # json.dumps writes a character beyond U+FFFF as a surrogate pair.
    fields = {"host_networking": "fabric \U0001F680 ü", "cooling": "a\u00e9\u20ac"}
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps(fields))
    assert "\\ud83d\\ude80" in desc.read_text()
    r = package(fake_runs, tmp_path / "pkg", "s", "--system-desc", desc)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads((tmp_path / "pkg" / "systems" / "s.json").read_bytes().decode("utf-8"))
    assert {k: got[k] for k in fields} == fields


def test_an_out_whose_folder_cannot_be_made_is_named_in_words(fake_runs, tmp_path):
    # std::filesystem's exception came out as it was: "filesystem error: cannot create directories: ...".
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "pkg"
    r = package(fake_runs, out, "s")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr == (f"deepcam-data: --out {out}: cannot write the package: {tmp_path / 'a-file'}: Not a "
                        "directory\n"), r.stderr
    assert r.stdout == "" and (tmp_path / "a-file").read_text() == "x"


def test_out_is_normalised_before_anything_is_done(fake_runs, tmp_path):
    """`--out pkg/` did all the work and failed renaming its temporary into pkg/ (inside it), leaving an empty
    pkg; `--out new/..` (the current folder) the same, leaving nothing but the work lost."""
    r = subprocess.run([str(DATA_TOOL), "package", *map(str, fake_runs), "--system", "s", "--out", "pkg/"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "pkg" / "score.json").read_text())["score_minutes"] == pytest.approx(3.0)
    assert not list(tmp_path.glob(".*")) and not list((tmp_path / "pkg").glob(".*"))
    r = package(fake_runs, f"{tmp_path / 'pkg'}/")
    assert r.returncode == 1 and f"--out {tmp_path / 'pkg'}/: exists already" in r.stderr, r.stderr
    before = sorted(tmp_path.rglob("*"))
    # (strings: pathlib drops a '.')
    for out in (f"{tmp_path}/new/..", f"{tmp_path}/new/.", f"{tmp_path}/.", "."):
        r = package(fake_runs, out)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"deepcam-data: package: --out {out}: ends in '.' or '..'; name the package folder itself" in \
            r.stderr, r.stderr
        assert r.stdout == "" and sorted(tmp_path.rglob("*")) == before
