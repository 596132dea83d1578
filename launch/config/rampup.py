"""Global-batch ramp-up: Megatron-LM's ``--rampup-batch-size START INCREMENT SAMPLES``.

GPT-3 (Brown et al. 2020, appendix B) and Megatron-LM's GPT-3 175B example grow
the batch from a small start to the full global batch over the first samples;
``train.rampup_batch_size: [START, INCREMENT, SAMPLES]`` asks for the same.

The batch at any point follows megatron-core's
``RampupBatchsizeNumMicroBatchesCalculator.update`` exactly, so both trainers and
the plan agree: with ``n = (global - START) / INCREMENT`` increments spread over
``SAMPLES`` samples, the batch after ``consumed`` samples is
``START + int(consumed / (SAMPLES / n)) * INCREMENT``, and the full global batch
once ``consumed > SAMPLES``. (tests/test_rampup.py steps that calculator and
this module side by side.) This module needs no torch: ``derive`` uses it to
count steps and samples on the login node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Rampup:
    start: int
    increment: int
    samples: int

    @classmethod
    def of(cls, value) -> "Rampup | None":
        """``train.rampup_batch_size`` as a Rampup, None when unset (the validator checks the shape)."""
        if not value or len(value) != 3:
            return None
        return cls(*(int(v) for v in value))

    def increments(self, global_batch: int) -> int:
        return max((global_batch - self.start) // max(self.increment, 1), 1)

    def samples_per_increment(self, global_batch: int) -> float:
        return self.samples / self.increments(global_batch)


def micro_batches(batch: int, micro_batch_size: int, dp: int) -> int:
    """Micro-batches per step on each data-parallel replica for a global ``batch``: batch / (mbs x dp).

    The one place this is computed: ``derive`` (the plan's grad_accum_steps) and both
    trainers (every step of a ramp-up) call it.
    """
    return max(batch // max(micro_batch_size * dp, 1), 1)


def batch_at(consumed: int, global_batch: int, ramp: Rampup | None) -> int:
    """The global batch of the step that starts after ``consumed`` samples."""
    if ramp is None or consumed > ramp.samples:
        return global_batch
    step = int(consumed / ramp.samples_per_increment(global_batch))
    return min(ramp.start + step * ramp.increment, global_batch)


def phases(global_batch: int, ramp: Rampup | None) -> list[tuple[int, int]]:
    """``[(batch, steps)]`` of the ramp, in order: how many steps run at each batch before the full one.

    One entry per increment rather than one per step, so a ramp over millions of
    samples costs ~100 iterations on the login node.
    """
    if ramp is None:
        return []
    out, consumed = [], 0
    while consumed <= ramp.samples:
        batch = batch_at(consumed, global_batch, ramp)
        if batch >= global_batch:
            break
        # The smallest n after which the batch changes; start from the exact quotient, then fix float rounding.
        n = max(math.ceil((_phase_end(consumed, global_batch, ramp) - consumed) / batch), 1)
        while n > 1 and batch_at(consumed + (n - 1) * batch, global_batch, ramp) != batch:
            n -= 1
        while batch_at(consumed + n * batch, global_batch, ramp) == batch:
            n += 1
        out.append((batch, n))
        consumed += n * batch
    return out


def _phase_end(consumed: int, global_batch: int, ramp: Rampup) -> float:
    per = ramp.samples_per_increment(global_batch)
    return min((int(consumed / per) + 1) * per, ramp.samples + 1)


def schedule(global_batch: int, ramp: Rampup | None, *, steps: int | None = None,
             samples: int | None = None) -> tuple[int, int]:
    """(steps, samples) of a run given its length in ``steps`` or in ``samples`` (rounded up to whole steps)."""
    done_steps = done_samples = 0
    for batch, n in phases(global_batch, ramp):
        if steps is not None and done_steps + n >= steps:
            return steps, done_samples + (steps - done_steps) * batch
        if samples is not None and done_samples + n * batch >= samples:
            k = math.ceil((samples - done_samples) / batch)
            return done_steps + k, done_samples + k * batch
        done_steps, done_samples = done_steps + n, done_samples + n * batch
    if steps is not None:
        return steps, done_samples + (steps - done_steps) * global_batch
    k = math.ceil(max(samples - done_samples, 0) / max(global_batch, 1))
    return done_steps + k, done_samples + k * global_batch
