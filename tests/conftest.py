"""Shared helpers: compose configs as the CLI does, and run the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.config import derive
from launch.config.compose import compose_config

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "deepspeed", "megatron", "transformers", "datasets", "wandb", "numpy", "matplotlib")
"""Packages the login-node path (everything up to submit) must not import."""
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
PYTHONPATH = os.pathsep.join([str(ROOT), str(ROOT / "plugins")])
"""The checkout and its Hydra plugins (plugins/hydra_plugins), as an installed trainctl has them."""


def typed(*overrides: str):
    """(Config, Derived) for ``overrides``, composed through Hydra like the CLI."""
    cfg = compose_config(list(overrides))
    return cfg, derive(cfg)


def run_trainctl(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``trainctl ARGS`` as a user would, in ``cwd``."""
    full_env = {**os.environ, "PYTHONPATH": PYTHONPATH, "COLUMNS": "120", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)


# --- trainers started as the job script starts them: torchrun, CPU ranks ---------------------------

SMALL_MODEL = ("model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=344", "model.seq_length=128",
               "model.max_position_embeddings=128")
"""The tiny model made smaller (2 layers of 128, 128-token sequences): a step costs a third of tiny's on 2 cores.
For the fault tests, which check what happens around the steps (saves, signals, requeues, resumes), not how
well the model learns."""

TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""The signals job.sbatch has torchrun pass on to its ranks."""


def trainer_env(**extra: str) -> dict:
    """A test trainer's environment: this checkout, one thread per rank (2 cores), wandb offline."""
    return {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}


def torchrun(run_dir: Path, nproc: int = 2, env: dict | None = None, command: tuple = ()) -> subprocess.Popen:
    """``torchrun -m launch.train RUN_DIR`` (or ``torchrun COMMAND``) in the background from the directory
    above ``runs/`` (stdout and stderr together)."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         f"--signals-to-handle={TORCHRUN_SIGNALS}", *(command or ("-m", "launch.train", str(run_dir)))],
        cwd=run_dir.parent.parent, env=env or trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def train(run_dir: Path, nproc: int = 2, env: dict | None = None, timeout: float = 400) -> str:
    """Run the trainer to its end; its output (it must exit 0)."""
    proc = torchrun(run_dir, nproc, env)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-8000:]
    return out


def stop_after(run_dir: Path, nproc: int = 2, *, after: int, env: dict | None = None) -> str:
    """Start the trainer, send torchrun SIGUSR1 (as the job script forwards it) once ``after`` steps are
    logged, and wait for it to stop; its output."""
    first = torchrun(run_dir, nproc, env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None:
        if len(records(run_dir)) >= after:
            first.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.2)
    return first.communicate(timeout=180)[0]


def stop_and_resume(run_dir: Path, nproc: int = 2, *, after: int, env: dict | None = None) -> str:
    """``stop_after``, then the same run again to its end; both outputs."""
    return stop_after(run_dir, nproc, after=after, env=env) + train(run_dir, nproc, env)


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    """The run's metrics.jsonl records of one kind (train, eval, skip, init...); none before it exists."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """The sample mixture (data=tiny_mix) tokenized once for the whole session by ``trainctl prepare``:
    shards and their manifests, as a user's ``prepare`` writes them. Every test that trains reads these
    (``data.prepared_dir=...``) instead of preparing its own copy."""
    out = tmp_path_factory.mktemp("prepared")
    result = run_trainctl("prepare", "recipe=tiny_local", f"data.prepared_dir={out}",
                          cwd=tmp_path_factory.mktemp("prepare_cwd"))
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty directory to run trainctl in (run directories land in ./runs)."""
    return tmp_path


# --- the local Slurm test cluster (slurm/cluster.sh) ---------------------------------------

SLURM_STATE = Path(os.environ.get("TRAINCTL_SLURM_DIR", "/tmp/trainctl-slurm"))


@pytest.fixture(scope="session")
def slurm_env() -> dict:
    """Environment for trainctl and Slurm's tools, with a real 2-node cluster running on this machine.

    slurm/cluster.sh starts it (installing Debian's packages as root when they
    are missing) and leaves it running for the rest of the session; it is
    idempotent, so a cluster already up is reused. Tests are skipped only where
    it cannot start (not root and no packages).
    """
    script = ROOT / "slurm" / "cluster.sh"
    out = subprocess.run(["bash", str(script), "start", "2"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TRAINCTL_SLURM_DIR": str(SLURM_STATE)})
    if out.returncode != 0:
        if os.geteuid() != 0 and "not root" in out.stderr.lower() + out.stdout.lower():
            pytest.skip("the local Slurm cluster needs root to install its packages: " + out.stderr[-300:])
        raise RuntimeError(f"slurm/cluster.sh start failed:\n{out.stderr[-3000:]}")
    conf = out.stdout.strip().split("=", 1)[1]
    return {"SLURM_CONF": conf, "PYTHONPATH": PYTHONPATH}


def slurm(env: dict, *argv: str) -> str:
    """Run a Slurm client command against the test cluster; its stdout."""
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert out.returncode == 0, f"{argv}: {out.stderr}"
    return out.stdout


def job_field(env: dict, job_id: str, key: str) -> str:
    """One field (JobState, Restarts, Reason...) of ``scontrol show job``."""
    text = slurm(env, "scontrol", "show", "job", "--oneliner", job_id)
    return dict(w.split("=", 1) for w in text.split() if "=" in w)[key]


def wait_for(predicate, timeout: float = 120, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def debian_tool(command: str, package: str) -> str:
    """The path of ``command``, installing Debian's ``package`` first when it is missing and we are root.

    As slurm/cluster.sh does for Slurm: CI images are bare Debian, and root may install. Skips the
    calling test where the tool is missing and cannot be installed (not root, no apt-get, no network).
    """
    import shutil

    found = shutil.which(command)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{command} is missing and cannot be installed here (needs root and apt-get: "
                    f"apt-get install {package})")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, capture_output=True, env=env, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        out = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
        if out.returncode != 0:
            pytest.skip(f"apt-get install {package} failed: {out.stderr[-300:]}")
    return shutil.which(command) or pytest.skip(f"{package} installed but {command} still not on PATH")
