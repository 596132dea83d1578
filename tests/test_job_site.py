"""What job.sbatch takes from the plan and the site: the requeue limit, the network's variables, the CPUs.

The script's shell runs here with stub ``srun`` and ``scontrol`` on PATH (they
record what the job step would get); tests/test_slurm.py runs scripts on a real Slurm.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from launch.config.compose import compose
from launch.executors.requeue_limit import requeue_limit, requeues_needed
from launch.executors.sbatch import job_env, render_array, render_sbatch
from launch.verbs.plan import make_plan
from tests.conftest import run_trainctl, typed


# --- the requeue limit ---------------------------------------------------------------------------

def script_for(tmp_path: Path, *overrides: str) -> Path:
    """RUN_DIR/job.sbatch as ``trainctl render`` writes it (in-process: no plan.png to draw)."""
    plan = make_plan(compose(list(overrides)))
    (tmp_path / "plan.json").write_text(json.dumps(plan.numbers))
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(plan.cfg, tmp_path, plan.numbers))
    return script


def test_the_requeue_limit_covers_the_plans_jobs_and_failures(tmp_path: Path) -> None:
    script = script_for(tmp_path, "recipe=llama3_8b_pretrain_h100")
    run = json.loads((script.parent / "plan.json").read_text())["run"]
    assert (run["jobs_needed"], round(run["expected_failures"])) == (111, 9)  # the figures of issue 17
    # (111 - 1 + 9) x 1.25 + 10: the old fixed 100 would have stopped this run at job 101
    assert "\nMAX_REQUEUES=159  #" in script.read_text()


def test_a_max_requeues_below_the_plans_need_is_refused_at_plan(workdir: Path) -> None:
    out = run_trainctl("plan", "recipe=llama3_70b_pretrain_h100", "cluster.max_requeues=100", cwd=workdir)
    assert out.returncode == 2, out.stdout
    assert "cluster.max_requeues=100: the plan needs 590 requeues (509 jobs of 04:00:00" in out.stderr
    assert "fix: cluster.max_requeues=null" in out.stderr and "cluster.max_requeues=590 or more" in out.stderr
    assert "Traceback" not in out.stderr and not (workdir / "runs").exists()


def test_a_one_job_run_needs_no_requeue_and_keeps_a_slack() -> None:
    cfg, _ = typed("recipe=tiny_slurm")
    run = {"jobs_needed": 1, "expected_failures": 0.001}
    assert requeues_needed(run) == 0 and requeue_limit(cfg, run) == 10
    explicit, _ = typed("recipe=tiny_slurm", "cluster.max_requeues=0")
    assert requeue_limit(explicit, run) == 0  # an explicit number is used as given, when it covers the need


def test_a_job_array_gets_the_limit_of_its_longest_point(tmp_path: Path) -> None:
    short, long = make_plan(compose(["recipe=tiny_slurm"])), make_plan(compose(["recipe=tiny_slurm", "train.steps=100000"]))
    assert (short.numbers["run"]["jobs_needed"], long.numbers["run"]["jobs_needed"]) == (1, 9)
    text = render_array(short.cfg, [tmp_path / "a", tmp_path / "b"], tmp_path, [short.numbers, long.numbers],
                        [tmp_path / "a/checkpoints", tmp_path / "b/checkpoints"])
    assert "\nMAX_REQUEUES=20  #" in text  # (9 - 1) x 1.25 + 10, not the short point's 10


# --- the network's variables and the CPUs, as the job step sees them ---------------------------------

def test_each_network_exports_what_its_fabric_needs() -> None:
    env = {name: dict(job_env(typed("recipe=llama3_8b_pretrain_h100", f"cluster.network={name}")[0]))
           for name in ("infiniband", "roce", "efa", "tcp", "none")}
    assert env["infiniband"]["NCCL_IB_HCA"] == "mlx5" and env["infiniband"]["NCCL_DEBUG"] == "WARN"
    assert env["roce"]["NCCL_IB_GID_INDEX"] == "3" and env["roce"]["NCCL_IB_HCA"] == "mlx5"
    assert env["efa"]["FI_PROVIDER"] == "efa" and env["efa"]["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert env["tcp"]["NCCL_IB_DISABLE"] == "1" and "NCCL_IB_HCA" not in env["tcp"]
    assert not any(k.startswith(("NCCL_", "FI_")) for k in env["none"])
    assert all("NCCL_DEBUG_FILE" not in e for e in env.values())  # per-rank files: network.py says why
    local = dict(job_env(typed("recipe=tiny_slurm")[0]))
    assert not any(k.startswith(("NCCL_", "FI_")) for k in local)  # the gloo test cluster: network none


STUB_SRUN = """#!/bin/bash
# stub srun (no Slurm in this test): records its arguments and the environment the job step gets
printf '%s\\n' "$@" > "$STUB_LOG/srun.args"
env > "$STUB_LOG/srun.env"
"""
STUB_SCONTROL = """#!/bin/bash
# stub scontrol (no Slurm in this test)
case "$1 $2" in
  "show hostnames") echo node1 ;;
  "show node") echo "NodeName=node1 NodeAddr=10.0.0.7" ;;
esac
"""


def test_the_step_gets_the_networks_variables_cluster_env_over_them_and_every_cpu(workdir: Path,
                                                                                   tmp_path: Path) -> None:
    script = script_for(tmp_path, "recipe=llama3_8b_pretrain_h100", "cluster.network=roce",
                        "+cluster.env.NCCL_DEBUG=INFO", "+cluster.env.NCCL_IB_GID_INDEX='5 # not a command'")
    stubs = tmp_path / "stub-bin"
    stubs.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(stubs), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "128", "SLURM_CPUS_ON_NODE": "224"}
    result = subprocess.run(["bash", str(script)], cwd=workdir, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    step_env = dict(line.split("=", 1) for line in (stubs / "srun.env").read_text().splitlines() if "=" in line)
    assert step_env["NCCL_DEBUG"] == "INFO"  # cluster.env overrides the network's WARN
    assert step_env["NCCL_IB_GID_INDEX"] == "5 # not a command"  # ... and its GID index, quoted
    assert step_env["NCCL_IB_HCA"] == "mlx5" and step_env["NCCL_SOCKET_IFNAME"] == "^lo,docker"
    args = (stubs / "srun.args").read_text().splitlines()
    assert "--cpus-per-task=224" in args  # the exclusive node's every CPU for its one task (torchrun)
    assert not any(line.startswith("#SBATCH --cpus-per-task") for line in script.read_text().splitlines())
