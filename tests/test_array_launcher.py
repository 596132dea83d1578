"""The job-array launcher (plugins/hydra_plugins/trainctl_array): a sweep as ONE Slurm job array.

The submit tests run on the real local Slurm cluster (``slurm_env``); the
refusals that happen before sbatch, ``render``, and the packaging need no cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

from tests.conftest import PYTHONPATH, ROOT, run_trainctl, slurm, wait_for

ARRAY = "hydra/launcher=trainctl_array"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def unique_name(prefix: str) -> str:
    """A run name (and so a Slurm job name) no other test or session on the shared cluster uses."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def clean_env() -> dict:
    """The environment run_trainctl gives: the checkout and its plugins on the path, no HYDRA_FULL_ERROR."""
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def task_states(env: dict, array_id: str) -> dict[int, str]:
    """JobState of each task of a job array that Slurm has split off (``scontrol show job ARRAY_ID``)."""
    states: dict[int, str] = {}
    for line in slurm(env, "scontrol", "show", "job", "--oneliner", array_id).splitlines():
        fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
        if fields.get("ArrayTaskId", "").isdigit():  # "0-2" is the part not yet started
            states[int(fields["ArrayTaskId"])] = fields["JobState"]
    return states


def jobs_named(env: dict, name: str) -> str:
    """Every job of that name the controller knows, in any state."""
    return slurm(env, "squeue", "--noheader", "--states=all", f"--name={name}", "--format=%i %T").strip()


def test_submit_sends_a_sweep_as_one_job_array_that_runs(slurm_env, workdir):
    out = run_trainctl("submit", "-m", ARRAY, "recipe=tiny_slurm", "train.rank_check_s=1", "train.seed=1,2,3",
                       cwd=workdir, env=slurm_env)
    assert out.returncode == 0, out.stderr
    submitted = re.findall(r"submitted job array (\d+) \((\d+) tasks\)", out.stdout)
    assert len(submitted) == 1 and submitted[0][1] == "3", out.stdout
    assert "submitted job " not in out.stdout.replace("submitted job array", ""), "a point went to sbatch alone"
    array_id = submitted[0][0]

    sweep_dir = workdir / "runs/tiny_slurm"
    script = (sweep_dir / "array.sbatch").read_text()
    assert "#SBATCH --array=0-2\n" in script
    points = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    assert len(points) == 3
    assert sorted(p["job_id"] for p in points) == [f"{array_id}_{i}" for i in range(3)]
    for point in points:
        run_dir = Path(point["run_dir"])
        assert run_dir.parent == sweep_dir.absolute()
        record = json.loads((run_dir / "job.json").read_text())
        assert record["jobs"][-1]["job_id"] == point["job_id"]
        assert record["jobs"][-1]["script"] == "array.sbatch"
    # task i runs point i: the script's list of run directories is in sweep.json's job-id order
    by_task = {int(p["job_id"].split("_")[1]): Path(p["run_dir"]) for p in points}
    assert [line for line in script.splitlines() if line.startswith("RUN_DIRS=(")] == \
        ["RUN_DIRS=(" + " ".join(shlex.quote(str(by_task[i])) for i in range(3)) + ")"]

    def ended() -> bool:
        states = task_states(slurm_env, array_id)
        return len(states) == 3 and set(states.values()) <= ENDED

    wait_for(ended, timeout=300, what=f"the 3 tasks of job array {array_id} to end")
    states = task_states(slurm_env, array_id)
    logs = {i: (by_task[i] / "job.log").read_text() if (by_task[i] / "job.log").exists() else "" for i in range(3)}
    assert states == {0: "COMPLETED", 1: "COMPLETED", 2: "COMPLETED"}, (states, logs)
    for i, text in logs.items():
        assert re.search(rf"job {array_id}_{i}: job step finished on \S+ \(rank check done\): done, not requeued",
                         text), text
        assert (by_task[i] / f"outcomes/{array_id}_{i}.0.json").is_file()  # the rank named it as the script does

    status = run_trainctl("status", "runs/tiny_slurm", cwd=workdir, env=slurm_env)
    assert status.returncode == 0, status.stderr
    rows = [line for line in status.stdout.splitlines() if re.search(rf"\b{array_id}_\d\b", line)]
    assert len(rows) == 3 and all("COMPLETED" in row for row in rows), status.stdout
    for i in range(3):
        assert f"train.seed={i + 1}" in status.stdout


def test_points_with_different_resources_submit_nothing(slurm_env, workdir):
    name = unique_name("array_mixed")
    out = run_trainctl("submit", "-m", ARRAY, "recipe=tiny_slurm", f"name={name}", "train.rank_check_s=1",
                       "cluster.gpus_per_node=1,2", cwd=workdir, env=slurm_env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cluster.gpus_per_node" in out.stderr
    assert "Traceback" not in out.stderr
    assert "submitted" not in out.stdout
    sweep_dir = workdir / "runs" / name
    assert not (sweep_dir / "array.sbatch").exists()
    assert not (sweep_dir / "sweep.json").exists()
    assert not list(sweep_dir.glob("*/job.json"))
    assert jobs_named(slurm_env, name) == ""


def test_render_with_the_array_launcher_submits_nothing(workdir):
    out = run_trainctl("render", "-m", ARRAY, "recipe=tiny_slurm", "train.seed=1,2", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "submitted" not in out.stdout
    sweep_dir = workdir / "runs/tiny_slurm"
    assert len(list(sweep_dir.glob("*/job.sbatch"))) == 2
    assert not list(sweep_dir.glob("*/job.json"))
    assert not (sweep_dir / "array.sbatch").exists() and not (sweep_dir / "sweep.json").exists()


def test_a_failing_point_submits_nothing(workdir):
    """micro batch 3 does not divide the batch: refused before anything is sent to Slurm; the other point waits."""
    out = run_trainctl("submit", "-m", ARRAY, "recipe=tiny_slurm", "train.rank_check_s=1",
                       "parallel.micro_batch_size=2,3", cwd=workdir)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "1 of 2 points of this sweep failed" in out.stderr
    assert "parallel.micro_batch_size=3" in out.stderr  # the failing point's own reason, printed first
    assert "submitted" not in out.stdout
    sweep_dir = workdir / "runs/tiny_slurm"
    assert not (sweep_dir / "array.sbatch").exists() and not list(sweep_dir.glob("*/job.json"))


def test_preflight_asks_slurm_about_the_array_and_queues_nothing(workdir, slurm_env):
    out = run_trainctl("submit", "-m", ARRAY, "recipe=tiny_slurm", "train.rank_check_s=1", "submit.preflight=true",
                       "train.seed=1,2", cwd=workdir, env=slurm_env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "preflight of the job array (sbatch --test-only, nothing queued)" in out.stdout
    assert "#SBATCH --array=0-1" in (workdir / "runs/tiny_slurm/array.sbatch").read_text()
    assert not list(workdir.glob("runs/**/job.json")) and not (workdir / "runs/tiny_slurm/sweep.json").exists()


def test_the_array_state_is_reset_after_a_sweep(workdir):
    """launch.verbs.submit.ARRAY is a list only while the launcher runs, even when it raises."""
    code = ("import launch.verbs.submit; from launch.cli import main;"
            f"rc = main(['submit', '-m', '{ARRAY}', 'recipe=tiny_slurm', 'parallel.micro_batch_size=2,3']);"
            "print('rc', rc, 'ARRAY', launch.verbs.submit.ARRAY)")
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), cwd=workdir, capture_output=True, text=True)
    assert out.stdout.splitlines()[-1] == "rc 2 ARRAY None", out.stdout + out.stderr


def test_hydra_discovers_the_launcher_on_the_checkouts_path():
    code = ("from hydra.core.plugins import Plugins; from hydra.plugins.launcher import Launcher;"
            "from hydra.core.config_store import ConfigStore;"
            "print(sorted(p.__name__ for p in Plugins.instance().discover(Launcher)));"
            "print(ConfigStore.instance().load('hydra/launcher/trainctl_array.yaml').node._target_)")
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "TrainctlArrayLauncher" in out.stdout.splitlines()[0]
    assert out.stdout.splitlines()[1] == "hydra_plugins.trainctl_array.launcher.TrainctlArrayLauncher"


def test_the_wheel_carries_the_plugin_and_hydra_finds_it_there(tmp_path: Path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("trainctl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hydra_plugins/trainctl_array/launcher.py" in names
    assert "hydra_plugins/trainctl_array/__init__.py" in names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package: other plugins share it
    assert "launch/cli.py" in names and "launch/_assets/slurm/job.sbatch.j2" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    work = tmp_path / "work"
    work.mkdir()
    out = run_trainctl("render", "-m", ARRAY, "recipe=tiny_slurm", "train.seed=1,2", cwd=work,
                       env={"PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    assert len(list((work / "runs/tiny_slurm").glob("*/job.sbatch"))) == 2
