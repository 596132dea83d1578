"""The rendered sbatch script: its #SBATCH lines, its quoting, and its stop/requeue logic.

The script's shell logic is run here by bash with stub ``srun`` and ``scontrol``
on PATH (they record their arguments); tests/test_slurm.py runs the same
scripts on a real Slurm. The stubs stand in only for the commands, and say so:
the stub srun writes its outcome record with trainctl's own writer
(``launch.record.outcome.write``), as the trainer's rank would.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.estimate.run import checkpoint_write_seconds
from tests.conftest import PYTHONPATH, ROOT, run_trainctl, typed


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
# stub srun (no Slurm in this test). The node health step runs the real launch.train.health
# (HEALTH_MODE=bare: under /usr/bin/python3 without trainctl, as a bare image would).
# The training step records its arguments, then behaves as $SRUN_MODE says, writing the
# outcome record a rank would (the last argument is the run directory).
run_dir=${@: -1}
if printf '%s\\n' "$@" | grep -qx launch.train.health; then
  printf '%s\\n' "$@" > "$STUB_LOG/srun.health.args"
  if [ "${HEALTH_MODE:-}" = bare ]; then exec env -u PYTHONPATH /usr/bin/python3 -m launch.train.health "$run_dir"; fi
  exec "$STUB_PYTHON" -m launch.train.health "$run_dir"
fi
printf '%s\\n' "$@" > "$STUB_LOG/srun.args"
outcome() {
  "$STUB_PYTHON" -c 'import sys, pathlib; from launch.record.outcome import write
write(pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3])' "$run_dir" "$1" "$2"
}
case "$SRUN_MODE" in
  ok) outcome done "trained 20 steps"; exit 0 ;;
  crash) outcome crash 'RuntimeError: boom "quoted" \\ back'; exit 1 ;;
  silent) exit 1 ;;
  config) outcome config "data.path=/gone: no prepared shards"; exit 1 ;;
  node) outcome node "no CUDA device"; exit 1 ;;
  wait) trap 'outcome stopped "stopped by SIGUSR1"; echo USR1 > "$STUB_LOG/srun.signal"; exit 1' USR1
        trap 'outcome stopped "stopped by SIGTERM"; echo TERM > "$STUB_LOG/srun.signal"; exit 143' TERM
        while :; do sleep 0.1; done ;;
esac
"""
STUB_SCONTROL = """#!/bin/bash
# stub scontrol (no Slurm in this test)
echo "$*" >> "$STUB_LOG/scontrol.calls"
case "$1 $2" in
  "show hostnames") tr ',' '\\n' <<< "$3" ;;
  "show node") echo "NodeName=node1 Arch=x86_64 NodeAddr=10.0.0.7 NodeHostName=node1" ;;
esac
exit 0
"""
STUB_SINFO = """#!/bin/bash
# stub sinfo (no Slurm in this test): the partition's nodes and states, from $STUB_NODES
echo "$*" >> "$STUB_LOG/sinfo.calls"
printf '%s\\n' "${STUB_NODES:-node1 mix
node2 idle}"
"""


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("sinfo", STUB_SINFO)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_script(script: Path, stubs: Path, mode: str, *, restarts: int = 0, usr1_after: float | None = None,
               cwd: Path, sig: signal.Signals = signal.SIGUSR1, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(stubs), "SRUN_MODE": mode,
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_PARTITION": "debug", "SLURMD_NODENAME": "node1", "SLURM_RESTART_COUNT": str(restarts),
           "STUB_PYTHON": sys.executable, "PYTHONPATH": PYTHONPATH, **(env or {})}
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
                    "cluster.account='`touch pwned2`'", f"+cluster.env.EVIL='{evil}; touch pwned3'",
                    "cluster.container_image='img;touch pwned4'", f"cluster.container_mounts=['{evil}:/x']",
                    "+cluster.directives.comment='\"; touch pwned5'", f"cluster.python='python3 {evil}'")
    result = run_script(script, stubs, "ok", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert not list(workdir.glob("pwned*")) and not list(script.parent.glob("pwned*"))
    args = (stubs / "srun.args").read_text().splitlines()
    # the user's mount as given, then what the config names (the checkout this trainctl runs from, the run)
    assert f"--container-mounts={evil}:/x,{ROOT}:{ROOT},{script.parent}:{script.parent}" in args
    assert "--container-image=img;touch pwned4" in args and f"python3 {evil}" in args
    assert "--rdzv-endpoint=10.0.0.7:24242" in args  # first node NodeAddr; base port + job id 4242
    assert args[-1] == str(script.parent)
    assert f"--partition='{evil}'" in sbatch_lines(script)


def test_a_finished_step_is_not_requeued(workdir: Path, stubs: Path) -> None:
    script = render(workdir, "recipe=tiny_slurm")
    result = run_script(script, stubs, "ok", cwd=workdir)
    assert result.returncode == 0
    assert "requeue" not in (stubs / "scontrol.calls").read_text()
    assert re.search(r"job step finished on \S+ \(trained 20 steps\): done, not requeued",
                     (script.parent / "job.log").read_text())


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
    assert "after SIGTERM (exit 143): cancelled, preempted" in (script.parent / "job.log").read_text()


def test_requeues_stop_at_the_configured_limit(workdir: Path, stubs: Path) -> None:
    script = render(workdir, "recipe=tiny_slurm", "cluster.max_requeues=2")
    result = run_script(script, stubs, "wait", restarts=2, usr1_after=1.5, cwd=workdir)
    assert result.returncode == 1
    assert "requeue" not in (stubs / "scontrol.calls").read_text()
    assert "NOT requeued: already requeued 2 time(s), cluster.max_requeues=2" in (script.parent / "job.log").read_text()


def test_crashes_in_a_row_without_a_new_checkpoint_are_budgeted(workdir: Path, stubs: Path) -> None:
    """cluster.max_crash_requeues=2: a third crash in a row with no checkpoint between them ends the job."""
    script = render(workdir, "recipe=tiny_slurm", "cluster.max_crash_requeues=2")
    run_dir = script.parent
    modes = ["crash", "silent", "crash"]
    codes = [run_script(script, stubs, mode, restarts=n, cwd=workdir).returncode for n, mode in enumerate(modes)]
    assert codes == [0, 0, 1]  # requeued twice, then the job fails with the step's exit code
    assert (stubs / "scontrol.calls").read_text().count("requeue 4242") == 2
    log = (run_dir / "job.log").read_text()
    assert 'crashed on ' in log and 'RuntimeError: boom \\"quoted\\" \\\\ back; crash 1 in a row' in log
    assert "failed without an outcome record (exit 1; killed" in log and "crash 2 in a row" in log
    assert re.search(r"crash 3 in a row without a new checkpoint \(latest: none\); "
                     r"cluster.max_crash_requeues=2; not requeued", log)
    assert (run_dir / "job.crashes.4242").read_text().split() == ["3"]


def test_a_crash_after_a_new_checkpoint_starts_the_count_again(workdir: Path, stubs: Path) -> None:
    """A crash that made progress is no reason to give up: only crashes without a checkpoint between them count."""
    script = render(workdir, "recipe=tiny_slurm", "cluster.max_crash_requeues=1")
    ckpt = script.parent / "checkpoints"
    ckpt.mkdir()
    codes = []
    for n in range(4):  # every job step writes a checkpoint, then crashes
        (ckpt / "latest").write_text(f"step_{10 * (n + 1):07d}")
        codes.append(run_script(script, stubs, "crash", restarts=n, cwd=workdir).returncode)
    assert codes == [0, 0, 0, 0]
    log = (script.parent / "job.log").read_text()
    assert log.count("crash 1 in a row without a new checkpoint") == 4 and "latest: step_0000040" in log
    assert run_script(script, stubs, "crash", restarts=4, cwd=workdir).returncode == 1  # no new checkpoint
    assert "crash 2 in a row without a new checkpoint (latest: step_0000040); cluster.max_crash_requeues=1" \
        in (script.parent / "job.log").read_text()


def test_the_crash_budget_reads_a_moved_checkpoint_dir(workdir: Path, stubs: Path) -> None:
    elsewhere = workdir / "ckpt-elsewhere"
    script = render(workdir, "recipe=tiny_slurm", f"train.checkpoint_dir={elsewhere}")
    assert f"CKPT_DIR={elsewhere}" in script.read_text()
    elsewhere.mkdir()
    (elsewhere / "latest").write_text("step_0000007")
    assert run_script(script, stubs, "silent", cwd=workdir).returncode == 0
    assert "(latest: step_0000007)" in (script.parent / "job.log").read_text()


def test_a_configuration_error_on_the_node_is_not_requeued(workdir: Path, stubs: Path) -> None:
    script = render(workdir, "recipe=tiny_slurm")
    result = run_script(script, stubs, "config", cwd=workdir)
    assert result.returncode == 1
    assert "requeue" not in (stubs / "scontrol.calls").read_text()
    assert re.search(r"configuration error found on \S+: data.path=/gone: no prepared shards \(a requeue would "
                     r"fail the same way: fix it and submit again\); not requeued", (script.parent / "job.log").read_text())


def test_an_unhealthy_node_is_requeued_without_it_and_not_counted_as_a_crash(workdir: Path, stubs: Path) -> None:
    """The trainer's own node outcome (torch sees no GPU): requeued, the node left out after the requeue."""
    script = render(workdir, "recipe=tiny_slurm", "cluster.max_crash_requeues=0")
    assert run_script(script, stubs, "node", cwd=workdir).returncode == 0
    calls = (stubs / "scontrol.calls").read_text().splitlines()
    # Slurm refuses ExcNodeList on a running job: it is set after the requeue (tested on Slurm 22.05).
    assert calls[-2:] == ["requeue 4242", "update JobId=4242 ExcNodeList=node1"]
    assert "node unhealthy on node1: no CUDA device; requeueing (restart 1 of at most 10), leaving out node1" \
        in (script.parent / "job.log").read_text()
    assert (script.parent / "job.excluded.4242").read_text() == "node1\tno CUDA device\n"
    assert not (script.parent / "job.crashes.4242").exists()


def test_a_failed_health_check_skips_torchrun_and_leaves_the_node_out(workdir: Path, stubs: Path) -> None:
    """The real launch.train.health under the stub srun, failed by the test-only knob."""
    script = render(workdir, "recipe=tiny_slurm")
    result = run_script(script, stubs, "ok", cwd=workdir, env={"TRAINCTL_FAULT_UNHEALTHY_NODES": "node9,node1"})
    assert result.returncode == 0, result.stderr
    assert not (stubs / "srun.args").exists()  # torchrun never started
    assert (stubs / "srun.health.args").read_text().splitlines()[-3:] == ["-m", "launch.train.health",
                                                                         str(script.parent)]
    log = (script.parent / "job.log").read_text()
    knob = "node1 is listed in TRAINCTL_FAULT_UNHEALTHY_NODES=node9,node1 (test-only fault knob)"
    assert f"node1 UNHEALTHY: {knob}" in log
    assert f"node unhealthy on node1: health check: {knob}; requeueing (restart 1 of at most 10), leaving out " \
           "node1" in log
    assert "update JobId=4242 ExcNodeList=node1" in (stubs / "scontrol.calls").read_text()


def test_a_healthy_node_says_so_in_one_line_and_trains(workdir: Path, stubs: Path) -> None:
    script = render(workdir, "recipe=tiny_slurm")
    assert run_script(script, stubs, "ok", cwd=workdir).returncode == 0
    log = (script.parent / "job.log").read_text()
    assert re.search(r"node1 healthy: GPUs not checked \(cluster.gpu.name=cpu: CPU processes\); network not "
                     r"checked \(cluster.network=none.*\); run dir, data cache, checkpoints \(\S+\): [\d.]+ GiB free "
                     r"\(expected >= [\d.]+\)\n", log), log
    assert "launch.train" in (stubs / "srun.args").read_text()  # then torchrun ran
    assert "update" not in (stubs / "scontrol.calls").read_text()


def test_an_interpreter_without_trainctl_stops_the_job_as_a_configuration_error(workdir: Path, stubs: Path) -> None:
    """/usr/bin/python3 without trainctl on its path, as a stock image's: found by the health step, not requeued."""
    from launch.record import outcome

    script = render(workdir, "recipe=tiny_slurm")
    result = run_script(script, stubs, "ok", cwd=workdir, env={"HEALTH_MODE": "bare"})
    assert result.returncode == 1
    assert not (stubs / "srun.args").exists() and "requeue" not in (stubs / "scontrol.calls").read_text()
    assert "No module named 'launch'" in result.stderr  # the step's own output, in the job's slurm log
    record = outcome.read(script.parent / "outcomes/4242.0.json")  # written by the script, read by trainctl
    assert record.outcome.value == "config" and record.node == "node1"
    assert record.cause.startswith(f"cluster.python {sys.executable} on the nodes cannot import trainctl: install "
                                   "trainctl[train] into it") and record.cause.endswith("(No module named 'launch')")
    assert f"configuration error found on node1: {record.cause} (a requeue would fail the same way" \
        in (script.parent / "job.log").read_text()


def test_the_image_without_trainctl_is_named(workdir: Path) -> None:
    from launch.executors.sbatch import health_values

    cfg, _ = typed("recipe=tiny_slurm", "cluster.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
                   "cluster.python=python")
    assert health_values(cfg, [])["no_trainctl_cause"] == (
        "cluster.python python in image nvcr.io/nvidia/pytorch:25.01-py3 cannot import trainctl: build the image "
        "from slurm/Containerfile or install trainctl[train] there")


def test_a_crash_requeue_leaves_out_the_crashed_rank_s_node(workdir: Path, stubs: Path) -> None:
    script = render(workdir, "recipe=tiny_slurm", "cluster.max_crash_requeues=3")
    assert run_script(script, stubs, "crash", cwd=workdir, env={"SLURMD_NODENAME": "node2"}).returncode == 0
    assert "update JobId=4242 ExcNodeList=node2" in (stubs / "scontrol.calls").read_text()
    assert (script.parent / "job.excluded.4242").read_text().startswith("node2\tcrash: RuntimeError: boom")
    assert run_script(script, stubs, "silent", restarts=1, cwd=workdir).returncode == 0  # no record: no node
    assert (stubs / "scontrol.calls").read_text().count("update") == 1


def test_exclusions_are_capped_oldest_first(workdir: Path, stubs: Path) -> None:
    script = render(workdir, "recipe=tiny_slurm", "cluster.max_excluded_nodes=2")
    nodes = "\n".join(f"node{i} idle" for i in range(1, 6))
    for restart, node in enumerate(["node1", "node2", "node3"]):
        run_script(script, stubs, "node", restarts=restart, cwd=workdir,
                   env={"SLURMD_NODENAME": node, "STUB_NODES": nodes})
    assert (stubs / "scontrol.calls").read_text().splitlines()[-1] == "update JobId=4242 ExcNodeList=node2,node3"
    assert "node1 no longer left out: at most cluster.max_excluded_nodes=2, the oldest goes first" \
        in (script.parent / "job.log").read_text()
    assert [line.split("\t")[0] for line in (script.parent / "job.excluded.4242").read_text().splitlines()] == \
        ["node2", "node3"]


def test_exclusions_never_leave_the_partition_fewer_usable_nodes_than_the_job_needs(workdir: Path,
                                                                                    stubs: Path) -> None:
    """A 2-node job on node1-3 (node4 down, node5 drained): leaving out node1, then node2, would leave
    one usable node, so node1 comes back."""
    script = render(workdir, "recipe=tiny_slurm")
    nodes = "node1 alloc\nnode2 alloc\nnode3 idle\nnode4 down*\nnode5 drain"
    for restart, node in enumerate(["node1", "node2"]):
        run_script(script, stubs, "node", restarts=restart, cwd=workdir,
                   env={"SLURMD_NODENAME": node, "STUB_NODES": nodes, "SLURM_JOB_NUM_NODES": "2"})
    calls = (stubs / "scontrol.calls").read_text().splitlines()
    assert [c for c in calls if c.startswith("update")] == ["update JobId=4242 ExcNodeList=node1",
                                                            "update JobId=4242 ExcNodeList=node2"]
    assert "node1 no longer left out: partition debug would have 1 usable node(s) for a job of 2" \
        in (script.parent / "job.log").read_text()
    assert "-p debug" in (stubs / "sinfo.calls").read_text()


def test_the_submission_s_own_exclude_is_kept_and_counted(workdir: Path, stubs: Path) -> None:
    """cluster.directives.exclude=node3: every ExcNodeList keeps it, and node3 is no usable node."""
    script = render(workdir, "recipe=tiny_slurm", "+cluster.directives.exclude=node3")
    nodes = "node1 mix\nnode2 idle\nnode3 idle"
    run_script(script, stubs, "node", cwd=workdir, env={"STUB_NODES": nodes, "SLURM_JOB_NUM_NODES": "2"})
    assert "update JobId=4242 ExcNodeList=node3" in (stubs / "scontrol.calls").read_text().splitlines()
    assert "node1 no longer left out: partition debug would have 1 usable node(s) for a job of 2" \
        in (script.parent / "job.log").read_text()
    run_script(script, stubs, "node", restarts=1, cwd=workdir, env={"STUB_NODES": nodes})
    assert (stubs / "scontrol.calls").read_text().splitlines()[-1] == "update JobId=4242 ExcNodeList=node3,node1"


def test_max_excluded_nodes_0_leaves_no_node_out(workdir: Path, stubs: Path) -> None:
    script = render(workdir, "recipe=tiny_slurm", "cluster.max_excluded_nodes=0")
    assert run_script(script, stubs, "node", cwd=workdir).returncode == 0
    assert "update" not in (stubs / "scontrol.calls").read_text()
    assert "node1 not left out: cluster.max_excluded_nodes=0" in (script.parent / "job.log").read_text()


def test_each_job_step_reads_its_own_record(workdir: Path, stubs: Path) -> None:
    """A record of an earlier step (restart 0: stopped) is not this step's (restart 1: killed, no record)."""
    script = render(workdir, "recipe=tiny_slurm", "cluster.max_crash_requeues=0")
    assert run_script(script, stubs, "wait", usr1_after=1.5, cwd=workdir).returncode == 0
    assert run_script(script, stubs, "silent", restarts=1, cwd=workdir).returncode == 1
    assert sorted(p.name for p in (script.parent / "outcomes").iterdir()) == ["4242.0.json"]
    assert "failed without an outcome record" in (script.parent / "job.log").read_text()


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
