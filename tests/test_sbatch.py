"""The rendered sbatch script: its #SBATCH lines, its quoting, and its stop/requeue logic.

The script's shell logic is run here by bash with stub ``srun`` and ``scontrol``
on PATH (they record their arguments); tests/test_slurm.py runs the same
scripts on a real Slurm. The stubs stand in only for the commands, and say so.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch.estimate.run import checkpoint_write_seconds
from tests.conftest import run_trainctl, typed


def render(workdir: Path, *overrides: str) -> Path:
    out = run_trainctl("render", *overrides, cwd=workdir)
    assert out.returncode == 0, out.stderr
    return next((workdir / "runs").glob("**/job.sbatch"))


def sbatch_lines(script: Path) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.read_text().splitlines() if line.startswith("#SBATCH")]


def test_h100_two_node_script_asks_for_what_the_plan_needs(workdir: Path) -> None:
    script = render(workdir, "recipe=llama3_8b_pretrain_h100", "cluster.nodes=2", "cluster.partition=batch",
                    "cluster.account=my-lab", "+cluster.directives.constraint='h100&ib'")
    lines = sbatch_lines(script)
    assert lines == sorted(lines)
    options = dict(line.split("=", 1) if "=" in line else (line, "") for line in lines)
    assert options["--nodes"] == "2" and options["--gpus-per-node"] == "8" and options["--ntasks-per-node"] == "1"
    assert "--exclusive" in options and "--requeue" in options
    assert options["--partition"] == "batch" and options["--account"] == "my-lab"
    assert options["--constraint"] == "'h100&ib'"  # quoted as sbatch reads it
    assert options["--output"].startswith(str(workdir / "runs"))
    text = script.read_text()
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in text  # megatron backend
    assert "--nnodes=2 --nproc-per-node=8" in text and "-m launch.train \"$RUN_DIR\" &" in text


def test_signal_comes_a_step_and_two_checkpoint_writes_before_the_limit(workdir: Path) -> None:
    import json

    script = render(workdir, "recipe=llama3_405b_pretrain_h100", "cluster.time_limit=12:00:00")
    plan = json.loads((script.parent / "plan.json").read_text())
    cfg, _ = typed("recipe=llama3_405b_pretrain_h100")
    write_s = checkpoint_write_seconds(cfg, plan["model"]["params_total"])
    assert write_s > 30  # 405B: ~5.7 TB of weights and optimizer state; KillWait's 30 s could not save it
    expected = math.ceil(plan["throughput"]["step_time_s"] + 2 * write_s) + 60
    assert f"--signal=B:USR1@{expected}" in sbatch_lines(script)


def test_a_time_limit_shorter_than_the_stop_warning_is_refused(workdir: Path) -> None:
    out = run_trainctl("render", "recipe=llama3_405b_pretrain_h100", "cluster.time_limit=00:05:00", cwd=workdir)
    assert out.returncode == 2
    assert "cluster.time_limit" in out.stderr and "'00:05:00'" in out.stderr and "fix:" in out.stderr
    assert "Traceback" not in out.stderr and not (workdir / "runs").exists()


def test_a_line_break_in_a_directive_is_refused(workdir: Path) -> None:
    out = run_trainctl("render", "recipe=tiny_slurm", "cluster.partition='a\nb'", cwd=workdir)
    assert out.returncode == 2, out.stdout
    assert "--partition" in out.stderr and "line break" in out.stderr and "fix:" in out.stderr
    assert not (workdir / "runs").exists()


# --- running the script's shell with stub srun/scontrol -----------------------------------

STUB_SRUN = """#!/bin/bash
# stub srun (no Slurm in this test): records its arguments, then behaves as $SRUN_MODE says
printf '%s\\n' "$@" > "$STUB_LOG/srun.args"
case "$SRUN_MODE" in
  ok) exit 0 ;;
  crash) exit 1 ;;
  wait) trap 'echo USR1 > "$STUB_LOG/srun.signal"; exit 1' USR1
        trap 'echo TERM > "$STUB_LOG/srun.signal"; exit 143' TERM
        while :; do sleep 0.1; done ;;
esac
"""
STUB_SCONTROL = """#!/bin/bash
# stub scontrol (no Slurm in this test)
echo "$*" >> "$STUB_LOG/scontrol.calls"
case "$1 $2" in
  "show hostnames") echo node1 ;;
  "show node") echo "NodeName=node1 Arch=x86_64 NodeAddr=10.0.0.7 NodeHostName=node1" ;;
esac
exit 0
"""


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_script(script: Path, stubs: Path, mode: str, *, restarts: int = 0, usr1_after: float | None = None,
               cwd: Path, sig: signal.Signals = signal.SIGUSR1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(stubs), "SRUN_MODE": mode,
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_RESTART_COUNT": str(restarts)}
    proc = subprocess.Popen(["bash", str(script)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if usr1_after is not None:
        time.sleep(usr1_after)
        proc.send_signal(sig)  # what `scancel --signal=USR1 --batch` (or plain scancel: TERM) does
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_config_values_cannot_run_commands(workdir: Path, stubs: Path) -> None:
    evil = "$(touch pwned)"
    script = render(workdir, "recipe=tiny_slurm", "name=evil", f"cluster.partition='{evil}'",
                    f"cluster.account='`touch pwned2`'", f"+cluster.env.EVIL='{evil}; touch pwned3'",
                    "cluster.container_image='img;touch pwned4'", f"cluster.container_mounts=['{evil}:/x']",
                    f"+cluster.directives.comment='\"; touch pwned5'", f"cluster.python='python3 {evil}'")
    result = run_script(script, stubs, "ok", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert not list(workdir.glob("pwned*")) and not list(script.parent.glob("pwned*"))
    args = (stubs / "srun.args").read_text().splitlines()
    assert f"--container-mounts={evil}:/x,{script.parent}:{script.parent}" in args
    assert "--container-image=img;touch pwned4" in args and f"python3 {evil}" in args
    assert "--rdzv-endpoint=10.0.0.7:24242" in args  # first node NodeAddr; base port + job id 4242
    assert args[-1] == str(script.parent)
    assert f"--partition='{evil}'" in sbatch_lines(script)


def test_a_finished_step_is_not_requeued(workdir: Path, stubs: Path) -> None:
    script = render(workdir, "recipe=tiny_slurm")
    result = run_script(script, stubs, "ok", cwd=workdir)
    assert result.returncode == 0
    assert "requeue" not in (stubs / "scontrol.calls").read_text()
    assert "finished (exit 0): done, not requeued" in (script.parent / "job.log").read_text()


def test_usr1_is_forwarded_to_the_step_and_the_job_requeues(workdir: Path, stubs: Path) -> None:
    script = render(workdir, "recipe=tiny_slurm")
    result = run_script(script, stubs, "wait", usr1_after=1.5, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert (stubs / "srun.signal").read_text().strip() == "USR1"  # the trap reached srun while bash waited
    assert "requeue 4242" in (stubs / "scontrol.calls").read_text()
    log = (script.parent / "job.log").read_text()
    # tiny_slurm: 1 job and ~0 expected failures, so the plan's limit is the slack of 10
    assert "got SIGUSR1" in log and "stopped after SIGUSR1" in log and "requeueing (restart 1 of at most 10)" in log


def test_sigterm_is_forwarded_but_not_requeued(workdir: Path, stubs: Path) -> None:
    """scancel sends SIGTERM too: requeueing on it would bring a cancelled job back."""
    script = render(workdir, "recipe=tiny_slurm")
    result = run_script(script, stubs, "wait", usr1_after=1.5, sig=signal.SIGTERM, cwd=workdir)
    assert result.returncode == 143
    assert (stubs / "srun.signal").read_text().strip() == "TERM"
    assert "requeue" not in (stubs / "scontrol.calls").read_text()
    assert "not requeued by this script" in (script.parent / "job.log").read_text()


def test_requeues_stop_at_the_configured_limit(workdir: Path, stubs: Path) -> None:
    script = render(workdir, "recipe=tiny_slurm", "cluster.max_requeues=2")
    result = run_script(script, stubs, "wait", restarts=2, usr1_after=1.5, cwd=workdir)
    assert result.returncode == 1
    assert "requeue" not in (stubs / "scontrol.calls").read_text()
    assert "NOT requeued: already requeued 2 time(s), cluster.max_requeues=2" in (script.parent / "job.log").read_text()


def test_a_crash_is_requeued_a_limited_number_of_times_and_counted(workdir: Path, stubs: Path) -> None:
    script = render(workdir, "recipe=tiny_slurm", "cluster.max_crash_requeues=2")
    codes = [run_script(script, stubs, "crash", restarts=n, cwd=workdir).returncode for n in range(3)]
    assert codes == [0, 0, 1]  # requeued twice, then the job fails with the step's exit code
    assert (stubs / "scontrol.calls").read_text().count("requeue 4242") == 2
    log = (script.parent / "job.log").read_text()
    assert "crash 1 of at most 2 requeued" in log and "crash 2 of at most 2 requeued" in log
    assert re.search(r"crash 3: NOT requeued, cluster.max_crash_requeues=2", log)
    assert (script.parent / "job.crashes.4242").read_text().strip() == "3"


def test_prepare_array_values_cannot_run_commands(workdir: Path, stubs: Path, monkeypatch) -> None:
    """prepare.sbatch (trainctl prepare data.prepare_on=slurm) quotes what the job script does; task 1 runs source 1."""
    from launch.executors.sbatch import render_prepare

    evil = "$(touch pwned)"
    cfg, _ = typed("recipe=tiny_slurm", f"cluster.partition='{evil}'", f"+cluster.env.EVIL='{evil}; touch pwned3'",
                   "cluster.container_image='img;touch pwned4'", f"cluster.python='python3 {evil}'")
    script = workdir / "prepare.sbatch"
    script.write_text(render_prepare(cfg, workdir, ["prose", f"code{evil}"]))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # run_script passes the environment on
    result = run_script(script, stubs, "ok", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert not list(workdir.glob("pwned*"))
    args = (stubs / "srun.args").read_text().splitlines()
    assert args[-3:] == ["launch.data.array", str(workdir), f"code{evil}"]
    assert f"python3 {evil}" in args and "--container-image=img;touch pwned4" in args
    assert "--array=0-1" in sbatch_lines(script) and not any("gpus" in line for line in sbatch_lines(script))
