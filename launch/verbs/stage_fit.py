"""``plan`` refuses a DPO or RL stage that does not fit, and says which one change would make it fit.

A pretraining layout that does not fit is shown as such by ``plan`` and refused by ``render``
(``launch/verbs/oom.py``). An alignment stage is refused already at ``plan``: its memory is
the sum of parts a user does not see in the layout (a reference model, a rollout engine's
weights and KV cache), and the fixes are the stage's own keys. As in oom.py, every suggestion
is the same config with one change, validated and re-estimated, kept only when it fits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from launch.config import Config, derive
from launch.config.schema import BackendName, Offload, Recompute, RolloutEngine, StageKind
from launch.config.validate import validate
from launch.estimate.alignment import StageCost, stage_cost
from launch.estimate.calibration import Calibration
from launch.estimate.memory import GIB

Change = dict[str, Any]
"""Dotted config keys and their new (typed) values; shown to the user as overrides."""


def stage_fit_problem(cfg: Config, calibration: Calibration) -> str | None:
    """The refusal for a DPO or RL stage the estimate says will not fit; None when it fits, for other
    stages, and with ``estimate.allow_oom``."""
    if cfg.stage.kind not in (StageKind.dpo, StageKind.rlhf) or cfg.estimate.allow_oom:
        return None
    cost = stage_cost(cfg, derive(cfg), calibration)
    why = _why_not(cfg, cost)
    if why is None:
        return None
    fixes = [f"{_overrides(change)}  ->  {peak:.1f} GiB" for change, peak in _fitting(cfg, calibration)]
    lines = [why]
    if fixes:
        lines.append("  fix: one of these fits by the estimate:\n    " + "\n    ".join(fixes[:6]))
    else:
        lines.append("  fix: no single change brings it under; use more GPUs (cluster.nodes), or shorter "
                     "sequences (model.seq_length, stage.max_completion_length)")
    lines.append("  (or go ahead anyway with estimate.allow_oom=true)")
    return "\n".join(lines)


def _why_not(cfg: Config, cost: StageCost) -> str | None:
    """One line naming the key and value that overflow, and the parts that fill the GPU; None if it fits."""
    hbm, gpu, kind = cfg.cluster.gpu.hbm_gib, cfg.cluster.gpu.name, cfg.stage.kind.name
    r = cost.rollout
    if r is not None and r.waves == 0:
        key = ("stage.rollout.gpu_memory_utilization" if cfg.stage.rollout.engine == RolloutEngine.vllm_colocate
               else "stage.rollout.tensor_parallel")
        value = _get(cfg, key)
        return (f"{key}={value}: the rollout engine's {(r.kv_pool_bytes + r.weights_bytes) / GIB:.1f} GiB per GPU "
                f"hold its weights ({r.weights_bytes / GIB:.1f} GiB) but not the KV cache of one "
                f"{cfg.model.seq_length}-token sequence")
    if cost.peak / GIB <= hbm:
        return None
    parts = ", ".join(f"{name.replace('_', ' ')} {value / GIB:.1f}" for name, value in cost.parts.items() if value)
    return (f"memory_gib.per_gpu_peak={cost.peak / GIB:.1f}: this {kind} stage needs more than the {hbm:.1f} GiB "
            f"of a {gpu} ({parts} GiB, plus overheads)")


def _fitting(cfg: Config, calibration: Calibration) -> list[tuple[Change, float]]:
    """(change, peak GiB) for each single change that is valid and fits, smallest peak first."""
    found = []
    for change in _changes(cfg):
        variant = _with(cfg, change)
        d = derive(variant)
        if validate(variant, d):
            continue
        cost = stage_cost(variant, d, calibration)
        if _why_not(variant, cost) is None:
            found.append((change, cost.peak / GIB))
    return sorted(found, key=lambda item: item[1])


def _changes(cfg: Config) -> Iterator[Change]:
    """The stage's own fixes first (fewer generations per prompt, a separate rollout node, the colocated
    engine's share), then the layout's (offload, ZeRO-3, smaller micro-batches, recomputation)."""
    s, p, r = cfg.stage, cfg.parallel, cfg.stage.rollout
    if s.kind == StageKind.rlhf:
        if s.num_generations >= 4:  # as many prompts per step, half the completions
            yield {"stage.num_generations": s.num_generations // 2,
                   "train.global_batch_size": cfg.train.global_batch_size // 2}
        if r.engine != RolloutEngine.vllm_server:  # a node added to the allocation generates
            yield {"stage.rollout.engine": RolloutEngine.vllm_server, "stage.rollout.nodes": 1}
        if r.engine == RolloutEngine.vllm_colocate:
            for share in (0.2, 0.3, 0.4, 0.5):
                if share != r.gpu_memory_utilization:
                    yield {"stage.rollout.gpu_memory_utilization": share}
        if r.engine != RolloutEngine.hf:
            yield {"stage.rollout.tensor_parallel": r.tensor_parallel * 2}
    if cfg.backend.name == BackendName.deepspeed:
        if p.zero_stage < 3:
            yield {"parallel.zero_stage": 3}
        if p.offload_optimizer == Offload.none:
            yield {"parallel.offload_optimizer": Offload.cpu, "parallel.zero_stage": max(p.zero_stage, 1)}
        if p.offload_params == Offload.none:
            yield {"parallel.zero_stage": 3, "parallel.offload_params": Offload.cpu}
    else:
        yield {"parallel.tp": p.tp * 2}
        yield {"parallel.pp": p.pp * 2}
    if p.micro_batch_size > 1:
        yield {"parallel.micro_batch_size": 1}
    if p.recompute != Recompute.full:
        yield {"parallel.recompute": Recompute.full}


def _with(cfg: Config, change: Change) -> Config:
    """``cfg`` with each dotted key of ``change`` set (nested frozen-style replace)."""
    for key, value in change.items():
        cfg = _set(cfg, key.split("."), value)
    return cfg


def _set(node: Any, path: list[str], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(node, **{path[0]: value})
    return dataclasses.replace(node, **{path[0]: _set(getattr(node, path[0]), path[1:], value)})


def _get(cfg: Config, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _overrides(change: Change) -> str:
    return " ".join(f"{key}={getattr(value, 'name', value)}" for key, value in change.items())
