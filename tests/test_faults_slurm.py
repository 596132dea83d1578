"""The fault table's Slurm rows, for real: a rank killed, a node lost, a job at its time limit and then
preempted again and again.

The jobs are the tiny DeepSpeed run on the local test cluster (slurm/cluster.sh: slurmctld and two
slurmd on this host). Each fault is injected at a fixed early step; each test then checks what a
user would: the job ends COMPLETED, every step appears once in the train curve, at most one
checkpoint interval was recomputed, and the recomputed steps' losses equal the ones the undisturbed
first attempt logged before the fault (these tiny CPU runs are deterministic), so the resume loaded
exactly what was saved. Only the GPUs are fake (gres entries pointing at /dev/null).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, SLURM_STATE, SMALL_MODEL, job_field, run_trainctl, slurm, wait_for

STEPS, INTERVAL = 12, 3


def _submit(workdir: Path, env: dict, prepared: Path, *overrides: str) -> tuple[str, Path]:
    out = run_trainctl("submit", "recipe=tiny_slurm", f"data.prepared_dir={prepared}", f"train.steps={STEPS}",
                       f"train.checkpoint_interval={INTERVAL}", "train.eval_interval=0", *SMALL_MODEL, *overrides,
                       cwd=workdir, env=env)
    assert out.returncode == 0, out.stderr
    return re.search(r"submitted job (\d+)", out.stdout).group(1), workdir / "runs/tiny_slurm"


def _records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in records if r["kind"] == kind]


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in _records(run_dir, "train")]


def _latest_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints/latest"
    return int(latest.read_text().strip().rsplit("_", 1)[1]) if latest.is_file() else 0


def _ranks(job: str) -> dict[int, int]:
    """{RANK: pid} of the job's trainer processes (their environment names the job and the rank)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"launch.train" not in cmd or b"launch.train.launcher" in cmd:
                continue
            env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job.encode() and b"RANK" in env:
            found[int(env[b"RANK"])] = int(pid)
    return found


def _wait_done(env: dict, job: str, run_dir: Path, timeout: float = 300) -> None:
    wait_for(lambda: job_field(env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), timeout,
             f"job {job} to finish")
    log = (run_dir / "job.log").read_text() if (run_dir / "job.log").exists() else ""
    assert job_field(env, job, "JobState") == "COMPLETED", log[-3000:]


BACKENDS = pytest.mark.parametrize("backend", [("backend=deepspeed",), ("backend=megatron", "parallel.tp=2")],
                                   ids=["deepspeed", "megatron-tp2"])


def _assert_resumed_exactly(run_dir: Path, most_lost: int) -> list[dict]:
    """Every step once; the recomputed steps (at most ``most_lost``) logged the same losses both times."""
    train = _records(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    lost = _records(run_dir, "discarded_train")
    assert len(lost) <= most_lost, [r["step"] for r in lost]
    by_step = {r["step"]: r["loss"] for r in train}
    assert all(r["loss"] == by_step[r["step"]] for r in lost), (lost, by_step)
    final = run_dir / "checkpoints/final"
    assert (final / "config.json").is_file() or (final / "metadata.json").is_file()  # HF model | dist checkpoint
    return lost


@pytest.mark.parametrize("backend", [("backend=deepspeed",), pytest.param(("backend=megatron", "parallel.tp=2"),
                                                                           marks=pytest.mark.slow)],
                         ids=["deepspeed", "megatron-tp2"])
def test_a_rank_killed_mid_run_is_requeued_and_resumes_from_the_last_checkpoint(workdir: Path, slurm_env: dict,
                                                                                 prepared: Path, backend: tuple) -> None:
    job, run_dir = _submit(workdir, slurm_env, prepared, *backend)
    wait_for(lambda: _latest_step(run_dir) >= INTERVAL and len(_steps(run_dir)) >= INTERVAL + 1, 240,
             "a checkpoint and one step after it")
    ranks = _ranks(job)
    assert 1 in ranks, ranks
    killed_after = len(_steps(run_dir))
    os.kill(ranks[1], signal.SIGKILL)
    _wait_done(slurm_env, job, run_dir)
    assert job_field(slurm_env, job, "Restarts") == "1"
    log = (run_dir / "job.log").read_text()
    assert re.search(r"(crashed|without an outcome record).*requeueing \(restart 1", log), log
    lost = _assert_resumed_exactly(run_dir, most_lost=INTERVAL)
    assert lost and min(r["step"] for r in lost) > killed_after - INTERVAL - 1


@BACKENDS
def test_the_time_limit_then_repeated_preemption_resume_each_time_and_lose_nothing(workdir: Path, slurm_env: dict,
                                                                                   prepared: Path, backend: tuple) -> None:
    """First the time limit (Slurm's --signal=B:USR1@T: the script has the step save, then requeues the job
    itself), then preemption as Slurm does it (PreemptMode=REQUEUE: SIGTERM, Slurm requeues), twice."""
    job, run_dir = _submit(workdir, slurm_env, prepared, *backend)
    for restart, at_step in enumerate((2, 5, 8), start=1):
        wait_for(lambda: len(_steps(run_dir)) >= at_step and job_field(slurm_env, job, "JobState") == "RUNNING",
                 240, f"step {at_step}")
        if restart == 1:
            slurm(slurm_env, "scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@T does at T
        else:
            slurm(slurm_env, "scontrol", "requeue", job)
        wait_for(lambda: job_field(slurm_env, job, "Restarts") == str(restart), 90, f"requeue {restart}")
        if restart == 1:  # the step saved where the signal found it: latest names the last logged step
            assert _latest_step(run_dir) == _steps(run_dir)[-1]
    _wait_done(slurm_env, job, run_dir)
    assert job_field(slurm_env, job, "Restarts") == "3"
    log = (run_dir / "job.log").read_text()
    assert log.count("got SIGUSR1: asking the job step to checkpoint and stop") == 1, log
    assert "job step stopped after SIGUSR1" in log and "requeueing (restart 1" in log, log
    assert log.count("got SIGTERM: asking the job step to checkpoint and stop") == 2, log
    _assert_resumed_exactly(run_dir, most_lost=0)  # each signal saved a checkpoint of the step it ended
    outcomes = [json.loads(p.read_text()) for p in sorted((run_dir / "outcomes").glob(f"{job}.*.json"))]
    assert [o["outcome"] for o in outcomes] == ["stopped", "stopped", "stopped", "done"], outcomes
    assert (run_dir / "checkpoints/final/config.json").is_file()  # a Hugging Face model from either backend
    if "backend=megatron" in backend:
        assert (run_dir / "checkpoints/final/megatron/metadata.json").is_file()  # and the dist checkpoint
    out = run_trainctl("status", str(run_dir), cwd=workdir, env=slurm_env).stdout
    assert re.search(rf"{job}\s+COMPLETED\s+\S+\s+3\s+0\s+{STEPS}/{STEPS}\s", out), out


def _slurmd_pid(node: str) -> int:
    return int((SLURM_STATE / "run" / f"slurmd-{node}.pid").read_text().strip())


def _descendants(pid: int) -> list[int]:
    children = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_a_lost_node_requeues_the_job_and_it_resumes_on_another(workdir: Path, slurm_env: dict, prepared: Path) -> None:
    """The node the job runs on disappears: its slurmd and every process of the job there are SIGKILLed.
    slurmctld marks it DOWN after SlurmdTimeout (short in the test cluster) and requeues the job."""
    job, run_dir = _submit(workdir, slurm_env, prepared)
    wait_for(lambda: _latest_step(run_dir) >= INTERVAL and len(_steps(run_dir)) >= INTERVAL + 1, 240,
             "a checkpoint and one step after it")
    node = job_field(slurm_env, job, "NodeList")
    slurmd = _slurmd_pid(node)
    steps = [int(p) for p in filter(str.isdigit, os.listdir("/proc"))
             if re.match(rf"slurmstepd: \[{job}\.", Path(f"/proc/{p}/cmdline").read_text(errors="replace")
                         if Path(f"/proc/{p}/cmdline").exists() else "")]
    victims = [slurmd, *steps, *(d for s in steps for d in _descendants(s))]
    try:
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: job_field(slurm_env, job, "Restarts") == "1", 120, "Slurm to requeue the job")
        _wait_done(slurm_env, job, run_dir)
        assert job_field(slurm_env, job, "NodeList") != node  # ran on the node that was left
        _assert_resumed_exactly(run_dir, most_lost=INTERVAL)
    finally:
        subprocess.run(["bash", str(ROOT / "slurm/cluster.sh"), "start", "2"], capture_output=True, timeout=300,
                       env={**os.environ, "TRAINCTL_SLURM_DIR": str(SLURM_STATE)})
        wait_for(lambda: "idle" in slurm(slurm_env, "sinfo", "-h", "-n", node, "-o", "%t"), 120,
                 f"{node} back in service")
