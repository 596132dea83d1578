"""A job submitted as on a real cluster: trainctl run from a virtualenv that is not on PATH, from a working
directory other than the checkout, and a job environment of only the variables it names (issue 17, point 7).

The earlier Slurm tests submit from the test's own environment (PYTHONPATH on the checkout, the whole
environment exported); here nothing reaches the job that a cluster's clean environment would not give it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, job_field, wait_for

SECRET = "hf_cleanenvtest0123456789"  # looks like a Hugging Face token; must reach the job, never a file


def clean_trainctl(*args: str, cwd: Path, slurm_conf: str) -> subprocess.CompletedProcess:
    """``/abs/venv/bin/python -m launch ARGS`` with only PATH (system dirs: not the venv), HOME, SLURM_CONF,
    a secret and a canary that the job must not get: no PYTHONPATH, so the job's interpreter finds trainctl
    through its own install, as on a cluster."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "SLURM_CONF": slurm_conf, "HF_TOKEN": SECRET,
           "CANARY": "not-for-the-job", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_job_from_an_unlisted_venv_with_a_clean_environment_trains(workdir: Path, slurm_env: dict) -> None:
    assert not workdir.is_relative_to(ROOT)
    conf = slurm_env["SLURM_CONF"]
    assert clean_trainctl("prepare", "recipe=tiny_slurm", cwd=workdir, slurm_conf=conf).returncode == 0
    # The setup line reports, in the job's log, whether the canary and the secret reached the job (the
    # secret's length only). SLURM_CONF is listed because this test cluster's config is not in /etc.
    check = 'echo env check: $(printenv CANARY || echo no-canary) $(printenv HF_TOKEN | wc -c)'
    out = clean_trainctl("submit", "recipe=tiny_slurm", "cluster.export_env=[SLURM_CONF,HF_TOKEN,WANDB_API_KEY]",
                         f"cluster.setup=['{check}']", cwd=workdir, slurm_conf=conf)
    assert out.returncode == 0, out.stderr
    job = re.search(r"submitted job (\d+)", out.stdout).group(1)
    run_dir = workdir / "runs/tiny_slurm"
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --export=SLURM_CONF,HF_TOKEN,WANDB_API_KEY\n" in script and " --export=ALL " in script
    wait_for(lambda: job_field(slurm_env, job, "JobState") in ("COMPLETED", "FAILED"), 240, f"job {job} to end")
    log = (run_dir / f"slurm-{job}.log").read_text()
    assert job_field(slurm_env, job, "JobState") == "COMPLETED", log[-3000:]
    assert f"env check: no-canary {len(SECRET) + 1}" in log  # only the named variables reached the job
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # it trained
    assert f"{sys.executable} -m launch.train.launcher" in script  # the submitting interpreter, by its path
    assert not [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_an_export_entry_with_a_value_is_refused_before_anything_is_written(workdir: Path) -> None:
    from tests.conftest import run_trainctl

    out = run_trainctl("plan", "recipe=tiny_slurm", "cluster.export_env=[PATH,'HF_TOKEN=hf_abc']", cwd=workdir)
    assert out.returncode == 2 and "cluster.export_env[1]" in out.stderr and "HF_TOKEN=hf_abc" in out.stderr
    assert "is not an environment variable name" in out.stderr and "Traceback" not in out.stderr
    assert not (workdir / "runs").exists()
