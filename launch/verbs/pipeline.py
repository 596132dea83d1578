"""Pipelines: a config whose ``pipeline`` lists stages (pretrain -> sft -> dpo) is several runs.

Each stage is composed like a command line of its own: the stage's overrides
(usually ``recipe=...``), then the user's command-line overrides (minus
``recipe``, ``name`` and ``pipeline``), so ``cluster.partition=x`` applies to
every stage. A stage after the first starts from the previous stage's final
checkpoint (``stage.init_checkpoint``), unless its overrides say otherwise. Stage
``S`` of pipeline ``NAME`` is the run ``NAME-S`` in ``RUN_DIR/S``; ``submit``
chains the stages' jobs with ``--dependency=afterok``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra import compose
from omegaconf import DictConfig

from launch.errors import UserError
from launch.config.hydra_errors import explain

FINAL_CHECKPOINT = "final"
"""The trainer exports a stage's last weights to CHECKPOINT_DIR/final (consolidated, HF format)."""
_NOT_PASSED_ON = ("recipe", "name", "pipeline")


@dataclass(frozen=True)
class Unit:
    """One run to write: a plain run, or one stage of a pipeline."""

    stage: str | None
    composed: DictConfig
    run_dir: Path
    overrides: list[str]


def units(composed: DictConfig, run_dir: Path, overrides: list[str]) -> list[Unit]:
    stages = composed.get("pipeline") or []
    if not stages:
        return [Unit(None, composed, run_dir, overrides)]
    common = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in _NOT_PASSED_ON]
    result: list[Unit] = []
    previous: str | None = None
    for stage in stages:
        own = list(stage.overrides)
        sets_init = any(o.split("=", 1)[0].lstrip("+") == "stage.init_checkpoint" for o in own + common)
        chained = [f"stage.init_checkpoint={hydra_quote(previous)}"] if previous and not sets_init else []
        stage_overrides = [*own, *chained, *common, f"name={composed.name}-{stage.name}", "pipeline=[]"]
        try:
            stage_cfg = compose(config_name="config", overrides=stage_overrides)
        except Exception as exc:  # noqa: BLE001 - Hydra's errors are the stage's user errors
            message = explain(exc)
            if message is None:
                raise
            raise UserError(f"pipeline stage {stage.name!r} ({' '.join(own)}): {message}") from None
        stage_dir = run_dir / stage.name
        result.append(Unit(stage.name, stage_cfg, stage_dir, stage_overrides))
        previous = final_checkpoint(stage_cfg, stage_dir)
    return result


def final_checkpoint(stage_cfg: DictConfig, stage_dir: Path) -> str:
    base = stage_cfg.train.checkpoint_dir or str(stage_dir / "checkpoints")
    return f"{base}/{FINAL_CHECKPOINT}"


def hydra_quote(value: str) -> str:
    """A string as a quoted Hydra override value (any character survives)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
