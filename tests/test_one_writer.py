"""One run, one writer: the run directory's locks, no orphaned ranks, stop signals and Ctrl-C on a local run.

Real processes throughout: ``trainctl submit`` with cluster=local (bash, torchrun
through launch/train/launcher.py, 2 CPU ranks of the DeepSpeed trainer), signals
sent as a terminal or a user would. Losses after a resume are compared with an
undisturbed run's exactly: these tiny CPU runs are deterministic.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launch.record import lock
from launch.record.outcome import Outcome
from tests.conftest import PYTHONPATH, SMALL_MODEL, run_trainctl, slurm, wait_for
from tests.test_sbatch import STUB_SRUN, render as render_sbatch, run_script, stubs  # noqa: F401 (fixture)

STEPS = 10


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "COLUMNS": "120"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _args(prepared: Path) -> list[str]:
    return ["recipe=tiny_local", f"data.prepared_dir={prepared}", f"train.steps={STEPS}",
            "train.checkpoint_interval=4", "train.eval_interval=0", *SMALL_MODEL]


class Submit:
    """A ``trainctl submit`` running in the background, its own process group standing for a terminal's foreground."""

    def __init__(self, cwd: Path, prepared: Path, *extra: str, env: dict | None = None):
        self.cwd, self.run_dir = cwd, cwd / "runs/tiny_local"
        self.proc = subprocess.Popen([sys.executable, "-m", "launch", "submit", *_args(prepared), *extra], cwd=cwd,
                                     env={**_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def wait_steps(self, n: int, timeout: float = 240) -> None:
        wait_for(lambda: len(_train(self.run_dir)) >= n or self.proc.poll() is not None, timeout, f"step {n}")
        assert self.proc.poll() is None, self.output()[-3000:]

    def launcher(self) -> int:
        """The launcher's pid (job.json's local:PID)."""
        return int(json.loads((self.run_dir / "job.json").read_text())["jobs"][-1]["job_id"].split(":")[1])

    def finish(self, timeout: float = 240) -> str:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.output()

    def output(self) -> str:
        return "".join(self.lines)


def _train(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in records if r["kind"] == "train"]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _train(run_dir)}


def _ranks(run_dir: Path) -> list[int]:
    """Live processes whose command line names the run directory as `launch.train`'s argument."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if str(run_dir) in args and "launch.train" in args and state != "Z":
                found.append(int(entry.name))
    return found


def _outcomes(run_dir: Path) -> list[dict]:
    folder = run_dir / "outcomes"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)]


def _no_traceback(out: str) -> None:
    assert "Traceback" not in out and "problem(s) with this config" not in out, out[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared):
    """An undisturbed run's losses, step by step: ``reference(backend)``, each backend's run once."""
    runs: dict[str, dict[int, float]] = {}

    def losses(backend: str) -> dict[int, float]:
        if backend not in runs:
            run = Submit(tmp_path_factory.mktemp(f"reference_{backend}"), prepared, f"backend={backend}")
            out = run.finish()
            assert run.proc.returncode == 0, out[-4000:]
            runs[backend] = _losses(run.run_dir)
            assert sorted(runs[backend]) == list(range(1, STEPS + 1))
        return runs[backend]
    return losses


# --- the lock record (pure: no training) ---------------------------------------------------

def test_the_lock_record_refuses_a_live_holder_and_takes_over_a_stale_or_finished_one(tmp_path, slurm_env,
                                                                                      monkeypatch) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert lock.take_record(run_dir, "101").startswith("took ")
    assert lock.take_record(run_dir, "101").startswith("kept ")  # the same job, requeued: its own record
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(run_dir)])  # a live local holder on this host
    try:
        (run_dir / lock.RECORD_NAME).write_text(json.dumps(
            {"job": "local", "node": socket.gethostname(), "pid": holder.pid, "since": "2026-01-01T00:00:00+00:00"}))
        with pytest.raises(lock.Held, match=f"job local .*pid {holder.pid}"):
            lock.take_record(run_dir, "102")
        os.utime(run_dir / lock.RECORD_NAME, (time.time() - lock.STALE_S - 5,) * 2)  # its heartbeat stopped
        assert "heartbeat is" in lock.take_record(run_dir, "102")
    finally:
        holder.kill()
    # A record whose Slurm job no longer runs: taken over at once, whatever its heartbeat says.
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])
    (run_dir / lock.RECORD_NAME).write_text(json.dumps(
        {"job": "999999", "node": "node1", "pid": 1, "since": "2026-01-01T00:00:00+00:00"}))
    assert "Slurm says its job is no longer known" in lock.take_record(run_dir, "103")
    old = time.time() - 1000
    os.utime(run_dir / lock.RECORD_NAME, (old, old))
    lock.heartbeat(run_dir, "103", interval_s=0.05)  # the holder's heartbeat keeps its record fresh
    wait_for(lambda: lock.read_record(run_dir).heartbeat_age_s < 5, 5, "a heartbeat")
    lock.release_record(run_dir, "103")
    assert not (run_dir / lock.RECORD_NAME).exists()


def test_a_second_holder_of_the_run_directory_is_refused_naming_the_first(tmp_path) -> None:
    from launch.errors import UserError

    with lock.hold(tmp_path, "trainctl submit") as fd:
        lock.note_job(fd, "local:123")
        with pytest.raises(UserError, match=rf"in use by trainctl submit \(pid {os.getpid()} on \S+, job local:123"):
            with lock.hold(tmp_path, "trainctl submit"):
                pass
    assert not (tmp_path / lock.FLOCK_NAME).exists()
    with lock.hold(tmp_path, "trainctl submit") as fd:  # free again once the holder is done
        assert fd is not None


def test_a_locked_outcome_stops_the_job_without_a_requeue(workdir: Path, stubs: Path) -> None:  # noqa: F811
    srun = stubs / "srun"
    srun.write_text(STUB_SRUN.replace('  silent) exit 1 ;;', '  silent) exit 1 ;;\n'
                                      '  locked) outcome locked "held by job 7 (node n1)"; exit 1 ;;'))
    script = render_sbatch(workdir, "recipe=tiny_slurm")
    result = run_script(script, stubs, "locked", cwd=workdir)
    assert result.returncode == 1
    assert "requeue" not in (stubs / "scontrol.calls").read_text()
    assert "another job holds this run directory on node1: held by job 7 (node n1); not requeued" in \
        (script.parent / "job.log").read_text()


def test_two_slurm_submits_at_the_same_moment_queue_one_job(workdir: Path, slurm_env: dict) -> None:
    both = [subprocess.Popen([sys.executable, "-m", "launch", "submit", "recipe=tiny_slurm", "train.rank_check_s=60"],
                             cwd=workdir, env={**_env(), **slurm_env}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in both]
    jobs = json.loads((workdir / "runs/tiny_slurm/job.json").read_text())["jobs"]
    try:
        assert sorted(code for code, _, _ in results) == [0, 2], results
        assert len(jobs) == 1
        refused = next(err for code, _, err in results if code == 2)
        assert "in use by trainctl submit (pid" in refused or "is still" in refused, refused
    finally:
        slurm(slurm_env, "scancel", *[j["job_id"] for j in jobs])


# --- local runs, for real --------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["deepspeed", pytest.param("megatron", marks=pytest.mark.slow)])
def test_stop_signals_to_the_launcher_save_and_the_resumed_losses_match(tmp_path, prepared, reference,
                                                                         backend) -> None:
    """SIGTERM (`trainctl cancel`), then (resumed) SIGUSR1 to torchrun: each stops at a checkpoint, no
    traceback; the third run finishes with every loss equal to the undisturbed run's. (Megatron-Core: slow;
    in CI its stop and resume are checked by test_train_megatron's pp 2 run and the Slurm preemption test.)"""
    first = Submit(tmp_path, prepared, f"backend={backend}")
    first.wait_steps(2)
    cancel = run_trainctl("cancel", str(first.run_dir), cwd=tmp_path)  # SIGTERM to the launcher's group
    assert cancel.returncode == 0 and "stopping local run local:" in cancel.stdout, cancel.stdout + cancel.stderr
    out = first.finish()
    _no_traceback(out)
    assert first.proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    stopped = [line for line in out.splitlines() if line.startswith("stopped local:")]
    assert len(stopped) == 1 and "by SIGTERM" in stopped[0] and "resume: trainctl submit recipe=tiny_local" in stopped[0]
    assert json.loads((first.run_dir / "job.json").read_text())["jobs"][-1]["outcome"] == "stopped"
    assert _outcomes(first.run_dir)[-1]["outcome"] == "stopped"
    assert "STOPPED_AT_CHECKPOINT" in run_trainctl("status", str(first.run_dir), cwd=tmp_path).stdout

    resumed = Submit(tmp_path, prepared, f"backend={backend}")
    resumed.wait_steps(_outcomes(first.run_dir)[-1]["step"] + 1)
    os.kill(resumed.launcher(), signal.SIGUSR1)
    out = resumed.finish()
    _no_traceback(out)
    assert resumed.proc.returncode == 128 + signal.SIGUSR1 and "by SIGUSR1" in out, out[-3000:]

    last = Submit(tmp_path, prepared, f"backend={backend}")
    out = last.finish()
    assert last.proc.returncode == 0 and "finished local:" in out, out[-3000:]
    assert _losses(last.run_dir) == reference(backend)  # every step, once, as if never stopped
    assert not (last.run_dir / lock.RECORD_NAME).exists() and not (last.run_dir / lock.FLOCK_NAME).exists()


def test_ctrl_c_saves_and_says_how_to_resume_and_a_second_stops_at_once(tmp_path, prepared) -> None:
    early = Submit(tmp_path, prepared)  # Ctrl-C while torchrun is still starting: nothing to save yet
    wait_for(lambda: "started local:" in early.output(), 60, "the launcher to start")
    os.killpg(early.proc.pid, signal.SIGINT)
    out = early.finish()
    _no_traceback(out)
    assert early.proc.returncode == 130 and len(re.findall(r"^stopped local:\S+ by Ctrl-C", out, re.M)) == 1, out

    run = Submit(tmp_path, prepared)
    run.wait_steps(2)
    os.killpg(run.proc.pid, signal.SIGINT)  # what the terminal does: trainctl's group
    out = run.finish()
    _no_traceback(out)
    assert run.proc.returncode == 130, out[-3000:]
    stopped = [line for line in out.splitlines() if line.startswith("stopped local:")]
    assert len(stopped) == 1 and "by Ctrl-C" in stopped[0], out[-3000:]
    checkpoint = re.search(r"checkpoint (\S+);", stopped[0])[1]
    assert Path(checkpoint).is_dir() and stopped[0].endswith(" ".join(["trainctl submit", *_args(prepared)]))

    # The second Ctrl-C must find a step that has not ended: rank 1 stalls after step S (a test-only knob),
    # so rank 0 waits in step S+1's collective and the ranks can never finish the step the first asked for.
    resumed_from = int(Path(checkpoint).name.split("_")[1])
    stall = resumed_from + 2
    twice = Submit(tmp_path, prepared, env={"TRAINCTL_FAULT_STALL_AT_STEP": f"1:{stall}"})
    wait_for(lambda: stall in [r["step"] for r in _train(twice.run_dir)], 240, f"step {stall}")
    os.killpg(twice.proc.pid, signal.SIGINT)
    wait_for(lambda: "the ranks finish this step" in twice.output(), 10, "trainctl to pass the first Ctrl-C on")
    time.sleep(2)  # the ranks have the first stop; none can act on it
    assert twice.proc.poll() is None, twice.output()[-3000:]
    os.killpg(twice.proc.pid, signal.SIGINT)  # while the ranks are still in that step
    reached = max(r["step"] for r in _train(twice.run_dir))
    t0 = time.monotonic()
    out = twice.finish(timeout=30)
    _no_traceback(out)
    assert twice.proc.returncode == 130 and "at once by a second Ctrl-C, without a new checkpoint" in out, out[-3000:]
    wait_for(lambda: not _ranks(twice.run_dir), 10, "the ranks to die with their launcher")
    print(f"the second Ctrl-C: trainctl and every rank gone in {time.monotonic() - t0:.1f} s")
    steps = sorted(int(p.name.split("_")[1]) for p in Path(checkpoint).parent.glob("step_*"))
    assert steps[-1] <= reached and f"the latest is {Path(checkpoint).parent}/step_{steps[-1]:07d}" in out


def test_killing_submit_or_torchrun_leaves_no_rank_behind(tmp_path, prepared) -> None:
    """A second submit, and a second job started around trainctl, are refused while a run trains.
    SIGKILL to trainctl's group: torchrun gets SIGTERM (its parent-death signal) and the ranks save and stop.
    SIGKILL to torchrun: its ranks die with it (theirs is SIGKILL). (40 steps: the run is never let finish.)"""
    run = Submit(tmp_path, prepared, "train.steps=40")
    run.wait_steps(2)
    again = run_trainctl("submit", *_args(prepared), "train.steps=40", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert again.returncode == 2 and "in use by trainctl submit (pid" in again.stderr, again.stderr
    t0 = time.monotonic()
    second_job = subprocess.run(  # rank 0 of a second job on the same run directory (it decides for its job)
        [sys.executable, "-m", "launch.train", str(run.run_dir)], cwd=tmp_path, capture_output=True, text=True,
        env={**_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}, timeout=180)
    assert second_job.returncode == 9, second_job.stderr[-3000:]  # launch.train.__main__.EXIT_LOCKED
    print(f"the second job stopped {time.monotonic() - t0:.1f} s after it started")
    assert re.search(r"is held by job local \(node \S+, pid \d+", second_job.stdout + second_job.stderr)
    assert Outcome.locked.value in [o["outcome"] for o in _outcomes(run.run_dir)]
    assert _ranks(run.run_dir) and run.proc.poll() is None  # the first run trains on, undisturbed
    os.killpg(run.proc.pid, signal.SIGKILL)
    wait_for(lambda: not _ranks(run.run_dir), 60, "the ranks to save and stop")
    assert _outcomes(run.run_dir)[-1]["outcome"] == "stopped"

    again = Submit(tmp_path, prepared, "train.steps=40")  # the lock went with the launcher: a new submit runs
    again.wait_steps(_outcomes(run.run_dir)[-1]["step"] + 1)
    ranks = _ranks(again.run_dir)
    assert len(ranks) >= 2
    os.kill(again.launcher(), signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: not _ranks(again.run_dir), 10, "the ranks to die with torchrun")
    out = again.finish(timeout=30)
    _no_traceback(out)
    assert "at once by SIGKILL to its launcher" in out and again.proc.returncode == 128 + signal.SIGKILL
    print(f"ranks gone {time.monotonic() - t0:.1f} s after torchrun's SIGKILL")


def test_a_run_that_fails_on_its_ranks_ends_in_their_lines_not_torchrun_s_traceback(tmp_path, prepared) -> None:
    """A run that ends diverged (a NaN weight before the save of step 2): the rank's one line, the launcher's
    one line naming the rank and its exit code, trainctl's summary; no traceback, torchrun's included."""
    env = {**_env(), "TRAINCTL_FAULT_NAN_WEIGHT_AT_STEP": "2"}
    out = subprocess.run([sys.executable, "-m", "launch", "submit", *_args(prepared), "train.steps=4",
                          "train.checkpoint_interval=2", "optim.warmup_steps=2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in text and "ChildFailedError" not in text, text[-4000:]
    assert "trainctl: training diverged: step 2: a parameter is not finite" in text
    assert re.search(r"trainctl: torchrun: rank \d exited with code 6 ", text), text[-3000:]
    assert "(diverged: step 2: a parameter is not finite; no checkpoint written)" in out.stderr
