"""scripts/slurm/run.sub and init_datasets.sub under a real Slurm: the test
starts munged, slurmctld and slurmd (Debian's slurm-wlm 22.05) on this
machine with a generated slurm.conf (this host as the one node, 2 CPUs, every
state file in a temporary folder), submits the scripts with sbatch on 2 tasks,
waits for the jobs and checks what they wrote with the official MLPerf
checker. The daemons are always stopped when the module's tests end; their
logs are printed then (pytest shows them when a test failed) and are part of
every failure message about a job."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import REPO_ROOT, clean_env, free_port, mlperf_check, read_events, synth

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "srun", "scancel")
SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _which(name):
    return shutil.which(name, path=SEARCH_PATH)


_missing = [b for b in DAEMONS + CLIENTS if _which(b) is None]
pytestmark = [
    pytest.mark.skipif(bool(_missing), reason=(
        f"Slurm is not installed here (missing: {', '.join(_missing)}); scripts/setup.sh installs the Debian "
        "packages slurmctld, slurmd, slurm-client and munge")),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd starts job steps as their user: the test runs it as root"),
]

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


class LocalSlurm:
    """A one-node Slurm cluster in `root`, its daemons children of this process."""

    def __init__(self, root: Path):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.procs = {}
        self.conf = root / "slurm.conf"
        self.logs = root / "log"
        for d in ("state", "spool", "munge", "log"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o755)  # munged wants the socket's folder searchable by all
        self.socket = root / "munge" / "munge.socket"

    def env(self, **extra):
        """The environment of a client command: no launcher variables of the caller, this cluster's conf."""
        return clean_env(SLURM_CONF=self.conf, PATH=SEARCH_PATH, **extra)

    def start(self):
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.socket}",
                               f"--key-file={key}", f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--log-file={self.logs / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self._until(lambda: self.socket.exists(), 20, "munged to open its socket")
        ctld_port, d_port = free_port(), free_port()
        (self.root / "plugstack.conf").write_text("")
        # Two GPUs on the node, for the steps that ask for them (their "devices" are files any node has).
        (self.root / "gres.conf").write_text(f"NodeName={self.node} Name=gpu File=/dev/null\n"
                                             f"NodeName={self.node} Name=gpu File=/dev/zero\n")
        self.conf.write_text("\n".join([
            "ClusterName=deepcamtest",
            "GresTypes=gpu",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.socket}",
            "CredType=cred/munge",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd.log'}",
            f"PlugStackConfig={self.root / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            "MinJobAge=3600",
            "SlurmdParameters=config_overrides",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 Gres=gpu:2 State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=30 State=UP",
            "",
        ]))
        env = self.env()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], env)
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], env)

        def idle():
            r = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                               env=env, timeout=20)
            return r.returncode == 0 and r.stdout.strip() == "idle"
        self._until(idle, 90, "the node to be idle in sinfo")

    def _spawn(self, name, argv, env=None):
        out = open(self.logs / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env or self.env(),
                                            start_new_session=True)
        out.close()

    def _until(self, ready, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                pytest.fail(f"{', '.join(dead)} exited while waiting for {what}\n{self.log_text()}")
            if ready():
                return
            time.sleep(0.5)
        pytest.fail(f"timed out after {timeout} s waiting for {what}\n{self.log_text()}")

    def stop(self):
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)

    def log_text(self, lines=40):
        parts = []
        for f in sorted(self.logs.glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {f.name} (last {lines} lines) ---\n" + "\n".join(text))
        return "\n".join(parts)

    def sbatch(self, script, *args, env):
        r = subprocess.run([_which("sbatch"), "--parsable", *map(str, args), str(script)], capture_output=True,
                           text=True, env=env, cwd=REPO_ROOT, timeout=60)
        assert r.returncode == 0, f"sbatch failed: {r.stderr}\n{self.log_text()}"
        return r.stdout.strip().split(";")[0]

    def job(self, job_id):
        r = subprocess.run([_which("scontrol"), "show", "job", "-o", job_id], capture_output=True, text=True,
                           env=self.env(), timeout=30)
        assert r.returncode == 0, f"scontrol show job {job_id}: {r.stderr}\n{self.log_text()}"
        return dict(item.split("=", 1) for item in r.stdout.split() if "=" in item)

    def wait(self, job_id, timeout):
        """Waits until the job has finished; returns its scontrol record."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINISHED:
                return info
            if time.monotonic() > deadline:
                subprocess.run([_which("scancel"), job_id], env=self.env(), timeout=30)
                pytest.fail(f"job {job_id} still {info.get('JobState')} after {timeout} s\n{self.log_text()}")
            time.sleep(1)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        print(cluster.log_text())


def job_output(path):
    return Path(path).read_text(errors="replace") if Path(path).exists() else f"({path} was not written)"


def test_convert_then_train_with_srun_on_two_tasks(slurm, tmp_path):
    """init_datasets.sub converts with 2 ranks and verifies; run.sub then trains the quickstart
    configuration on the converted set, 2 ranks by srun, into a folder of its own with its log (the
    runs in a row of NEXP, and their seeds, are checked with a stand-in for deepcam-host below)."""
    src = synth(tmp_path / "h5", train=64, validation=16, height=96, width=144, seed=11)
    dst, logdir = tmp_path / "npy", tmp_path / "logs"
    env = slurm.env(SRCDIR=src, DSTDIR=dst, THREADS=1)
    init = slurm.sbatch(REPO_ROOT / "scripts/slurm/init_datasets.sub", "-n", 2, "-o", tmp_path / "init-%j.out",
                        env=env)
    info = slurm.wait(init, 300)
    out = job_output(tmp_path / f"init-{init}.out")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{out}\n{slurm.log_text()}"
    assert "rank 0 of 2 (SLURM_PROCID/SLURM_NTASKS)" in out and "rank 1 of 2 (SLURM_PROCID/SLURM_NTASKS)" in out, out
    assert "validation: 16 npy samples" in out and "no problems" in out, out
    assert len(list((dst / "train").glob("data-*.npy"))) == 64 and (dst / "stats.h5").is_file()

    env = slurm.env(RUN_FILES="configs/quickstart.toml", DATADIR=dst, LOGDIR=logdir, NEXP=1, SEED=7,
                    OVERRIDES="reader.name=npy reader.threads=1 run.threads=1 run.train_batch_size=2")
    run = slurm.sbatch(REPO_ROOT / "scripts/slurm/run.sub", "-n", 2, "-o", tmp_path / "run-%j.out", env=env)
    info = slurm.wait(run, 1500)
    out = job_output(tmp_path / f"run-{run}.out")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{out}\n{slurm.log_text()}"
    for n, seed in ((1, 7),):
        run_dir = logdir / f"{run}_{n}"
        log = run_dir / "mlperf.log"
        printed = job_output(logdir / f"{run}_{n}.out")
        assert log.is_file(), f"{out}\n{printed}"
        status, text = mlperf_check(log)
        assert status == 0 and "SUCCESS" in text, text
        events = {e["key"]: e for e in read_events(log)}
        assert events["number_of_ranks"]["value"] == 2
        assert events["seed"]["value"] == seed
        assert events["global_batch_size"]["value"] == 4
        assert events["run_stop"]["metadata"]["status"] == "success"
        assert f"seed = {seed}" in (run_dir / "config.toml").read_text()
        assert str(dst) in (run_dir / "config.toml").read_text()
        assert f"run {n} exited with status 0" in out


def test_run_sub_refuses_a_missing_run_file(slurm, tmp_path):
    env = slurm.env(RUN_FILES="configs/no-such.toml", LOGDIR=tmp_path / "logs")
    job = slurm.sbatch(REPO_ROOT / "scripts/slurm/run.sub", "-n", 1, "-o", tmp_path / "run-%j.out", env=env)
    info = slurm.wait(job, 120)
    out = job_output(tmp_path / f"run-{job}.out")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", f"{info}\n{out}"
    assert "RUN_FILES: no such file: configs/no-such.toml" in out, out


def test_container_flags_only_with_cont(slurm, tmp_path):
    """With CONT set, srun gets pyxis's --container-image: this Slurm has no pyxis, so srun refuses
    the option, which shows that it was given; the same job without CONT trains (test above)."""
    data = synth(tmp_path / "h5")
    env = slurm.env(RUN_FILES="configs/quickstart.toml", DATADIR=data, LOGDIR=tmp_path / "logs",
                    CONT="/images/deepcam.sqsh", OVERRIDES="run.max_epochs=1")
    job = slurm.sbatch(REPO_ROOT / "scripts/slurm/run.sub", "-n", 1, "-o", tmp_path / "run-%j.out", env=env)
    info = slurm.wait(job, 120)
    out = job_output(tmp_path / f"run-{job}.out")
    stdout = job_output(tmp_path / "logs" / f"{job}_1.out")
    assert info["JobState"] == "FAILED", f"{info}\n{out}\n{stdout}"
    assert "container-image" in stdout, stdout


def test_instances_train_at_the_same_time_each_with_its_own_rank_0_seed_and_folder(slurm, tmp_path):
    """INSTANCES=2 on 2 tasks of one node: two runs of one rank each, as the instances of a throughput
    measurement: at the same time (their init_start to run_stop intervals overlap), each its own seed,
    rendezvous port and folder. Two epochs each: short of the target, so each exits 1 and so does the job.
    (One epoch's run_start to run_stop, about a second, once missed the other instance's on a loaded
    machine: the two steps start a second or so apart.)"""
    data = synth(tmp_path / "h5", train=16, validation=4, height=96, width=144, seed=11)
    logdir = tmp_path / "logs"
    port = free_port()
    env = slurm.env(RUN_FILES="configs/quickstart.toml", DATADIR=data, LOGDIR=logdir, INSTANCES=2, SEED=21,
                    MASTER_PORT=port, OVERRIDES="reader.threads=1 run.threads=1 run.max_epochs=2")
    job = slurm.sbatch(REPO_ROOT / "scripts/slurm/run.sub", "-n", 2, "-o", tmp_path / "run-%j.out", env=env)
    info = slurm.wait(job, 600)
    out = job_output(tmp_path / f"run-{job}.out")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", f"{info}\n{out}\n{slurm.log_text()}"
    assert "2 instances at the same time, each 1 task(s) on 1 node(s)" in out, out
    intervals = []
    for k, seed in ((1, 21), (2, 22)):
        run_dir = logdir / f"{job}_1_{k}"
        printed = job_output(logdir / f"{job}_1_{k}.out")
        assert (run_dir / "mlperf.log").is_file(), f"{out}\n{printed}"
        events = read_events(run_dir / "mlperf.log")
        first = {}
        for e in events:
            first.setdefault(e["key"], e)
        assert first["number_of_ranks"]["value"] == 1 and first["seed"]["value"] == seed, printed
        assert first["run_stop"]["metadata"]["status"] == "aborted", printed
        intervals.append((first["init_start"]["time_ms"], first["run_stop"]["time_ms"]))
        assert f"instance {k} of 2 on {slurm.node} (rank 0 at {slurm.node}:{port + k - 1})" in out, out
        assert f"run 1, instance {k} exited with status 1" in out, out
    (start_1, stop_1), (start_2, stop_2) = intervals
    assert start_1 < stop_2 and start_2 < stop_1, f"the instances ran one after the other: {intervals}\n{out}"


def test_instances_sharing_a_gpu_node_each_get_a_gpu_of_their_own_at_the_same_time(slurm, tmp_path):
    """sbatch --gpus-per-node puts SLURM_GPUS_PER_NODE into the job's environment, and srun took it: each
    instance's step asked for every GPU of the node, so the second waited for the first to end ("Requested
    nodes are busy") and each saw both GPUs. This cluster's node has 2 GPUs (gres.conf)."""
    host = tmp_path / "host"
    host.write_text('#!/bin/bash\necho "start $(date +%s.%N) gpus=${CUDA_VISIBLE_DEVICES-unset}"\nsleep 2\n'
                    'echo "stop $(date +%s.%N)"\n')
    host.chmod(0o755)
    logdir = tmp_path / "logs"
    env = slurm.env(RUN_FILES="configs/quickstart.toml", LOGDIR=logdir, INSTANCES=2, SEED=3,
                    MASTER_PORT=free_port(), DEEPCAM_HOST=host)
    job = slurm.sbatch(REPO_ROOT / "scripts/slurm/run.sub", "-n", 2, "--gpus-per-node", 2,
                       "-o", tmp_path / "run-%j.out", env=env)
    info = slurm.wait(job, 120)
    out = job_output(tmp_path / f"run-{job}.out")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{out}\n{slurm.log_text()}"
    seen = []
    for k in (1, 2):
        printed = job_output(logdir / f"{job}_1_{k}.out")
        said = {line.split()[0]: line.split()[1:] for line in printed.splitlines()
                if line.startswith(("start ", "stop "))}
        assert set(said) == {"start", "stop"}, printed
        seen.append((float(said["start"][0]), float(said["stop"][0]), said["start"][1]))
    (start_1, stop_1, gpus_1), (start_2, stop_2, gpus_2) = seen
    assert sorted([gpus_1, gpus_2]) == ["gpus=0", "gpus=1"], seen
    assert start_1 < stop_2 and start_2 < stop_1, f"the instances ran one after the other: {seen}\n{out}"


def test_a_run_stopped_by_scancel_ends_the_job_and_a_requeue_runs_it_again(slurm, tmp_path):
    """scancel --signal=TERM signals the job's steps, not its batch script: deepcam-host ends with 143 (the
    stand-in does so), which run.sub wrote as run 1's status before starting run 2; a requeue then kept run 1
    as one that had ended."""
    host = tmp_path / "host"
    host.write_text('#!/bin/bash\n[ "${SLURM_RESTART_COUNT:-0}" = 0 ] || exit 0\n'
                    'trap \'kill $!; echo "stopped"; exit 143\' TERM\necho "started"\nsleep 60 & wait\n')
    host.chmod(0o755)
    logdir = tmp_path / "logs"
    env = slurm.env(RUN_FILES="configs/quickstart.toml", LOGDIR=logdir, NEXP=2, DEEPCAM_HOST=host)
    job = slurm.sbatch(REPO_ROOT / "scripts/slurm/run.sub", "-n", 1, "-o", tmp_path / "run-%j.out", env=env)
    deadline = time.monotonic() + 120
    while "started" not in job_output(logdir / f"{job}_1.out"):
        assert time.monotonic() < deadline, f"{job_output(tmp_path / f'run-{job}.out')}\n{slurm.log_text()}"
        time.sleep(0.5)
    # The signal comes once the step is under way, as a time limit's does: a step signalled in its first
    # moment was reported by this srun with status 0, with no word from its task (1 in 10 here).
    time.sleep(2)
    subprocess.run([_which("scancel"), "--signal=TERM", job], env=slurm.env(), timeout=30, check=True)
    info = slurm.wait(job, 120)
    out = job_output(tmp_path / f"run-{job}.out")
    assert info["ExitCode"] == "143:0", f"{info}\n{out}\n{slurm.log_text()}"
    assert "run.sub: run 1 was stopped by a signal (status 143): no further run starts" in out, out
    assert not (logdir / f"{job}_1.status").exists() and not (logdir / f"{job}_2.out").exists(), out
    subprocess.run([_which("scontrol"), "requeue", job], env=slurm.env(), timeout=30, check=True)
    # Slurm holds a requeued job back before it may start again (minutes here): StartTime=now lets it start.
    subprocess.run([_which("scontrol"), "update", f"JobId={job}", "StartTime=now"], env=slurm.env(), timeout=30,
                   check=True)
    deadline = time.monotonic() + 300
    while (info := slurm.job(job)).get("Restarts") != "1" or info.get("JobState") not in FINISHED:
        assert time.monotonic() < deadline, f"{info}\n{job_output(tmp_path / f'run-{job}.out')}\n{slurm.log_text()}"
        time.sleep(1)
    out = job_output(tmp_path / f"run-{job}.out")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{out}"
    assert (logdir / "requeued" / f"{job}_1.attempt1.out").read_text().startswith("started"), out
    assert [(logdir / f"{job}_{n}.status").read_text() for n in (1, 2)] == ["0\n", "0\n"], out


def test_a_failed_rank_leaves_the_others_to_end_by_themselves(slurm, tmp_path):
    """srun --kill-on-bad-exit=1 ended rank 0 with SIGTERM once rank 1 had failed: the run's status was 143,
    not the highest of its ranks' own (here rank 1's 2 and rank 0's 5, a rank lost)."""
    logdir = tmp_path / "logs"
    env = slurm.env(RUN_FILES="configs/quickstart.toml", LOGDIR=logdir, DEEPCAM_HOST=two_ranks(tmp_path),
                    MARK=tmp_path / "mark", RANK1_RC=2, RANK0_RC=5)
    job = slurm.sbatch(REPO_ROOT / "scripts/slurm/run.sub", "-n", 2, "-o", tmp_path / "run-%j.out", env=env)
    info = slurm.wait(job, 120)
    out = job_output(tmp_path / f"run-{job}.out")
    printed = job_output(logdir / f"{job}_1.out")
    assert info["ExitCode"] == "5:0", f"{info}\n{out}\n{printed}\n{slurm.log_text()}"
    assert "rank 0 ended by itself" in printed and (logdir / f"{job}_1.status").read_text() == "5\n", printed


def test_instances_that_do_not_divide_the_tasks_are_refused(slurm, tmp_path):
    env = slurm.env(RUN_FILES="configs/quickstart.toml", LOGDIR=tmp_path / "logs", INSTANCES=3)
    job = slurm.sbatch(REPO_ROOT / "scripts/slurm/run.sub", "-n", 2, "-o", tmp_path / "run-%j.out", env=env)
    info = slurm.wait(job, 120)
    out = job_output(tmp_path / f"run-{job}.out")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", f"{info}\n{out}"
    assert "INSTANCES=3 on 2 tasks and 1 node(s): it must divide the tasks" in out, out


@pytest.mark.parametrize("variable, value", [("NEXP", "09"), ("SEED", "08"), ("SEED", "010"), ("SEED", "0"),
                                             ("INSTANCES", "02"), ("SEED", "12345678901234567890"),
                                             ("MASTER_PORT", "029500")])
def test_run_sub_refuses_a_count_or_seed_that_is_not_a_plain_positive_number(tmp_path, variable, value):
    """Bash reads 09 and 08 as bad octal numbers (the job ran nothing and exited 0), 010 as 8, and a
    number past 18 digits wraps around; deepcam-host refuses seed 0, and each instance's port is
    MASTER_PORT + k - 1. run.sub must refuse each before
    anything runs, name the variable, and exit 2."""
    r = fake_job(tmp_path, **{variable: value})
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"run.sub: {variable} must be" in r.stderr and f"got '{value}'" in r.stderr, r.stderr
    assert "value too great" not in r.stderr and "run.sub: run 1" not in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "logs").exists(), r.stdout


SRUN = '#!/bin/bash\nwhile [[ "${1:-}" == -* ]]; do shift; done\nexec "$@"\n'


# The stand-in deepcam-host prints its arguments and exits with HOST_RC_<its folder's name> (HOST_RC_4242_2
# for run 2, HOST_RC_4242_2_1 for its instance 1), else HOST_RC, else 0.
HOST = '''#!/bin/bash
echo "deepcam-host $*"
for word; do [[ "$word" != run.output_dir=* ]] || run=${word##*/}; done
rc=HOST_RC_${run:-}
exit "${!rc:-${HOST_RC:-0}}"
'''


def fake_job(tmp_path, restart=0, user=None, srun=SRUN, **variables):
    """run.sub started as Slurm starts a job's batch script (its SLURM_* variables; SLURM_RESTART_COUNT
    after a requeue), with stand-ins for srun (runs the command once, as one task, unless `srun` is another
    script) and scontrol (one node), and for deepcam-host (HOST: prints its arguments, exits with HOST_RC, or
    a run's own HOST_RC_4242_n): run.sub's own logic, in a second each. user: the uid to run it as (the tests
    run as root)."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && echo node1\n')
        (bin_dir / "srun").write_text(srun)
        (bin_dir / "host").write_text(HOST)
        for f in bin_dir.iterdir():
            f.chmod(0o755)
    env = clean_env(**{"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": 4242, "SLURM_JOB_NODELIST": "node1",
                       "SLURM_NTASKS": 1, "SLURM_SUBMIT_DIR": REPO_ROOT, "SLURM_RESTART_COUNT": restart,
                       "DEEPCAM_HOST": bin_dir / "host", "RUN_FILES": "configs/quickstart.toml",
                       "LOGDIR": tmp_path / "logs", **variables})
    as_user = [] if user is None else ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return subprocess.run([*as_user, "bash", str(REPO_ROOT / "scripts/slurm/run.sub")], capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.mark.parametrize("variables, message", [
    # read -a stopped at the first newline: the per-system file after it was dropped, and the job ran.
    ({"RUN_FILES": "configs/quickstart.toml\nconfigs/no-such.toml"}, "RUN_FILES: no such file: configs/no-such.toml"),
    # A value with a space came to deepcam-host as two broken --set items, once the allocation was granted.
    ({"OVERRIDES": 'run.max_epochs=1 mlperf.org="Some Lab"'}, "OVERRIDES: 'Lab\"' is not a section.key=value item"),
    ({"OVERRIDES": "run.max_epochs=1\nscheduler.milestones=[100, 200]"},
     "OVERRIDES: '200]' is not a section.key=value item"),
    # Any value but 1 was taken as 0.
    ({"CLEAR_CACHES": "yes"}, "CLEAR_CACHES must be 0 or 1, got 'yes'"),
    # srun started deepcam-host with no run file; bash's own cd error had status 1.
    ({"RUN_FILES": "   "}, "RUN_FILES names no file"),
    ({"DEEPCAM_HOME": "/nonexistent"}, "DEEPCAM_HOME: cannot enter /nonexistent (the checkout)"),
])
def test_run_sub_refuses_settings_it_would_have_dropped_or_misread(tmp_path, variables, message):
    r = fake_job(tmp_path, **variables)
    assert r.returncode == 2 and f"run.sub: {message}" in r.stderr, r.stdout + r.stderr
    assert "deepcam-host" not in r.stdout and not (tmp_path / "logs").exists(), r.stdout


def test_run_sub_refuses_to_clear_caches_for_a_user_that_cannot(tmp_path):
    # It was status 1 from set -e at the first run, deepcam-host's "target not reached".
    if os.getuid() != 0:
        pytest.skip("the test runs run.sub as another user, which needs root")
    r = fake_job(tmp_path, user=65534, CLEAR_CACHES="1")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "run.sub: CLEAR_CACHES=1 drops the page cache through /proc/sys/vm/drop_caches" in r.stderr
    assert "cannot write: it needs root" in r.stderr
    assert "deepcam-host" not in r.stdout and not (tmp_path / "logs").exists(), r.stdout


def test_run_sub_that_clears_caches_has_its_runs_log_cache_clear_true(tmp_path):
    if os.getuid() != 0:
        pytest.skip("CLEAR_CACHES=1 is refused to a user that cannot write /proc/sys/vm/drop_caches")
    # The stand-in srun notes the drop instead of emptying this machine's page cache under the other tests.
    drops = tmp_path / "drops"
    srun = f'#!/bin/bash\n[[ "$*" == *drop_caches* ]] && {{ echo "$*" >> {drops}; exit 0; }}\n' + SRUN.split("\n", 1)[1]
    r = fake_job(tmp_path, srun=srun, CLEAR_CACHES="1", NEXP=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(drops.read_text().splitlines()) == 2  # before each run
    for n in (1, 2):
        assert "--set mlperf.cache_clear=true" in (tmp_path / "logs" / f"4242_{n}.out").read_text()
    (tmp_path / "no").mkdir()
    r = fake_job(tmp_path / "no", CLEAR_CACHES="0")
    assert r.returncode == 0 and "cache_clear" not in (tmp_path / "no" / "logs" / "4242_1.out").read_text()


def test_run_sub_splits_its_lists_at_newlines_too_and_names_where_a_run_without_a_log_printed(tmp_path):
    r = fake_job(tmp_path, RUN_FILES="configs/quickstart.toml\nconfigs/systems/single_gpu.toml",
                 OVERRIDES="run.max_epochs=1\n\tscheduler.milestones=[100,200]", HOST_RC=2)
    assert r.returncode == 2, r.stdout + r.stderr
    logs = tmp_path / "logs"
    assert (logs / "4242_1.out").read_text().startswith(
        "deepcam-host configs/quickstart.toml configs/systems/single_gpu.toml --set run.output_dir="), r.stdout
    assert "--set run.max_epochs=1 --set scheduler.milestones=[100,200]\n" in (logs / "4242_1.out").read_text()
    # It stopped before its folder was made: the log named was not there.
    assert f"run 1 exited with status 2 (what its ranks printed: {logs / '4242_1.out'})" in r.stdout, r.stdout
    assert (logs / "4242_1.status").read_text() == "2\n"


def test_a_requeued_job_keeps_the_runs_that_ended_and_reruns_the_one_cut_short(tmp_path):
    """A requeue starts the batch script again with the same job id: run 1's folder was refused ("holds
    the record of an earlier run"), the job failed, and its .out was truncated."""
    logs = tmp_path / "logs"
    r = fake_job(tmp_path, NEXP=3, HOST_RC=1, SEED=7)
    assert r.returncode == 1 and [(logs / f"4242_{n}.status").read_text() for n in (1, 2, 3)] == ["1\n"] * 3
    for n in (1, 2, 3):  # run n, each into its own folder with seed SEED + n - 1
        assert f"--set run.output_dir={logs / f'4242_{n}'} --set run.seed={6 + n}\n" in \
            (logs / f"4242_{n}.out").read_text()
    # The first start was cut during run 2: its folder and output there, no status yet.
    (logs / "4242_2.status").unlink()
    (logs / "4242_3.status").unlink()
    (logs / "4242_3.out").unlink()
    (logs / "4242_2").mkdir()
    first_out = (logs / "4242_1.out").read_text()
    r = fake_job(tmp_path, restart=1, NEXP=3, HOST_RC=0, SEED=7)
    assert r.returncode == 1, r.stdout + r.stderr  # run 1's status, from the first start
    assert "run 1 ended before this job was requeued, with status 1: kept" in r.stdout, r.stdout
    assert (logs / "4242_1.out").read_text() == first_out
    moved = logs / "requeued" / "4242_2.attempt1"
    assert f"{logs / '4242_2'}, from before this job was requeued, moved to {moved}: it runs again" in r.stdout
    assert moved.is_dir() and moved.with_name("4242_2.attempt1.out").is_file()
    assert "run 2 of 3" in r.stdout and "run 3 of 3" in r.stdout, r.stdout
    assert [(logs / f"4242_{n}.status").read_text() for n in (1, 2, 3)] == ["1\n", "0\n", "0\n"]


def test_a_first_start_over_another_jobs_runs_of_the_same_id_is_refused(tmp_path):
    """Job ids repeat (a reset controller, two clusters sharing LOGDIR): a first start took the other job's
    ended runs for its own, kept them and ran nothing."""
    logs = tmp_path / "logs"
    r = fake_job(tmp_path, NEXP=2, SEED=7)
    assert r.returncode == 0, r.stdout + r.stderr
    before = {p: p.read_bytes() for p in logs.rglob("*") if p.is_file()}
    r = fake_job(tmp_path, NEXP=2, SEED=7)
    assert r.returncode == 2, r.stdout + r.stderr
    assert (f"run.sub: {logs} holds runs of another job with this job's id 4242 ({logs / '4242_1'}") in r.stderr, \
        r.stderr
    assert "deepcam-host" not in r.stdout, r.stdout
    assert {p: p.read_bytes() for p in logs.rglob("*") if p.is_file()} == before


def test_requeued_instances_run_again_together_unless_all_had_ended(tmp_path):
    logs = tmp_path / "logs"
    r = fake_job(tmp_path, NEXP=2, INSTANCES=2, SEED=5, SLURM_NTASKS=2)
    assert r.returncode == 0, r.stdout + r.stderr
    (logs / "4242_2_2.status").unlink()  # run 2's instance 2 was cut, its instance 1 had ended
    r = fake_job(tmp_path, restart=1, NEXP=2, INSTANCES=2, SEED=5, SLURM_NTASKS=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "run 1, instance 1 ended before" in r.stdout and "run 1, instance 2 ended before" in r.stdout, r.stdout
    assert "run 1 of 2, instance" not in r.stdout, r.stdout
    for k in (1, 2):
        assert (logs / "requeued" / f"4242_2_{k}.attempt1.out").is_file(), r.stdout
        assert f"run 2 of 2, instance {k} of 2" in r.stdout, r.stdout


@pytest.mark.parametrize("stopped, status", [(1, 143), (2, 137), (1, 130), (1, 129)])
def test_a_run_stopped_by_a_signal_ends_the_job_and_a_requeue_runs_it_again(tmp_path, stopped, status):
    """scancel --signal=TERM, a time limit (--signal=TERM@60, then SIGKILL after KillWait) or a preemption
    ends deepcam-host with 128 + the signal. run.sub wrote that status as the run's, started the next run (in
    a time limit's last minute), and a requeue kept the stopped run as one that had ended: it never ran."""
    logs = tmp_path / "logs"
    r = fake_job(tmp_path, NEXP=3, SEED=7, **{f"HOST_RC_4242_{stopped}": status})
    assert r.returncode == status, r.stdout + r.stderr
    assert (f"run.sub: run {stopped} was stopped by a signal (status {status}): no further run starts; a requeue "
            "of this job runs it again") in r.stderr, r.stderr
    assert f"run {stopped} exited with status {status}" in r.stdout, r.stdout
    assert not (logs / f"4242_{stopped}.status").exists() and (logs / f"4242_{stopped}.out").is_file()
    assert [(logs / f"4242_{n}.status").read_text() for n in range(1, stopped)] == ["0\n"] * (stopped - 1)
    assert f"run {stopped + 1} of 3" not in r.stdout and not (logs / f"4242_{stopped + 1}.out").exists(), r.stdout
    r = fake_job(tmp_path, restart=1, NEXP=3, SEED=7)
    assert r.returncode == 0, r.stdout + r.stderr
    moved = logs / "requeued" / f"4242_{stopped}.attempt1"
    assert f"{logs / f'4242_{stopped}'}, from before this job was requeued, moved to {moved}: it runs again" \
        in r.stdout, r.stdout
    assert moved.with_name(f"4242_{stopped}.attempt1.out").is_file()
    assert [f"run {n} of 3" in r.stdout for n in (1, 2, 3)] == [n >= stopped for n in (1, 2, 3)], r.stdout
    assert [(logs / f"4242_{n}.status").read_text() for n in (1, 2, 3)] == ["0\n"] * 3


@pytest.mark.parametrize("status", [139, 5, 128, 131])
def test_a_run_that_ended_with_another_status_is_kept_and_the_next_one_starts(tmp_path, status):
    """Only 128 + SIGHUP, SIGINT, SIGKILL or SIGTERM is a stop: a crash (139, SIGSEGV), a lost rank (5)
    or a SIGQUIT (131) ended the run, which a requeue keeps."""
    logs = tmp_path / "logs"
    r = fake_job(tmp_path, NEXP=2, HOST_RC_4242_1=status)
    assert r.returncode == status, r.stdout + r.stderr
    assert "stopped by a signal" not in r.stderr and "run 2 of 2" in r.stdout, r.stdout + r.stderr
    assert [(logs / f"4242_{n}.status").read_text() for n in (1, 2)] == [f"{status}\n", "0\n"]


def test_an_instance_stopped_by_a_signal_cuts_its_run_short_and_a_requeue_runs_every_instance_again(tmp_path):
    """The instances run at the same time or not at all: one stopped leaves no status for any of them."""
    logs = tmp_path / "logs"
    r = fake_job(tmp_path, NEXP=2, INSTANCES=2, SEED=5, SLURM_NTASKS=2, HOST_RC_4242_1_2=143)
    assert r.returncode == 143, r.stdout + r.stderr
    assert "run.sub: run 1 was stopped by a signal (status 143)" in r.stderr, r.stderr
    assert "run 1, instance 1 exited with status 0" in r.stdout and "run 2 of 2" not in r.stdout, r.stdout
    assert not list(logs.glob("*.status")), sorted(p.name for p in logs.iterdir())
    r = fake_job(tmp_path, restart=1, NEXP=2, INSTANCES=2, SEED=5, SLURM_NTASKS=2)
    assert r.returncode == 0, r.stdout + r.stderr
    for k in (1, 2):
        assert (logs / "requeued" / f"4242_1_{k}.attempt1.out").is_file(), r.stdout
        assert (logs / f"4242_1_{k}.status").read_text() == "0\n" and f"run 1 of 2, instance {k}" in r.stdout


def test_a_requeue_runs_again_a_run_whose_status_file_holds_a_stop(tmp_path):
    """A .status of 143 written before run.sub knew stops (a job requeued across the change) is no run that
    ended."""
    logs = tmp_path / "logs"
    r = fake_job(tmp_path, NEXP=2)
    assert r.returncode == 0, r.stdout + r.stderr
    (logs / "4242_2.status").write_text("143\n")
    r = fake_job(tmp_path, restart=1, NEXP=2)
    assert r.returncode == 0 and "run 1 ended before this job was requeued" in r.stdout, r.stdout + r.stderr
    assert (logs / "requeued" / "4242_2.attempt1.status").read_text() == "143\n" and "run 2 of 2" in r.stdout
    assert (logs / "4242_2.status").read_text() == "0\n"


# A stand-in for srun that starts SLURM_NTASKS tasks of its command, each with its SLURM_PROCID, notes its
# options in $SRUN_LOG, and exits with the highest status of the tasks (128 + the signal of one killed), as
# srun does; with --kill-on-bad-exit=1 (-K) it ends the other tasks with SIGTERM once one exits non-zero, as
# srun does (and SIGKILL after KillWait).
SRUN_TASKS = r'''#!/bin/bash
kill_on_bad_exit=0 options=()
while [[ "${1:-}" == -* ]]; do
  case "$1" in
    -K | -K1 | --kill-on-bad-exit | --kill-on-bad-exit=[1-9]*) kill_on_bad_exit=1 ;;
    -K0 | --kill-on-bad-exit=0) kill_on_bad_exit=0 ;;
  esac
  options+=("$1"); shift
done
echo "${options[*]}" >> "$SRUN_LOG"
declare -A running
for ((i = 0; i < ${SLURM_NTASKS:-1}; i++)); do SLURM_PROCID=$i "$@" & running[$!]=1; done
rc=0
while ((${#running[@]} > 0)); do
  pid=""; wait -n -p pid; s=$?
  [ -n "$pid" ] || break
  unset "running[$pid]"
  ((s > rc)) && rc=$s
  if ((s != 0 && kill_on_bad_exit)); then for p in "${!running[@]}"; do kill -TERM "$p"; done; fi
done
exit $rc
'''

# Rank 1 fails at once with $RANK1_RC; rank 0 ends by itself a second later with $RANK0_RC (deepcam-host's 5,
# a lost rank; convert's 0, its own samples done), saying so.
TWO_RANKS = '''#!/bin/bash
[ "$1" = verify ] && exit 0
if [ "$SLURM_PROCID" = 1 ]; then touch "$MARK"; exit "$RANK1_RC"; fi
while [ ! -e "$MARK" ]; do sleep 0.05; done
sleep 1
echo "rank 0 ended by itself"
exit "$RANK0_RC"
'''


def two_ranks(tmp_path):
    ranks = tmp_path / "ranks"
    ranks.write_text(TWO_RANKS)
    ranks.chmod(0o755)
    return ranks


def test_run_sub_lets_the_ranks_end_by_themselves_and_keeps_their_highest_status(tmp_path):
    """srun --kill-on-bad-exit=1 ended the other ranks once one exited non-zero: a run's 1, 2 or 4 came back
    as 143 or 137, and a SIGKILLed rank left its staged copies behind. deepcam-host's ranks end by themselves
    when one fails, within comm_timeout_s (here 5, a rank lost)."""
    log = tmp_path / "srun.log"
    r = fake_job(tmp_path, srun=SRUN_TASKS, SLURM_NTASKS=2, DEEPCAM_HOST=two_ranks(tmp_path), SRUN_LOG=log,
                 MARK=tmp_path / "mark", RANK1_RC=2, RANK0_RC=5)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "rank 0 ended by itself" in (tmp_path / "logs" / "4242_1.out").read_text()
    assert (tmp_path / "logs" / "4242_1.status").read_text() == "5\n"
    assert log.read_text().split() == ["--kill-on-bad-exit=0"], log.read_text()


def test_init_datasets_lets_converts_ranks_end_by_themselves(tmp_path):
    """convert's ranks share nothing but the output folder: a rank that fails at once (here its source) leaves
    the others converting; srun --kill-on-bad-exit=1 ended them, and the job's status was 143 or 137."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN_TASKS)
    (bin_dir / "srun").chmod(0o755)
    log = tmp_path / "srun.log"
    env = clean_env(SLURM_JOB_ID=4242, SLURM_NTASKS=2, SLURM_SUBMIT_DIR=REPO_ROOT, PATH=f"{bin_dir}:/usr/bin:/bin",
                    SRCDIR=tmp_path, DSTDIR=tmp_path / "npy", DEEPCAM_DATA=two_ranks(tmp_path), SRUN_LOG=log,
                    MARK=tmp_path / "mark", RANK1_RC=1, RANK0_RC=0)
    r = subprocess.run(["bash", str(REPO_ROOT / "scripts/slurm/init_datasets.sub")], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 1 and "rank 0 ended by itself" in r.stdout, r.stdout + r.stderr
    assert log.read_text().split() == ["--kill-on-bad-exit=0"], log.read_text()


@pytest.mark.parametrize("unset", ["SRCDIR", "DSTDIR"])
def test_init_datasets_without_its_folders_exits_2_as_for_any_other_wrong_variable(tmp_path, unset):
    # bash's ${VAR:?} ended the job with status 1, which the header gives to no case.
    env = clean_env(SLURM_JOB_ID=4242, SLURM_SUBMIT_DIR=REPO_ROOT, PATH="/usr/bin:/bin",
                    **{k: v for k, v in {"SRCDIR": tmp_path, "DSTDIR": tmp_path / "npy"}.items() if k != unset})
    r = subprocess.run(["bash", str(REPO_ROOT / "scripts/slurm/init_datasets.sub")], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 2 and f"init_datasets.sub: set {unset} to" in r.stderr, r.stderr
    assert not (tmp_path / "npy").exists()


@pytest.mark.parametrize("variables, message", [
    ({"VERIFY_VALUES": "yes"}, "VERIFY_VALUES must be 0 or 1, got 'yes'"),  # taken as 0
    ({"THREADS": "many"}, "THREADS must be a whole number from 1 to 1024, got 'many'"),  # refused in the step
    ({"DEEPCAM_HOME": "/nonexistent"}, "DEEPCAM_HOME: cannot enter /nonexistent (the checkout)"),
])
def test_init_datasets_refuses_a_wrong_setting_before_any_step(tmp_path, variables, message):
    env = clean_env(SLURM_JOB_ID=4242, SLURM_SUBMIT_DIR=REPO_ROOT, PATH="/usr/bin:/bin", SRCDIR=tmp_path,
                    DSTDIR=tmp_path / "npy", **variables)
    r = subprocess.run(["bash", str(REPO_ROOT / "scripts/slurm/init_datasets.sub")], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 2 and f"init_datasets.sub: {message}" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "npy").exists()
