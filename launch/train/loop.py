"""The step loop both trainers share: batch ramp-up, logging windows, validation, checkpoints, stop signals.

A trainer (``deepspeed_trainer.Trainer``, ``megatron_trainer.Trainer``) subclasses
``StepLoop`` and supplies the backend's parts as methods:

- ``start_message()``: the line printed when the run starts or resumes;
- ``set_batch(batch)``: a batch ramp-up changed the global batch (``launch/config/rampup.py``);
- ``train_step() -> (window_item, lr, grad_norm)``: one optimizer step;
- ``window_loss(items) -> float``: the mean loss over a logging window, agreed by all ranks;
- ``evaluate()``, ``save()``, and ``finish() -> str`` (the end-of-run export; its message).

and the state the loop reads and advances: ``cfg``, ``report``, ``step``, ``steps``,
``consumed``, ``gbs`` (this step's global batch), ``full_gbs``, ``ramp``, ``seq``,
``save_every``, ``data``; ``stop_group`` is the process group the stop flag is agreed on.

After every step all ranks agree on stop signals (``launch.train.stop``): on
SIGUSR1/SIGTERM they save a checkpoint (unless this step just saved one) and exit 0;
the sbatch script requeues the job, which resumes from ``latest``.
"""

from __future__ import annotations

import time

from launch.config.rampup import batch_at
from launch.train import stop


class StepLoop:
    stop_group = None

    def train(self) -> int:
        r = self.report
        r.event(self.start_message() + (
            f"; batch ramp-up {self.ramp.start} + {self.ramp.increment} over {self.ramp.samples} samples"
            if self.ramp else ""))
        window_time, window_steps, window = 0.0, 0, []
        log_every = max(1, int(self.cfg.train.log_interval))
        eval_every = int(self.cfg.train.eval_interval or 0)
        saved_at = self.step if self.step else None
        while self.step < self.steps:
            t0 = time.perf_counter()
            self.set_batch(batch_at(self.consumed, self.full_gbs, self.ramp))
            item, lr, grad_norm = self.train_step()
            stopping = stop.agree(self.stop_group)  # every rank, every step: timed with the step, part of its cost
            window_time += time.perf_counter() - t0
            window_steps += 1
            window.append(item)
            self.step += 1
            self.consumed += self.gbs
            if self.step % log_every == 0 or self.step == self.steps:
                r.train_step(step=self.step, loss=self.window_loss(window), lr=lr, grad_norm=grad_norm,
                             steps=self.steps, step_time_s=window_time / window_steps, tokens=self.gbs * self.seq,
                             consumed_samples=self.consumed, global_batch_size=self.gbs)
                window_time, window_steps, window = 0.0, 0, []
            if eval_every and self.data.valid is not None and self.step % eval_every == 0 and self.step < self.steps:
                self.evaluate()
            if self.save_every and self.step % self.save_every == 0 and self.step < self.steps:
                self.save()
                saved_at = self.step
            if stopping:
                if saved_at != self.step:
                    self.save()
                why = stop.requested() or "a stop signal on another rank"
                r.event(f"stopped by {why} at step {self.step}, checkpoint saved")
                return 0
        if self.data.valid is not None and eval_every:
            self.evaluate()
        if not self.cfg.train.save_final:
            r.event(f"done: {self.step} steps; nothing saved (train.save_final=false)")
            return 0
        if saved_at != self.step:
            self.save()
        r.event(f"done: {self.step} steps; {self.finish()}")
        return 0
