"""The trainer skeleton: one loop, one checkpoint sequence, one export sequence, for every engine.

``Trainer`` owns what every run does the same way; the engine behind
``launch.train.module.TrainModule`` owns only its model, optimizer and step.

- The loop: batch ramp-up, one optimizer step per iteration, a logging window of
  ``train.log_interval`` steps, validation every ``train.eval_interval`` steps over
  ``train.eval_iters`` full batches (the same ones each time: the numbers compare), a
  checkpoint every ``save_every`` steps (``train.checkpoint_interval``, else the plan's).
- Stop signals: after every step all ranks agree (``launch.train.stop``); on
  SIGUSR1/SIGTERM they save (unless this step just did) and return 0; the sbatch
  script requeues the job, which resumes from ``latest``.
- Bad numbers (``launch.train.guard``): each step is judged from its agreed loss and grad norm;
  a non-finite one was skipped by the engine, a loss spike rewinds to the newest checkpoint and
  skips its data, too many of either raise ``Diverged``, and so does a non-finite parameter
  before a save or the export.
- Checkpoints (``launch.record.checkpoints``): every rank writes its shards and RNG
  states into ``.tmp_step_N``, all checksum them in parallel (``launch.train.trust``),
  rank 0 marks and commits it with its manifest. Resume verifies and restores the
  module, the data position (a count of samples: ``launch.train.data``) and, on the
  layout they were saved with, the RNG states, from the newest checkpoint that verifies.
- Export: the module writes into ``.tmp_final``, rank 0 marks it and renames it ``final``.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from launch.config.rampup import Rampup, batch_at, micro_batches
from launch.errors import UserError
from launch.record import checkpoints as ckpt
from launch.record import manifest
from launch.record.read import RECORD_VERSION, PlanNumbers, RunConfig
from launch.train import stop, trust, watchdog
from launch.train.guard import Diverged, Guard
from launch.train.data import build_datasets, micro_batch
from launch.train.metrics import Reporter
from launch.train.module import TrainModule


class Trainer:
    def __init__(self, run_dir: Path, record: RunConfig, plan: PlanNumbers, module: TrainModule):
        cfg = record.cfg
        self.run_dir, self.cfg, self.raw, self.module = run_dir, cfg, record.raw, module
        self.ckpt_dir = ckpt.checkpoint_dir(cfg, run_dir)
        self.steps = record.derived.steps
        self.save_every = plan.save_interval(cfg.train.checkpoint_interval) or 0
        self.full_gbs = self.gbs = cfg.train.global_batch_size  # gbs: this step's, smaller during a ramp-up
        self.ramp = Rampup.of(cfg.train.rampup_batch_size)
        self.seq = cfg.model.seq_length
        self.report = Reporter(run_dir, cfg, plan, world=module.world, enabled=module.rank == 0)
        self.data = build_datasets(cfg, train_samples=record.derived.samples,
                                   valid_samples=cfg.train.eval_iters * self.full_gbs,
                                   cache_dir=run_dir / "data_cache")
        self.step, self.consumed = 0, 0
        self.guard = Guard(cfg.train.guard, run_dir, self.report, writer=module.rank == 0)

    # --- the loop ------------------------------------------------------------------------------

    def train(self) -> int:
        m, r = self.module, self.report
        r.event(self._start_message())
        if not self.step:  # a fresh start after a job that died before its first checkpoint
            r.rewind(0)
        window_time, window_steps, window = 0.0, 0, []
        log_every = max(1, self.cfg.train.log_interval)
        eval_every = self.cfg.train.eval_interval or 0
        saved_at = self.step if self.step else None
        while self.step < self.steps:
            t0 = time.perf_counter()
            self._set_batch(batch_at(self.consumed, self.full_gbs, self.ramp))
            item, lr, grad_norm = m.train_step(self.step, self._batches(self.data.train, self.consumed,
                                                                        m.micro_batches))
            stopping = stop.agree(m.stop_group)  # every rank, every step: timed with the step, part of its cost
            window_time += time.perf_counter() - t0
            window_steps += 1
            self.step += 1
            self.consumed += self.gbs
            verdict = self.guard.judge(self.step, m.step_loss, grad_norm, m.step_skipped, saved_at is not None)
            if verdict.action == "rewind":  # to the last checkpoint, past the spike's data (launch/train/guard.py)
                saved_at = self.rewind(verdict.cause)
                window_time, window_steps, window = 0.0, 0, []
                continue
            if verdict.action == "ok":
                window.append(item)
            if self.step % log_every == 0 or self.step == self.steps:
                r.train_step(step=self.step, loss=m.mean_loss(window) if window else m.step_loss, lr=lr,
                             grad_norm=grad_norm, steps=self.steps, step_time_s=window_time / window_steps,
                             tokens=self.gbs * self.seq, consumed_samples=self.consumed,
                             global_batch_size=self.gbs,
                             counters={**self.guard.fields(), **(m.window_metrics(window) if window else {})})
                window_time, window_steps, window = 0.0, 0, []
            watchdog.beat(self.step)  # progress, for the hang watchdog (no I/O)
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
        final = self.export()
        r.event(f"done: {self.step} steps; final checkpoint {self.ckpt_dir / ckpt.step_name(self.step)}, "
                f"{m.export_kind} {final} (the next stage's stage.init_checkpoint)")
        return 0

    def _start_message(self) -> str:
        kind = "resuming" if self.step else "starting"
        m = self.module
        ramp = (f"; batch ramp-up {self.ramp.start} + {self.ramp.increment} over {self.ramp.samples} samples"
                if self.ramp else "")
        return (f"{kind} {self.cfg.name} at step {self.step}/{self.steps}: {m.n_params / 1e6:.2f}M parameters, "
                f"{m.describe()}; micro {m.mbs} x {m.micro_batches} micro-batches x dp {m.dp} = {self.gbs} "
                f"sequences of {self.seq} tokens; checkpoint every {self.save_every or 'never'} step(s) to "
                f"{self.ckpt_dir}{ramp}")

    def _set_batch(self, batch: int) -> None:
        if batch != self.gbs or self.module.micro_batches != micro_batches(batch, self.module.mbs, self.module.dp):
            self.gbs = batch
            self.module.set_batch(micro_batches(batch, self.module.mbs, self.module.dp))

    def _batches(self, dataset, first_sample: int, count: int) -> list:
        """This data-parallel rank's ``count`` micro-batches of the global batch starting at ``first_sample``."""
        m = self.module
        return [tuple(t.to(m.device) for t in micro_batch(
            dataset, first_sample=first_sample, micro=i, micro_batch_size=m.mbs, dp_rank=m.dp_rank, dp=m.dp))
            for i in range(count)]

    def evaluate(self) -> None:
        """Validation over ``train.eval_iters`` full global batches (the same ones each time: the numbers compare)."""
        m = self.module
        watchdog.beat(phase="validation")
        full = micro_batches(self.full_gbs, m.mbs, m.dp)
        with m.evaluating():
            items = [m.eval_step(self._batches(self.data.valid, it * self.full_gbs, full))
                     for it in range(self.cfg.train.eval_iters)]
        self.report.eval(step=self.step, loss=m.mean_loss(items), iters=self.cfg.train.eval_iters,
                         extra=m.window_metrics(items))

    # --- checkpoints ---------------------------------------------------------------------------

    def save(self) -> Path:
        """Every rank writes into ``.tmp_step_N``; all checksum the files (each its share); rank 0 commits
        with the manifest. Out of space or quota on any rank: the partial save is removed, and every rank
        raises ``StorageFull`` (the older checkpoints and ``latest`` untouched)."""
        m = self.module
        watchdog.beat(phase="checkpoint save")
        self._refuse_non_finite("checkpoint")
        tmp = self.ckpt_dir / f".tmp_{ckpt.step_name(self.step)}"
        final = self.ckpt_dir / ckpt.step_name(self.step)
        t0 = time.perf_counter()
        failure = trust.agree(trust.storage_error(self._fresh_tmp, tmp) if m.rank == 0 else None)
        if failure is None:
            failure = trust.agree(trust.storage_error(self._write_shards, tmp))
        if failure is None:
            sizes, sums = trust.file_checksums(tmp, m.rank, m.world)
            if m.rank == 0:
                failure = trust.storage_error(ckpt.commit, self.ckpt_dir, tmp.name, self.step, {
                    "step": self.step, "consumed_samples": self.consumed, "world_size": m.world,
                    "layout": m.layout(), "config": self.raw, "record_version": RECORD_VERSION, "time": time.time(),
                    "manifest": manifest.build(sizes, sums, step=self.step, config=self.raw,
                                               rng_ranks=list(range(m.world)), consumed_samples=self.consumed)},
                    self.cfg.train.keep_checkpoints)
            failure = trust.agree(failure)
        if failure:
            if m.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()
            line = ckpt.storage_line(self.ckpt_dir, self.step, failure, _latest(self.ckpt_dir))
            raise ckpt.StorageFull(line)
        if m.rank == 0:
            self.report.event(f"checkpoint {final} ({time.perf_counter() - t0:.1f} s, {len(sizes)} files, "
                              f"{sum(sizes.values()) / 1e6:.1f} MB checksummed)")
        dist.barrier()
        watchdog.beat(phase="training")
        return final

    def _fresh_tmp(self, tmp: Path) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that a kill interrupted
        tmp.mkdir()

    def _write_shards(self, tmp: Path) -> None:
        m = self.module
        m.save_shards(tmp, {"step": self.step, "consumed_samples": self.consumed})
        trust.inject_disk_full(self.step, m.rank, m.world, tmp)
        torch.save(rng_state(), tmp / f"rng_rank{m.rank}.pt")

    def resume(self, step_dir: Path) -> None:
        """Continue from the newest checkpoint that verifies (``step_dir``, preflight's pick after the cheap
        checks, or one before it): the module's state, the data position, the RNG states if the layout holds.

        Each candidate is verified across the ranks (sizes, checksums, every rank's RNG file); one skipped
        says so in one line. None verifies: ``UserError`` (the ``config`` outcome), never a run from step 0.
        """
        m = self.module
        skipped = []
        for candidate in ckpt.candidates(self.ckpt_dir):
            t0 = time.perf_counter()
            found, problem = trust.verify(candidate, m.rank, m.world, m.layout())
            if problem:
                skipped.append((candidate, problem))
                self.report.event(ckpt.skip_line(candidate, problem))
                continue
            if candidate != step_dir:  # preflight checked step_dir's config only
                refusal = ckpt.resume_refusal(candidate, self.raw, self.cfg.backend.name)
                if refusal:
                    raise UserError(refusal)
            self._load(candidate, found, time.perf_counter() - t0)
            return
        raise ckpt.none_verifies(self.ckpt_dir, skipped)

    def _load(self, step_dir: Path, found: ckpt.Inspection, verify_s: float) -> None:
        m, marker = self.module, found.marker
        step = int(marker["step"])
        m.load(step_dir, marker, step)
        self.step, self.consumed = step, int(marker["consumed_samples"])
        saved_layout = trust.saved_layout(marker)
        if saved_layout == m.layout():  # rank r is the same rank only then (verify: every rank's file is there)
            set_rng_state(torch.load(step_dir / f"rng_rank{m.rank}.pt", weights_only=False))
        checked = (f"; {found.warning}" if found.warning else
                   f"; verified {len(marker['manifest']['files'])} files in {verify_s:.1f} s")
        self.report.event(f"resumed from {step_dir}: step {self.step}, {self.consumed} samples consumed "
                          f"(saved with layout {saved_layout}){checked}")
        self.report.rewind(self.step)
        self.consumed = self.guard.on_resume(self.step, self.consumed)

    def rewind(self, cause: str) -> int:
        """A loss spike at ``self.step``: back to the newest checkpoint, the data past the spike's window."""
        step_dir = ckpt.find_resume(self.ckpt_dir)
        if step_dir is None:
            raise Diverged(f"{cause}; no committed checkpoint found in {self.ckpt_dir}", self.step)
        marker = ckpt.read_marker(step_dir)
        self.guard.plan_rewind(self.step, self.consumed, self.gbs, int(marker["step"]),
                               int(marker["consumed_samples"]), cause)
        self.resume(step_dir)
        return self.step

    def _refuse_non_finite(self, what: str) -> None:
        """Nothing non-finite is ever saved: one all-reduced flag over every rank's parameters."""
        if not self.module.params_finite():
            raise Diverged(f"step {self.step}: a parameter is not finite; no {what} written", self.step)

    def init_from(self, source) -> None:
        """``stage.init_checkpoint``'s weights (``launch.train.init_source.InitSource``), loaded by the engine
        now or, for one that loads them while building, already."""
        self.module.init_from(source)
        note = f"; {source.note}" if source.note else ""
        self.report.event(f"initialised from {source.path} ({source.format.value}, weights only{note})")
        self.report.record("init", step=0, path=str(source.path), format=source.format.value,
                           weights_sha256=self.module.init_fingerprint)

    def export(self) -> Path:
        """``{checkpoint_dir}/final``: the module's export, marked and renamed into place by rank 0."""
        m = self.module
        final, tmp = self.ckpt_dir / "final", self.ckpt_dir / ".tmp_final"
        watchdog.beat(phase="final export")
        self._refuse_non_finite("final export")
        if m.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        m.export(tmp, self.ckpt_dir / ckpt.step_name(self.step))
        dist.barrier()
        if m.rank == 0:
            ckpt.publish_final(tmp, final, {"step": self.step, "config": self.raw,
                                             "record_version": RECORD_VERSION, "time": time.time()})
        dist.barrier()
        return final

    def close(self) -> None:
        self.report.close()
        self.module.close()


def _latest(checkpoint_dir: Path) -> Path | None:
    try:
        return ckpt.find_resume(checkpoint_dir)
    except UserError:
        return None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
