"""Checkpoints on disk: committed by a rename, found again through ``latest``, refused when they do not fit.

Layout under ``train.checkpoint_dir`` (default ``RUN_DIR/checkpoints``)::

    step_0000010/          the engine's files (DeepSpeed's shards of every rank, or a Megatron-Core
                           distributed checkpoint), rng_rank{R}.pt (each rank's RNG states),
                           trainctl.json (step, consumed samples, layout, the run's resolved config,
                           record version): trainctl.json marks it complete
    step_0000020/
    latest                 "step_0000020"
    final/                 the end-of-run export (the next stage's stage.init_checkpoint)

The sequence (``launch.train.loop.Trainer.save``): every rank writes into
``.tmp_step_NNNNNNN``, then, after a barrier, rank 0 adds trainctl.json, renames the
directory to ``step_NNNNNNN`` and replaces ``latest`` atomically (temporary file +
``os.replace``); it keeps the last ``KEEP`` steps. A job killed during a save leaves
only a ``.tmp_`` directory, which the next save of that step replaces; ``latest``
always names a complete step. ``checkpoint_dir`` must be a file system every node
sees (as RUN_DIR is on SLURM).

What may change on resume is ``launch.config.resume``'s; the trainer checks on the
node, ``submit`` on the login node (``resume_problem``).
``latest`` is DeepSpeed's own file name and format too, so ``deepspeed``'s
``zero_to_fp32.py`` works on the directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from launch.config.resume import refusal
from launch.config.schema import BackendName, Config
from launch.errors import UserError
from launch.record.write import write_file

KEEP = 3
STEP_DIR = re.compile(r"^step_(\d{7,})$")
MARKER = "trainctl.json"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_dir(cfg, run_dir: Path) -> Path:
    """train.checkpoint_dir, or RUN_DIR/checkpoints."""
    return Path(cfg.train.checkpoint_dir).expanduser().absolute() if cfg.train.checkpoint_dir \
        else run_dir / "checkpoints"


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def find_resume(checkpoint_dir: Path) -> Path | None:
    """The step directory to resume from: the one ``latest`` names, else the newest complete one, else None."""
    latest = checkpoint_dir / "latest"
    if latest.is_file():
        named = checkpoint_dir / latest.read_text().strip()
        if is_complete(named):
            return named
    steps = sorted((p for p in checkpoint_dir.glob("step_*") if STEP_DIR.match(p.name) and is_complete(p)),
                   key=lambda p: int(STEP_DIR.match(p.name).group(1)))
    return steps[-1] if steps else None


def read_marker(step_dir: Path) -> dict:
    """A step directory's ``trainctl.json``; ``UserError`` naming it when it is damaged."""
    try:
        marker = json.loads((step_dir / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{step_dir / MARKER}: unreadable ({exc})\n  fix: move {step_dir} aside to resume "
                        "from the checkpoint before it") from None
    missing = [k for k in ("step", "consumed_samples") if not isinstance(marker, dict)
               or not isinstance(marker.get(k), int)]
    if missing:
        raise UserError(f"{step_dir / MARKER}: no {' or '.join(missing)} in it\n  fix: move {step_dir} aside to "
                        "resume from the checkpoint before it")
    return marker


def write_json(path: Path, data: dict) -> None:
    """A marker written whole through a new file (never in place: ``final``'s files may be hard links)."""
    write_file(path, json.dumps(data, indent=2) + "\n")


def commit(checkpoint_dir: Path, tmp_tag: str, step: int, marker: dict, keep: int = KEEP) -> Path:
    """Rank 0, after every rank wrote ``tmp_tag``: mark it complete, rename it, point ``latest`` at it, prune."""
    tmp, final = checkpoint_dir / tmp_tag, checkpoint_dir / step_name(step)
    write_json(tmp / MARKER, marker)
    if final.exists():  # the same step saved again (a resumed run that stopped at once): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_latest(checkpoint_dir, final.name)
    prune(checkpoint_dir, keep)
    return final


def write_latest(checkpoint_dir: Path, tag: str) -> None:
    tmp = checkpoint_dir / f".latest.{os.getpid()}"
    tmp.write_text(tag)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint_dir / "latest")


def prune(checkpoint_dir: Path, keep: int = KEEP) -> None:
    """Delete all but the newest ``keep`` complete step directories (never the one ``latest`` names)."""
    latest = (checkpoint_dir / "latest").read_text().strip() if (checkpoint_dir / "latest").is_file() else None
    steps = sorted((p for p in checkpoint_dir.glob("step_*") if STEP_DIR.match(p.name)),
                   key=lambda p: int(STEP_DIR.match(p.name).group(1)))
    for old in steps[:-keep] if keep > 0 else steps:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def resume_refusal(step_dir: Path, raw: dict, backend: BackendName) -> str | None:
    """Why this run may not resume from ``step_dir`` (``launch.config.resume.refusal``), or None."""
    return refusal(step_dir, read_marker(step_dir), raw, backend)


def resume_problem(cfg: Config, run_dir: Path) -> str | None:
    """``submit``'s check, on the login node: why the job would refuse to resume this run's checkpoint, or None.

    The job makes the same check (``launch.train.preflight``), but only after its wait in the queue.
    """
    step_dir = find_resume(checkpoint_dir(cfg, run_dir))
    if step_dir is None:
        return None
    raw = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    return resume_refusal(step_dir, raw, cfg.backend.name)
