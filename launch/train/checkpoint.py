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

Resuming with a changed config is refused, naming the keys, except for the keys in
``RESUMABLE`` (the run's length, bookkeeping, where things are, how the job is
scheduled), the estimator's assumptions, and a backend's ``ALSO_RESUMABLE``. The
trainer checks on the node, ``submit`` on the login node (``resume_problem``).
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

from launch.config.schema import BackendName, Config
from launch.errors import UserError
from launch.record.read import RECORD_VERSION
from launch.record.write import write_file

KEEP = 3
STEP_DIR = re.compile(r"^step_(\d{7,})$")
MARKER = "trainctl.json"

RESUMABLE = (
    "name",
    "train.tokens", "train.steps",  # extend (or shorten) the run: the schedule follows the new total
    "train.log_interval", "train.eval_interval", "train.eval_iters",
    "train.checkpoint_interval", "train.checkpoint_dir", "train.rank_check_s",
    "data.prepared_dir",  # the shards' location; their content is the sources below
    "data.tokenizer", "data.sources.*.path", "data.sources.*.text_key",  # read by prepare, not here
    "data.prepare_on",  # how the shards were made
    "cluster.*",  # scheduling: partition, time limit, container, env... (the world size is checked apart)
    "estimate.*", "submit.*", "pipeline", "wandb.*",
)
"""Keys a resumed run may change. Everything else (model, parallel, data mixture and split, stage,
optim, backend, train.global_batch_size/precision/seed) must match the checkpoint."""

NOT_RESUMABLE = ("cluster.nodes", "cluster.gpus_per_node")
"""The world size: ZeRO shards are saved per data-parallel rank and reload only on the same number."""

ALSO_RESUMABLE = {
    BackendName.megatron: (
        "parallel.tp", "parallel.pp", "parallel.vpp", "parallel.cp", "parallel.ep", "parallel.etp",
        "parallel.micro_batch_size", "parallel.sequence_parallel", "parallel.recompute", "parallel.zero_stage",
        "parallel.offload_optimizer", "parallel.offload_params", "parallel.allow_tp_across_nodes",
        "parallel.num_layers_in_first_pipeline_stage", "parallel.num_layers_in_last_pipeline_stage",
        "parallel.account_for_embedding_in_pipeline_split", "parallel.account_for_loss_in_pipeline_split",
        "cluster.nodes", "cluster.gpus_per_node",
    ),
}
"""Keys a backend's resume may change besides ``RESUMABLE``. Megatron-Core's distributed checkpoints
reshard across tp/pp/vpp/dp (and so the world size), and the data order is global: the layout may change."""


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def flatten(node, prefix: str = "") -> dict:
    """{dotted key: leaf} of a nested dict/list config."""
    out = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        for i, v in enumerate(node):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = node
    return out


def _matches(key: str, pattern: str) -> bool:
    parts, pats = key.split("."), pattern.split(".")
    if len(parts) < len(pats):
        return False
    return all(p == "*" or p == k for p, k in zip(pats, parts))


def _resumable(key: str) -> bool:
    if any(_matches(key, p) for p in NOT_RESUMABLE):
        return False
    return any(_matches(key, p) for p in RESUMABLE)


def config_diff(saved: dict, current: dict, also_resumable: tuple[str, ...] = ()) -> list[str]:
    """The keys that differ between the checkpoint's config and this run's, ignoring RESUMABLE ones
    and ``also_resumable`` (a backend's own: Megatron's checkpoints reshard to another layout).

    Each entry reads ``key: saved -> current`` (``<absent>`` for a key only one side has).
    """
    a, b = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if _resumable(key) or any(_matches(key, p) for p in also_resumable):
            continue
        old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
        if old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


def checkpoint_dir(cfg, run_dir: Path) -> Path:
    """train.checkpoint_dir, or RUN_DIR/checkpoints."""
    return Path(cfg.train.checkpoint_dir).expanduser().absolute() if cfg.train.checkpoint_dir \
        else run_dir / "checkpoints"


def resume_refusal(step_dir: Path, raw: dict, backend: BackendName) -> str | None:
    """Why this run may not resume from ``step_dir`` (a newer record, or its config differs), or None."""
    marker = read_marker(step_dir)
    version = marker.get("record_version", 0)
    if not isinstance(version, int) or version > RECORD_VERSION:
        return (f"refusing to resume from {step_dir}: it was saved by a newer trainctl (record version "
                f"{version}; this one reads up to {RECORD_VERSION})\n  fix: resume with the trainctl that saved it")
    also_resumable = ALSO_RESUMABLE.get(backend, ())
    diff = config_diff(marker.get("config", {}), raw, also_resumable)
    if not diff:
        return None
    layout = ", the parallel layout" if also_resumable else ""
    return (f"refusing to resume from {step_dir}: the config differs from the checkpoint's in {len(diff)} "
            "key(s):\n  " + "\n  ".join(diff) +
            f"\nonly the run's length (train.steps, train.tokens), intervals, paths, scheduling{layout} and "
            "logging may change on resume; start a new run (another name or train.checkpoint_dir) to change the rest")


def resume_problem(cfg: Config, run_dir: Path) -> str | None:
    """``submit``'s check, on the login node: why the job would refuse to resume this run's checkpoint, or None.

    The job makes the same check (``launch.train.preflight``), but only after its wait in the queue.
    """
    step_dir = find_resume(checkpoint_dir(cfg, run_dir))
    if step_dir is None:
        return None
    raw = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    return resume_refusal(step_dir, raw, cfg.backend.name)


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
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        raise UserError(f"{step_dir / MARKER}: no step number in it\n  fix: move {step_dir} aside to resume "
                        "from the checkpoint before it")
    return marker


def write_json(path: Path, data: dict) -> None:
    """A marker written whole through a new file (never in place: ``final``'s files may be hard links)."""
    write_file(path, json.dumps(data, indent=2) + "\n")


def commit(checkpoint_dir: Path, tmp_tag: str, step: int, marker: dict, keep: int = KEEP) -> Path:
    """Rank 0, after every rank wrote ``tmp_tag``: mark it complete, rename it, point ``latest`` at it, prune."""
    tmp, final = checkpoint_dir / tmp_tag, checkpoint_dir / step_name(step)
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
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


def rng_state() -> dict:
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
