"""Hangs, heartbeats and goodput, for real: 2 CPU ranks under torchrun, the tiny_local recipe.

- A rank stalled by ``TRAINCTL_FAULT_STALL_AT_STEP`` (it sleeps forever after step 2) while its
  peer waits in the next step's collective: every rank's watchdog dumps its stacks, the job step
  ends with the outcome ``hang`` a few seconds after ``train.hang_timeout_s`` (DeepSpeed and
  Megatron-Core).
- The job script requeues a ``hang`` record as a crash (stub srun, as tests/test_sbatch.py).
- One local run (``trainctl submit``, cluster=local) interrupted three times: SIGUSR1 to the ranks,
  SIGKILL of torchrun and its ranks after a checkpoint, SIGUSR1 again, then the same command runs it
  to the end; ``trainctl status`` (given the run path relative, as the README writes it) finds the
  running local job, names a node whose heartbeat is old, and reports goodput that matches what
  happened. The old heartbeat is the only made-up thing: a second node's file whose time is an hour
  back (one host cannot lose a node); everything else is the run's own.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.record import outcome
from launch.record.outcome import Outcome
from launch.train.watchdog import EXIT_HANG, STALL_KNOB
from tests.conftest import PYTHONPATH, SMALL_MODEL, run_trainctl
from tests.test_sbatch import STUB_SCONTROL, STUB_SINFO, render

TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # what job.sbatch gives torchrun
HANG_TIMEOUT_S = 10
"""Longer than a tiny step on a busy 2-core machine (seen: up to 2.5 s; building is not timed)."""


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}


def _records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


# --- a rank that stalls ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["deepspeed", "megatron"])
def test_a_stalled_rank_ends_the_job_step_as_a_hang_with_every_rank_s_stacks(tmp_path, prepared, backend):
    out = run_trainctl("render", "recipe=tiny_local", f"backend={backend}", f"data.prepared_dir={prepared}",
                       *SMALL_MODEL, "train.steps=8", "train.checkpoint_interval=100", "train.eval_interval=100",
                       f"train.hang_timeout_s={HANG_TIMEOUT_S}", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp_path / "runs/tiny_local"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         f"--signals-to-handle={TORCHRUN_SIGNALS}", "-m", "launch.train", str(run_dir)],
        cwd=tmp_path, env=_env(**{STALL_KNOB: "1:2"}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0, text[-4000:]
    (record_path,) = (run_dir / outcome.DIR).glob("*.json")
    record = outcome.read(record_path)
    assert record.outcome is Outcome.hang and record.step == 2, (record, text[-4000:])
    assert f"train.hang_timeout_s={HANG_TIMEOUT_S}" in record.cause and "after step 2 (training)" in record.cause
    # Fired within a few seconds of the timeout, counted from rank 1's last step (its record's time).
    last_step = _records(run_dir, "train")[-1]
    assert last_step["step"] == 2
    waited = dt.datetime.fromisoformat(record.time).timestamp() - last_step["time"]
    assert HANG_TIMEOUT_S - 1.5 <= waited <= HANG_TIMEOUT_S + 4, waited
    # Every rank's stacks: the stalled rank in the knob's sleep, its peer in a collective.
    dumps = {p.name: p.read_text() for p in (run_dir / "hangs" / record_path.stem).iterdir()}
    assert sorted(dumps) == ["rank_0.txt", "rank_1.txt"]
    assert "_stalled_by_test_knob" in dumps["rank_1.txt"] and "_stalled_by_test_knob" not in dumps["rank_0.txt"]
    waiting = r"distributed_c10d\.py\", line \d+ in \w+|partition_parameters\.py\", line \d+ in wait"  # ZeRO-3's gather
    assert re.search(waiting, dumps["rank_0.txt"]), dumps["rank_0.txt"]
    assert all("after step 2" in d for d in dumps.values())
    # One line from trainctl, and no rank's traceback: the only one is torchrun's summary of the exit codes.
    assert text.count("trainctl: hang on rank") == 1, text[-4000:]
    assert f"exitcode  : {EXIT_HANG}" in text
    assert text.count("Traceback (most recent call last)") <= 1 and "launch/train" not in text.split(
        "Traceback (most recent call last)")[-1], text[-4000:]


# --- the job script ------------------------------------------------------------------------------

STUB_SRUN_HANG = """#!/bin/bash
# stub srun: the health step runs for real; the training step writes the outcome a hung rank's watchdog writes
run_dir=${@: -1}
if printf '%s\\n' "$@" | grep -qx launch.train.health; then exec "$STUB_PYTHON" -m launch.train.health "$run_dir"; fi
"$STUB_PYTHON" -c 'import sys, pathlib; from launch.record.outcome import write
write(pathlib.Path(sys.argv[1]), "hang", "hang on rank 3: no training progress for 481 s", step=7)' "$run_dir"
exit 1
"""


def test_the_job_script_requeues_a_hang_as_a_crash_without_leaving_out_a_node(tmp_path):
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    for name, text in (("srun", STUB_SRUN_HANG), ("scontrol", STUB_SCONTROL), ("sinfo", STUB_SINFO)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = render(tmp_path, "recipe=tiny_slurm", "cluster.max_crash_requeues=1")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(bin_dir),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_PARTITION": "debug", "SLURMD_NODENAME": "node2", "STUB_PYTHON": sys.executable,
           "PYTHONPATH": PYTHONPATH}
    codes = [subprocess.run(["bash", str(script)], cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": str(n)},
                            capture_output=True, text=True, timeout=60).returncode for n in range(2)]
    assert codes == [0, 1]  # requeued once; the second hang in a row without a checkpoint spends the budget
    calls = (bin_dir / "scontrol.calls").read_text()
    assert calls.count("requeue 4242") == 1 and "ExcNodeList" not in calls
    log = (script.parent / "job.log").read_text()
    assert "job step hung (outcome hang, stacks in " in log and "/hangs/4242.0/) on node2" in log
    assert "crash 1 in a row without a new checkpoint (latest: none), at most 1 requeued; requeueing" in log
    assert "crash 2 in a row without a new checkpoint (latest: none); cluster.max_crash_requeues=1; not requeued" in log


# --- one local run interrupted three times: status, heartbeats, goodput ---------------------------

STEPS, EVERY = 12, 4
"""With the tiny model (not SMALL_MODEL: this test's signals must land between given steps, ~1.7 s apart)."""


def _submit(workdir: Path, prepared: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launch", "submit", "recipe=tiny_local", f"data.prepared_dir={prepared}",
         f"train.steps={STEPS}", f"train.checkpoint_interval={EVERY}", "train.eval_interval=100",
         "train.log_interval=1"], cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def _torchrun_pid(run_dir: Path, job: int, proc: subprocess.Popen) -> int:
    """The pid of this submission's torchrun (launch.sh execs it): job.json's ``local:PID``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            entries = json.loads((run_dir / "job.json").read_text())["jobs"]
        except (OSError, ValueError):
            entries = []
        if len(entries) > job:
            return int(entries[job]["job_id"].removeprefix("local:"))
        time.sleep(0.1)
    raise AssertionError(f"submission {job} never recorded its job: {proc.communicate()[0][-3000:]}")


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if any(r["step"] >= step for r in _records(run_dir, "train")):
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} never logged: {proc.communicate()[0][-3000:]}")


def test_a_run_interrupted_three_times_reports_its_goodput(tmp_path, prepared):
    run_dir = tmp_path / "runs/tiny_local"
    t0 = time.time()
    # 1: SIGUSR1 to torchrun after step 2: a checkpoint at the step it stops, nothing lost.
    first = _submit(tmp_path, prepared)
    pid = _torchrun_pid(run_dir, 0, first)
    _wait_for_step(run_dir, 2, first)
    os.kill(pid, signal.SIGUSR1)  # torchrun passes it to every rank (launch/train/launcher.py)
    assert first.wait(timeout=120) == 128 + signal.SIGUSR1, first.communicate()[0][-3000:]

    # 2: while it runs, status given the relative path finds it; a node without heartbeats is named.
    second = _submit(tmp_path, prepared)
    pid = _torchrun_pid(run_dir, 1, second)
    status = run_trainctl("status", "runs/tiny_local", cwd=tmp_path)
    assert status.returncode == 0 and "RUNNING" in status.stdout and "GONE" not in status.stdout, status.stdout
    _wait_for_step(run_dir, 2 * EVERY + 1, second)  # past the checkpoint at step 8
    gone = run_dir / "heartbeats/node-gone.json"
    (real,) = (run_dir / "heartbeats").glob("*.json")
    beat = json.loads(real.read_text())
    gone.write_text(json.dumps({**beat, "node": "node-gone", "unix": time.time() - 3600}))
    status = run_trainctl("status", "runs/tiny_local", cwd=tmp_path)
    assert re.search(rf"runs/tiny_local: heartbeats from 2 node\(s\): newest {re.escape(beat['node'])} at step \d+ \(\w+\) "
                     r"\d+ s ago, oldest node-gone at step \d+ \(\w+\) 36\d\d s ago; STALLED \(no progress past "
                     r"train.hang_timeout_s=480\): node-gone 36\d\d s ago at step \d+\n", status.stdout), status.stdout
    gone.unlink()
    # SIGKILL torchrun and its ranks (they run in their own session): the steps after the checkpoint are lost.
    victims = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in victims:
        p.kill()
    assert second.wait(timeout=60) == 128 + signal.SIGKILL  # submit reports the killed local run
    checkpoint = int((run_dir / "checkpoints/latest").read_text().strip().removeprefix("step_"))
    lost = max(r["step"] for r in _records(run_dir, "train")) - checkpoint
    assert checkpoint == 2 * EVERY and lost >= 1

    # 3: the same command resumes from step 8; `trainctl cancel` given the relative path stops it after step 10.
    third = _submit(tmp_path, prepared)
    pid = _torchrun_pid(run_dir, 2, third)
    while len(_records(run_dir, "resume")) < 2 and third.poll() is None:  # its rewind marked job 2's lost steps
        time.sleep(0.1)
    _wait_for_step(run_dir, 2 * EVERY + 2, third)
    cancel = run_trainctl("cancel", "runs/tiny_local", cwd=tmp_path)
    assert cancel.returncode == 0 and "stopping local run local:" in cancel.stdout, cancel.stdout + cancel.stderr
    assert third.wait(timeout=120) == 128 + signal.SIGTERM, third.communicate()[0][-3000:]

    # 4: to the end.
    fourth = _submit(tmp_path, prepared)
    assert fourth.wait(timeout=240) == 0, fourth.communicate()[0][-3000:]
    elapsed = time.time() - t0

    trained = _records(run_dir, "train")
    assert [r["step"] for r in trained] == list(range(1, STEPS + 1))  # one continuous curve
    discarded = _records(run_dir, "discarded_train")
    assert len(discarded) == lost  # log_interval=1: a record per step
    # Deterministic CPU runs: the recomputed steps (from the same checkpoint, the same data) repeat the lost losses.
    assert [(r["step"], r["loss"]) for r in discarded] == [(r["step"], r["loss"]) for r in trained
                                                           if r["step"] in {d["step"] for d in discarded}]
    status = run_trainctl("status", "runs/tiny_local", cwd=tmp_path)
    assert status.returncode == 0 and "COMPLETED" in status.stdout
    m = re.search(r"runs/tiny_local: goodput ([\d.]+)%: ([\d.]+) s productive training of ([\d.]+) s wall over "
                  r"4 job step\(s\) \(3 restart\(s\)\); (\d+) step\(s\) recomputed after resumes; 0 skipped "
                  r"step\(s\); 0 rewind\(s\); job steps ended: done 1, no record 1, stopped 2", status.stdout)
    assert m, status.stdout
    fraction, productive, wall, recomputed = float(m[1]), float(m[2]), float(m[3]), int(m[4])
    assert recomputed == lost
    assert productive == pytest.approx(sum(r["step_time_s"] for r in trained), abs=0.05)
    assert productive < wall < elapsed and fraction == pytest.approx(100 * productive / wall, abs=0.5)
    # The same figures in metrics.jsonl, by every job step that ended on its own (the killed one could not).
    records = _records(run_dir, "goodput")
    assert len(records) == 3 and records[-1]["recomputed_steps"] == lost and records[-1]["job_steps"] == 4
    assert records[-1]["productive_s"] == pytest.approx(productive, abs=0.05)
    assert re.search(rf"runs/tiny_local: heartbeats from 1 node\(s\): newest {re.escape(outcome.node_name())} at step "
                     rf"{STEPS} \(ended\) \d+ s ago\n", status.stdout) and "STALLED" not in status.stdout
    # One heartbeat file for the node, left at the last step.
    (beat_file,) = (run_dir / "heartbeats").glob("*.json")
    last = json.loads(beat_file.read_text())
    assert last["step"] == STEPS and last["phase"] == "ended" and last["node"] == outcome.node_name()


def test_hang_timeout_is_validated(tmp_path):
    out = run_trainctl("render", "recipe=tiny_local", "train.hang_timeout_s=0.5", cwd=tmp_path)
    assert out.returncode == 2 and "train.hang_timeout_s" in out.stderr and "0.5" in out.stderr
    assert "Traceback" not in out.stderr


def test_goodput_counts_logged_windows_skips_and_rewinds(tmp_path):
    """log_interval=5: each record covers 5 steps; a job killed after step 10 with a checkpoint at 5 loses 5
    steps; the non-finite and spike policies' records (kinds ``skip``, ``rewind``) are counted."""
    from launch.record import goodput

    recs = [{"kind": "job_start", "job": "7.0", "time": 100.0},
            {"kind": "train", "step": 5, "step_time_s": 2.0, "time": 120.0},
            {"kind": "skip", "step": 7, "time": 125.0},
            {"kind": "discarded_train", "step": 10, "step_time_s": 2.0, "time": 130.0},
            {"kind": "job_start", "job": "7.1", "time": 200.0},
            {"kind": "resume", "step": 5, "time": 210.0},
            {"kind": "rewind", "step": 5, "time": 215.0},
            {"kind": "skip", "step": 8, "time": 220.0}, {"kind": "skip", "step": 9, "time": 221.0},
            {"kind": "train", "step": 10, "step_time_s": 3.0, "time": 230.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "tra')
    (tmp_path / "outcomes").mkdir()
    (tmp_path / "outcomes/7.1.json").write_text(json.dumps({
        "outcome": "hang", "job": "7", "restart": 1, "node": "n1", "rank": 0, "step": 10,
        "time": "1970-01-01T00:04:00+00:00", "cause": "hang"}))
    (tmp_path / "outcomes/7.2.json").write_text(json.dumps({  # the health check failed: no trainer ran
        "outcome": "node", "job": "7", "restart": 2, "node": "n1", "rank": None, "step": None,
        "time": "1970-01-01T00:05:00+00:00", "cause": "health check"}))
    g = goodput.of(tmp_path)
    assert (g.productive_s, g.wall_s, g.job_steps, g.recomputed_steps) == (25.0, 30.0 + 40.0, 3, 5)
    assert (g.skipped_steps, g.rewinds, g.endings) == (3, 1, {"no record": 1, "hang": 1, "node": 1})
    assert g.record()["goodput"] == pytest.approx(25 / 70)
