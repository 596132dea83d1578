"""``shellcheck -S warning`` passes on every script trainctl renders (issue 17, point 7): the job script of a
run, of each pipeline stage, of a sweep's job array, on bare metal and in a container, with each network
profile's exports; the prepare array; the local launch.sh; and slurm/cluster.sh itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from launch.config.compose import compose
from launch.executors.sbatch import render_array, render_prepare
from launch.verbs.plan import make_plan
from tests.conftest import ROOT, debian_tool, run_trainctl

RENDERS = {
    "tiny_slurm": ["recipe=tiny_slurm"],
    "pipeline": ["recipe=tiny_slurm_pipeline"],
    "local": ["recipe=tiny_local"],
    "h100_bare_metal": ["recipe=llama3_8b_pretrain_h100", "cluster.nodes=2", "cluster.network=roce",
                        "cluster.setup=[\"module load cuda\"]", "cluster.python=python"],
    "h100_container": ["recipe=llama3_70b_pretrain_h100", "cluster.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
                       "cluster.network=efa", "cluster.export_env=[PATH,HF_TOKEN,WANDB_API_KEY]",
                       "cluster.cpus_per_node=64", "cluster.python=python",
                       "cluster.container_mounts=[/data:/data,/checkpoints:/checkpoints]"],  # not on this machine
}


def shellcheck(*scripts: Path) -> subprocess.CompletedProcess:
    return subprocess.run([debian_tool("shellcheck", "shellcheck"), "-S", "warning", *map(str, scripts)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", RENDERS)
def test_rendered_scripts_pass_shellcheck(workdir: Path, name: str) -> None:
    out = run_trainctl("render", *RENDERS[name], cwd=workdir)
    assert out.returncode == 0, out.stderr
    scripts = sorted(workdir.glob("runs/**/job.sbatch")) + sorted(workdir.glob("runs/**/launch.sh"))
    assert scripts and len(scripts) == (4 if name == "pipeline" else 1)
    check = shellcheck(*scripts)
    assert check.returncode == 0, check.stdout


def test_the_job_array_the_prepare_array_and_cluster_sh_pass_shellcheck(tmp_path: Path) -> None:
    plan = make_plan(compose(["recipe=tiny_slurm"]))
    dirs = [tmp_path / "a", tmp_path / "b"]
    array = tmp_path / "array.sbatch"
    array.write_text(render_array(plan.cfg, dirs, tmp_path, [plan.numbers, plan.numbers],
                                  [d / "checkpoints" for d in dirs]))
    prepare = tmp_path / "prepare.sbatch"
    prepare.write_text(render_prepare(plan.cfg, tmp_path, ["prose", "code"]))
    check = shellcheck(array, prepare, ROOT / "slurm" / "cluster.sh")
    assert check.returncode == 0, check.stdout
    assert "SLURM_ARRAY_TASK_ID" in array.read_text()  # it is the array script, not a plain one
