"""Where the project's own files are: in a checkout, or inside an installed wheel.

A checkout keeps ``conf/``, ``recipes/`` and ``slurm/`` at the top level (the
layout a newcomer reads). A wheel cannot install top-level folders, so
``pyproject.toml`` copies them into ``launch/_assets/`` at build time; this
module prefers that copy and falls back to the checkout.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_ASSETS = PACKAGE_DIR / "_assets"


def asset_dir(name: str) -> Path:
    """The directory ``name`` (conf, recipes, slurm) of this installation."""
    installed = _ASSETS / name
    if installed.is_dir():
        return installed
    return PACKAGE_DIR.parent / name


def project_root() -> Path | None:
    """The checkout this package runs from, or None for a wheel install."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() else None
