"""The learning-rate schedule: one pure function of the step, for both ``optim.schedule`` values.

``lr_at(step, ...)`` is the rate of optimizer step ``step`` (0-based: the number
of steps already taken):

- warmup: linear, ``peak * (step + 1) / warmup`` for ``step < warmup`` (the first
  update already moves; the rate reaches the peak on step ``warmup - 1``);
- ``cosine``: from the peak at ``step = warmup`` to ``min_lr`` at ``step = steps``
  (Megatron's ``lr_decay_style=cosine`` with ``lr_decay_iters = steps``);
- ``wsd``: the peak until the last ``decay_steps`` steps
  (``launch.backends.common.wsd_decay_steps``, as the Megatron translators say),
  then linear to ``min_lr`` (``lr_wsd_decay_style=linear``).

Past ``steps`` (a run extended by train.steps/train.tokens resumes on the new
total, which moves the decay) the rate stays at ``min_lr``.

The trainer gives DeepSpeed a ``LambdaLR`` over this function (a client scheduler
replaces the ds_config's ``WarmupCosineLR``, whose first two updates run at a rate
of 0), so its state in a checkpoint is the step count alone.
"""

from __future__ import annotations

import math

from launch.backends.common import wsd_decay_steps
from launch.config.schema import Schedule


def lr_at(step: int, *, peak: float, min_lr: float, warmup: int, steps: int, schedule: str,
          decay_steps: int | None = None) -> float:
    """Learning rate of optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if step >= steps:
        return min_lr
    if schedule == "cosine":
        span = max(1, steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay = max(1, decay_steps if decay_steps is not None else round(0.2 * steps))
        start = steps - decay
        if step < start:
            return peak
        return peak - (peak - min_lr) * (step - start) / decay
    raise ValueError(f"unknown schedule {schedule!r}")


def lr_function(cfg, *, peak: float, steps: int):
    """``step -> lr`` for the run's optim config (``cfg`` is the resolved config)."""
    name = cfg.optim.schedule.name
    decay = wsd_decay_steps(cfg, steps) if cfg.optim.schedule == Schedule.wsd else None
    kwargs = dict(peak=peak, min_lr=float(cfg.optim.min_lr), warmup=int(cfg.optim.warmup_steps), steps=steps,
                  schedule=name, decay_steps=decay)
    return lambda step: lr_at(step, **kwargs)
