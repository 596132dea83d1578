"""trainctl against a real Slurm: slurmctld + 2 slurmd on this machine (slurm/cluster.sh).

The jobs are real: sbatch queues them, slurmd starts the batch script, srun
starts torchrun, torchrun starts 2 CPU ranks of ``python -m launch.train``,
which train the tiny model with DeepSpeed over gloo, or (``train.rank_check_s``,
for the tests of the scheduling side) run the rank check. Only the GPUs are
fake (gres entries pointing at /dev/null): there are none here.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from tests.conftest import job_field, run_trainctl, slurm, wait_for


def submit(workdir: Path, env: dict, *overrides: str) -> str:
    out = run_trainctl("submit", *overrides, cwd=workdir, env=env)
    assert out.returncode == 0, out.stderr
    return re.search(r"submitted job (\d+)", out.stdout).group(1)


def state(env: dict, job_id: str) -> str:
    return job_field(env, job_id, "JobState")


def wait_state(env: dict, job_id: str, *states: str, timeout: float = 120) -> None:
    wait_for(lambda: state(env, job_id) in states, timeout, f"job {job_id} to be {'/'.join(states)}")


def test_tiny_slurm_runs_to_completed_and_status_says_so(workdir: Path, slurm_env: dict) -> None:
    job = submit(workdir, slurm_env, "recipe=tiny_slurm", "train.rank_check_s=1")
    run_dir = workdir / "runs/tiny_slurm"
    record = json.loads((run_dir / "job.json").read_text())["jobs"][-1]
    assert record["job_id"] == job
    assert record["script_sha256"] == hashlib.sha256((run_dir / "job.sbatch").read_bytes()).hexdigest()
    wait_state(slurm_env, job, "COMPLETED", "FAILED")
    assert state(slurm_env, job) == "COMPLETED", (run_dir / f"slurm-{job}.log").read_text()
    log = (run_dir / f"slurm-{job}.log").read_text()
    assert "rank check done: 2 rank(s)" in log and "rank 1/2 ok" in log
    out = run_trainctl("status", "runs/tiny_slurm", cwd=workdir, env=slurm_env)
    assert out.returncode == 0 and "COMPLETED" in out.stdout and "done, not requeued" in out.stdout


def test_a_running_run_is_not_submitted_twice_and_cancel_ends_it(workdir: Path, slurm_env: dict) -> None:
    job = submit(workdir, slurm_env, "recipe=tiny_slurm", "train.rank_check_s=300")
    script = workdir / "runs/tiny_slurm/job.sbatch"
    before = script.read_bytes()
    again = run_trainctl("submit", "recipe=tiny_slurm", "train.rank_check_s=2", cwd=workdir, env=slurm_env)
    assert again.returncode == 2
    assert f"its job {job} is still" in again.stderr and "trainctl cancel" in again.stderr
    assert script.read_bytes() == before  # the running job's records are untouched
    replan = run_trainctl("plan", "recipe=tiny_slurm", "train.steps=99", cwd=workdir, env=slurm_env)
    assert replan.returncode == 2 and "still" in replan.stderr
    assert "steps: 20" in (workdir / "runs/tiny_slurm/config.yaml").read_text()
    out = run_trainctl("cancel", "runs/tiny_slurm", cwd=workdir, env=slurm_env)
    assert out.returncode == 0 and f"cancelled job {job}" in out.stdout
    wait_state(slurm_env, job, "CANCELLED")
    # A finished run is submitted again (it resumes from its checkpoints once the trainer lands).
    second = submit(workdir, slurm_env, "recipe=tiny_slurm", "train.rank_check_s=1")
    jobs = json.loads((workdir / "runs/tiny_slurm/job.json").read_text())["jobs"]
    assert [j["job_id"] for j in jobs] == [job, second]
    wait_state(slurm_env, second, "COMPLETED", "FAILED")


def test_usr1_reaches_the_ranks_and_the_job_requeues_and_starts_again(workdir: Path, slurm_env: dict) -> None:
    job = submit(workdir, slurm_env, "recipe=tiny_slurm", "train.rank_check_s=300")
    run_dir = workdir / "runs/tiny_slurm"
    log = run_dir / f"slurm-{job}.log"
    wait_for(lambda: log.exists() and "rank 0" not in log.read_text() and "starting on" in log.read_text(), 60,
             "the job to start")
    # Wait until the ranks run (torch imported, process group up) so the signal has somewhere to go.
    wait_for(lambda: len(re.findall(r"all_reduce|Setting OMP", log.read_text())) > 0, 60, "torchrun to start")
    import time

    time.sleep(8)
    slurm(slurm_env, "scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@T does at T
    wait_for(lambda: "requeueing (restart 1" in (run_dir / "job.log").read_text(), 90, "the script to requeue")
    assert "rank check stopped by SIGUSR1" in log.read_text()  # through srun and torchrun to the ranks
    wait_state(slurm_env, job, "PENDING")
    assert job_field(slurm_env, job, "Restarts") == "1"
    # The test cluster's credential lifetime (cred_expire=10) is how long a requeued job waits: ~10 s.
    wait_for(lambda: "restart 1, run dir" in (run_dir / "job.log").read_text(), 60, "the requeued job to start")
    out = run_trainctl("status", "runs/tiny_slurm", cwd=workdir, env=slurm_env)
    assert re.search(rf"{job}\s+RUNNING\s+\S+\s+1\s", out.stdout), out.stdout  # requeues: 1
    assert run_trainctl("cancel", "runs/tiny_slurm", cwd=workdir, env=slurm_env).returncode == 0
    wait_state(slurm_env, job, "CANCELLED")


def test_the_h100_two_node_script_passes_sbatch_test_only(workdir: Path, slurm_env: dict) -> None:
    out = run_trainctl("submit", "recipe=llama3_8b_pretrain_h100", "cluster.nodes=2", "cluster.partition=debug",
                       "train.rank_check_s=1", "submit.preflight=true", cwd=workdir, env=slurm_env)
    assert out.returncode == 0, out.stderr
    assert "preflight" in out.stdout and "node[1-2]" in out.stdout
    script = (workdir / "runs/llama3_8b_pretrain_h100/job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script and "#SBATCH --exclusive" in script
    assert not (workdir / "runs/llama3_8b_pretrain_h100/job.json").exists()  # nothing queued


def test_a_request_slurm_refuses_exits_2_with_its_message(workdir: Path, slurm_env: dict) -> None:
    out = run_trainctl("submit", "recipe=tiny_slurm", "cluster.partition=nosuch", cwd=workdir, env=slurm_env)
    assert out.returncode == 2
    assert "invalid partition" in out.stderr.lower() and "fix:" in out.stderr and "Traceback" not in out.stderr
    assert not list(workdir.glob("runs/**/job.json"))


def test_controller_down_or_no_sbatch_exits_2_and_claims_no_job(workdir: Path, slurm_env: dict,
                                                                tmp_path: Path) -> None:
    conf = Path(slurm_env["SLURM_CONF"]).read_text()
    down = tmp_path / "down.conf"
    down.write_text(re.sub(r"(?m)^SlurmctldPort=\d+", "SlurmctldPort=1", conf))
    out = run_trainctl("submit", "recipe=tiny_slurm", cwd=workdir, env={**slurm_env, "SLURM_CONF": str(down)})
    assert out.returncode == 2 and "controller" in out.stderr and "Traceback" not in out.stderr
    out = run_trainctl("submit", "recipe=tiny_slurm", cwd=workdir, env={**slurm_env, "PATH": "/nonexistent"})
    assert out.returncode == 2 and "sbatch: not found on PATH" in out.stderr
    assert not list(workdir.glob("runs/**/job.json"))


def test_a_sweep_submits_one_job_per_point_with_its_own_resources(workdir: Path, slurm_env: dict) -> None:
    out = run_trainctl("submit", "-m", "recipe=tiny_slurm", "train.rank_check_s=1", "cluster.gpus_per_node=1,2",
                       cwd=workdir, env=slurm_env)
    assert out.returncode == 0, out.stderr
    points = json.loads((workdir / "runs/tiny_slurm/sweep.json").read_text())["points"]
    assert [p["plan"]["world_size"] for p in points] == [1, 2]
    for p in points:
        assert f"--gpus-per-node={p['plan']['world_size']}" in (Path(p["run_dir"]) / "job.sbatch").read_text()
        wait_state(slurm_env, p["job_id"], "COMPLETED", "FAILED")
    status = run_trainctl("status", "runs/tiny_slurm", cwd=workdir, env=slurm_env)
    assert status.stdout.count("COMPLETED") == 2, status.stdout


# A pipeline that trains every stage, chained afterok: tests/test_chain.py.


def test_stages_after_a_failed_stage_never_run_and_status_says_so(workdir: Path, slurm_env: dict) -> None:
    out = run_trainctl("submit", "recipe=tiny_slurm_pipeline", "train.rank_check_s=1", "cluster.python=/bin/false",
                       "cluster.max_crash_requeues=0", cwd=workdir, env=slurm_env)
    assert out.returncode == 0, out.stderr
    stages = json.loads((workdir / "runs/tiny_slurm_pipeline/pipeline.json").read_text())["stages"]
    wait_state(slurm_env, stages[0]["job_id"], "FAILED")
    wait_for(lambda: job_field(slurm_env, stages[1]["job_id"], "Reason") == "DependencyNeverSatisfied", 60,
             "Slurm to see the dependency can never be met")
    status = run_trainctl("status", "runs/tiny_slurm_pipeline", cwd=workdir, env=slurm_env).stdout
    assert status.count("NEVER RUNS") == 3 and "max_crash_requeues=0" in status, status
    assert run_trainctl("cancel", "runs/tiny_slurm_pipeline", cwd=workdir, env=slurm_env).returncode == 0


def test_a_configuration_error_found_on_the_node_stops_the_job_without_a_requeue(workdir: Path,
                                                                                 slurm_env: dict) -> None:
    """No prepared data where the job looks (as when it is removed after submit): torchrun exits 1 like a
    crash, but the rank's outcome record says config, so the script does not requeue a job that would fail
    the same way."""
    job = submit(workdir, slurm_env, "recipe=tiny_slurm", f"data.prepared_dir={workdir}/gone")
    run_dir = workdir / "runs/tiny_slurm"
    log_file = run_dir / "job.log"
    wait_for(lambda: log_file.exists() and "requeue" in log_file.read_text(), 180, "the script's decision")
    log = (run_dir / "job.log").read_text()
    assert re.search(r"configuration error found on \S+: the prepared data is missing .*gone.*; not requeued", log), log
    wait_state(slurm_env, job, "FAILED")
    assert job_field(slurm_env, job, "Restarts") == "0" and not (run_dir / f"job.crashes.{job}").exists()
    status = run_trainctl("status", "runs/tiny_slurm", cwd=workdir, env=slurm_env).stdout
    assert re.search(r"config on \S+ \(rank \d\): the prepared data", status), status


def test_a_node_failing_its_health_check_is_left_out_of_the_requeue(workdir: Path, slurm_env: dict) -> None:
    """The test-only knob fails node1's health check: the job is requeued without node1 and completes on node2.

    Other jobs may share this cluster, so the job is submitted held and kept off node2 by hand until it
    has started on node1; the script's own ExcNodeList=node1 replaces that on the requeue.
    """
    env = {**slurm_env, "TRAINCTL_FAULT_UNHEALTHY_NODES": "node1"}
    job = submit(workdir, env, "recipe=tiny_slurm", "train.rank_check_s=1", "+cluster.directives.hold=''")
    slurm(slurm_env, "scontrol", "update", f"JobId={job}", "ExcNodeList=node2")
    slurm(slurm_env, "scontrol", "release", job)
    run_dir = workdir / "runs/tiny_slurm"
    wait_state(slurm_env, job, "COMPLETED", "FAILED", timeout=90)  # the requeued job waits ~10 s to start
    log = (run_dir / "job.log").read_text()
    assert state(slurm_env, job) == "COMPLETED", log
    assert job_field(slurm_env, job, "Restarts") == "1" and job_field(slurm_env, job, "NodeList") == "node2"
    assert job_field(slurm_env, job, "ExcNodeList") == "node1"
    knob = "node1 is listed in TRAINCTL_FAULT_UNHEALTHY_NODES=node1 (test-only fault knob)"
    lines = [line.split(": ", 2)[-1] for line in log.splitlines()]
    assert lines[:3] == [f"starting on 1 node(s) (node1), restart 0, run dir {run_dir}", f"node1 UNHEALTHY: {knob}",
                         f"node unhealthy on node1: health check: {knob}; requeueing (restart 1 of at most 10), "
                         "leaving out node1"], log
    assert lines[3].startswith("starting on 1 node(s) (node2), restart 1") and lines[4].startswith("node2 healthy: ")
    assert lines[5] == "job step finished on node2 (rank check done): done, not requeued"
    assert (run_dir / f"job.excluded.{job}").read_text() == f"node1\thealth check: {knob}\n"
    out = run_trainctl("status", "runs/tiny_slurm", cwd=workdir, env=slurm_env).stdout
    assert "nodes left out" in out and re.search(r"\snode1: health check: ", out), out


def test_an_interpreter_without_trainctl_stops_the_job_in_its_first_seconds(workdir: Path, slurm_env: dict) -> None:
    """The system python3, its path cleared by a setup line (so submit's own probe is skipped): the health
    step cannot import trainctl; the script records a configuration error and does not requeue."""
    job = submit(workdir, slurm_env, "recipe=tiny_slurm", "train.rank_check_s=1", "cluster.python=/usr/bin/python3",
                 "cluster.setup=['unset PYTHONPATH']")
    run_dir = workdir / "runs/tiny_slurm"
    wait_state(slurm_env, job, "FAILED", "COMPLETED", timeout=60)
    log = (run_dir / "job.log").read_text()
    assert re.search(r"configuration error found on node\d: cluster.python /usr/bin/python3 on the nodes cannot "
                     r"import trainctl after cluster.setup: install trainctl\[train\] into it, .* \(No module named "
                     r"'launch'\) \(a requeue would fail the same way: fix it and submit again\); not requeued", log), log
    assert job_field(slurm_env, job, "Restarts") == "0" and not (run_dir / f"job.crashes.{job}").exists()
    assert "torch.distributed" not in (run_dir / f"slurm-{job}.log").read_text()  # torchrun never started
    status = run_trainctl("status", "runs/tiny_slurm", cwd=workdir, env=slurm_env).stdout
    assert re.search(r"config on node\d: cluster.python", status), status


def test_submit_refuses_a_dpo_stage_whose_pairs_are_missing(workdir: Path, slurm_env: dict) -> None:
    """What would fail on the node is refused on the login node, before anything is written or queued."""
    missing = workdir / "none.jsonl"
    args = ("recipe=tiny_slurm", "stage=dpo", "stage.from_scratch=true", "data=tiny_pref",
            f"data.sources.pairs.path={missing}", "optim.min_lr=5.0e-8")
    out = run_trainctl("submit", *args, cwd=workdir, env=slurm_env)
    assert out.returncode == 2
    assert f"the preference data is missing (data.sources.pairs.path={missing})" in out.stderr
    assert not (workdir / "runs").exists()
    assert run_trainctl("render", *args, cwd=workdir).returncode == 0  # render works


def test_prepare_on_slurm_runs_one_array_task_per_shard(workdir: Path, slurm_env: dict) -> None:
    out = run_trainctl("prepare", "recipe=tiny_slurm", "data.prepare_on=slurm", cwd=workdir, env=slurm_env)
    assert out.returncode == 0, out.stderr
    job = re.search(r"submitted job array (\d+) \(2 task\(s\)", out.stdout).group(1)
    prep = workdir / "runs/tiny_slurm/prepare"
    assert "SOURCES=(prose code)" in (prep / "prepare.sbatch").read_text()
    status = run_trainctl("status", str(prep), cwd=workdir, env=slurm_env).stdout
    assert f"{job}_0" in status and "[prose]" in status and f"{job}_1" in status and "[code]" in status
    shards = workdir / "data/prepared"
    wait_for(lambda: all((shards / f"{name}.json").is_file() for name in ("prose", "code")), 180, "both shards")
    for task, name in enumerate(("prose", "code")):
        log = prep / f"prepare-{job}_{task}.log"
        wait_for(lambda: log.is_file() and f"{name}: finished" in log.read_text(), 30, f"task {task}'s log")
    again = run_trainctl("prepare", "recipe=tiny_slurm", "data.prepare_on=slurm", cwd=workdir, env=slurm_env)
    assert again.returncode == 0, again.stderr
    assert "every shard is finished" in again.stdout and "prose: skipped" in again.stdout
    assert (workdir / "runs/tiny_slurm/prepare.json").is_file()  # the report, written here


def test_tune_probes_the_top_layouts_and_calibrates_from_what_they_measured(workdir: Path, slurm_env: dict,
                                                                            prepared: Path) -> None:
    """tune.probe=true: the top 2 layouts of the tiny model train 6 steps each as one job array on the local
    Slurm; `trainctl tune` again reads their metrics.jsonl, compares with the prediction and writes
    calibration.json, which `trainctl plan` applies through cluster.calibration."""
    tune = ("recipe=tiny_slurm", f"data.prepared_dir={prepared}", "tune.probe=true", "tune.top_k=2", "tune.probe_steps=6")
    out = run_trainctl("tune", *tune, cwd=workdir, env=slurm_env)
    assert out.returncode == 0, out.stderr
    array = re.search(r"submitted job array (\d+) \(2 tasks\)", out.stdout).group(1)
    probes = workdir / "runs/tiny_slurm/probes"
    record = json.loads((probes / "probes.json").read_text())["probes"]
    assert [p["rank"] for p in record] == [1, 2]
    for p in record:  # each probe is an ordinary run of the tuned layout
        config = (Path(p["run_dir"]) / "config.yaml").read_text()
        assert "steps: 6" in config and f"zero_stage: {p['overrides'][-1].split('=')[1]}" in config
    for task in ("0", "1"):
        wait_state(slurm_env, f"{array}_{task}", "COMPLETED", "FAILED", timeout=400)
        assert state(slurm_env, f"{array}_{task}") == "COMPLETED", (probes / f"slurm-{array}_{task}.log").read_text()

    again = run_trainctl("tune", *tune, cwd=workdir, env=slurm_env)
    assert again.returncode == 0, again.stderr
    assert "probes: 2 of 2 measured" in again.stdout and "measured vs" in again.stdout
    assert "submitted job array" not in again.stdout  # measured probes are not submitted again
    for p in record:  # a probe keeps no checkpoint (train.save_final=false)
        assert not [c for c in ("latest", "final") if (Path(p["run_dir"]) / "checkpoints" / c).exists()]
    calibration = json.loads((workdir / "runs/tiny_slurm/calibration.json").read_text())
    assert calibration["cluster"] == "slurm_local" and len(calibration["probes"]) == 2
    assert calibration["step_time_ratio"] > 0 and calibration["memory_ratio"] is None  # CPU RSS is not GPU memory
    measured = [p["measured"]["step_time_s"] / p["predicted"]["step_time_s"] for p in calibration["probes"]]
    assert min(measured) <= calibration["step_time_ratio"] <= max(measured)

    base = run_trainctl("plan", "recipe=tiny_slurm", "hydra.run.dir=runs/base", cwd=workdir, env=slurm_env)
    cal = run_trainctl("plan", "recipe=tiny_slurm", "hydra.run.dir=runs/cal",
                       f"cluster.calibration={workdir / 'runs/tiny_slurm/calibration.json'}", cwd=workdir, env=slurm_env)
    assert base.returncode == cal.returncode == 0, cal.stderr
    assert "by cluster.calibration" in " ".join(cal.stdout.split()) and "calibration" not in base.stdout
    step = {name: json.loads((workdir / f"runs/{name}/plan.json").read_text())["throughput"]["step_time_s"]
            for name in ("base", "cal")}
    assert step["cal"] == pytest.approx(step["base"] * calibration["step_time_ratio"])
