"""Shared helpers: compose configs as the CLI does, and run the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import derive
from launch.config.compose import compose_config

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "deepspeed", "megatron", "transformers", "datasets", "wandb", "numpy", "matplotlib")
"""Packages the login-node path (everything up to submit) must not import."""
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def typed(*overrides: str):
    """(Config, Derived) for ``overrides``, composed through Hydra like the CLI."""
    cfg = compose_config(list(overrides))
    return cfg, derive(cfg)


def run_trainctl(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``trainctl ARGS`` as a user would, in ``cwd``."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty directory to run trainctl in (run directories land in ./runs)."""
    return tmp_path
