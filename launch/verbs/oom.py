"""The out-of-memory pre-check: refuse a layout the estimate says will not fit, and say what would.

``render`` calls ``memory_problem`` (and ``submit`` will, through render); a job
that would die with CUDA OOM after six hours in the queue is refused on the
login node instead.
The suggestions are not guesses: each is the same config with one knob turned,
validated and re-estimated, kept only when it is valid and fits.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from launch.config import Config, derive
from launch.config.schema import BackendName, Offload, ParallelConfig, Recompute
from launch.config.validate import validate
from launch.estimate.calibration import Calibration
from launch.estimate.memory import memory_estimate


def memory_problem(cfg: Config, peak_gib: float, calibration: Calibration) -> str | None:
    """A message when ``peak_gib`` exceeds HBM and ``estimate.allow_oom`` is off, else None.
    The suggested variants are estimated with the plan's ``calibration``, as ``peak_gib`` was."""
    hbm = cfg.cluster.gpu.hbm_gib
    if peak_gib <= hbm or cfg.estimate.allow_oom:
        return None
    fixes = [f"{' '.join(overrides)}  ->  {peak:.1f} GiB" for overrides, peak in _fitting_variants(cfg, calibration)]
    lines = [f"memory_gib.per_gpu_peak={peak_gib:.1f}: the estimate exceeds the {hbm:.1f} GiB of a "
             f"{cfg.cluster.gpu.name} by {peak_gib - hbm:.1f} GiB"]
    if fixes:
        lines.append("  fix: one of these fits by the estimate:\n    " + "\n    ".join(fixes[:6]))
    else:
        lines.append("  fix: no single knob brings it under; raise tp/pp/cp together, or use more GPUs")
    lines.append("  (or go ahead anyway with estimate.allow_oom=true)")
    return "\n".join(lines)


def _fitting_variants(cfg: Config, calibration: Calibration) -> list[tuple[list[str], float]]:
    """(overrides, peak GiB) for each one-knob change that is valid and fits, smallest peak first."""
    found = []
    for overrides, parallel in _variants(cfg):
        variant = dataclasses.replace(cfg, parallel=parallel)
        d = derive(variant)
        if validate(variant, d):
            continue
        peak = memory_estimate(variant, d, calibration)[0]["per_gpu_peak"]
        if peak <= cfg.cluster.gpu.hbm_gib:
            found.append((overrides, peak))
    return sorted(found, key=lambda item: item[1])


def _variants(cfg: Config) -> Iterator[tuple[list[str], ParallelConfig]]:
    p = cfg.parallel
    change = dataclasses.replace
    for mode in (Recompute.selective, Recompute.full):
        if p.recompute != mode:
            yield [f"parallel.recompute={mode.name}"], change(p, recompute=mode)
    if p.micro_batch_size > 1:
        yield ["parallel.micro_batch_size=1"], change(p, micro_batch_size=1)
    if cfg.backend.name == BackendName.megatron:
        yield [f"parallel.tp={p.tp * 2}"], change(p, tp=p.tp * 2)
        yield [f"parallel.pp={p.pp * 2}"], change(p, pp=p.pp * 2)
        yield [f"parallel.cp={p.cp * 2}"], change(p, cp=p.cp * 2)
        if not p.distributed_optimizer:
            yield ["parallel.distributed_optimizer=true"], change(p, distributed_optimizer=True)
    else:
        if p.zero_stage < 3:
            yield ["parallel.zero_stage=3"], change(p, zero_stage=3)
        if p.offload_optimizer == Offload.none:
            stage = [] if p.zero_stage else ["parallel.zero_stage=1"]
            yield stage + ["parallel.offload_optimizer=cpu"], change(p, offload_optimizer=Offload.cpu,
                                                                     zero_stage=max(p.zero_stage, 1))
        if p.offload_params == Offload.none:
            yield ["parallel.zero_stage=3", "parallel.offload_params=cpu"], change(p, zero_stage=3,
                                                                                 offload_params=Offload.cpu)
