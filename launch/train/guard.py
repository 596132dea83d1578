"""Bad numbers during training: non-finite steps are skipped, loss spikes rewound, divergence stops the run.

Every step, every rank ends with the same two numbers: the step's loss, agreed by one
all-reduce of a small tensor (``[loss sum, count]``: a non-finite loss on any rank
makes the sum non-finite; the engine's ``step_loss``, set by its ``train_step``), and
the global gradient norm the engine already agreed. ``judge`` decides from them alone,
so every rank takes the same branch without another collective:

- **non-finite loss or gradient norm**: the step is *skipped* (no optimizer update;
  the step counter, the LR schedule and the data position still advance: the batch is
  dropped). Megatron-Core: the engine asks before ``optimizer.step()`` (a non-finite
  loss, or a non-finite grad norm from ``optimizer.get_grad_norm``) and does not step.
  DeepSpeed: ZeRO-3, and every stage at bf16 (its ``check_grad_overflow``, on by
  default), already discards a step whose gradient norm is not finite and counts it
  (``engine.skipped_steps``); the engine reads that count. Where DeepSpeed applied
  such a step anyway (ZeRO 0-2 at fp32), the weights are not trusted: *diverged*.
  After ``train.guard.max_consecutive_skips`` in a row, or ``train.guard.max_skipped_steps``
  in all, the run *diverged*.
- **loss spike**: the loss is ``train.guard.spike_zscore`` standard deviations above
  the mean of the last ``train.guard.spike_window`` finite losses. The trainer rewinds
  in process to the newest committed checkpoint (all of them precede the spike: a
  spike is judged before that step's save) and moves the data position past the
  spike's batch and ``train.guard.spike_skip_batches`` more (PaLM, Chowdhery et al.
  2022 sec. 5.1: restart ~100 steps before the spike and skip 200-500 batches). At
  most ``train.guard.max_rewinds`` times per run; the next spike means *diverged*.
  No checkpoint before the spike: *diverged* (there is nothing to rewind to, and the
  update of the spike step is already applied; a human decides).
- **diverged**: ``Diverged`` is raised on every rank together; the entrypoint ends
  with exit code 6 and the outcome ``diverged``, which the job script does not
  requeue (replaying the same data diverges again). A checkpoint or a final export
  is never written when any parameter is not finite (``Trainer.save``/``export`` ask
  the engine's ``params_finite``, one all-reduced flag): that also ends ``diverged``.

Skipped data survives a requeue: each rewind is recorded in ``RUN_DIR/guard.json``
(rank 0, written whole) as (checkpoint step, its data position, the new position),
and a resume from that checkpoint at that position moves on to the new one, so a job
requeued between a rewind and the next checkpoint does not replay the spike's data.
The same file holds the run's counters (skipped steps, rewinds, skipped samples),
which every train record of ``metrics.jsonl`` carries (``skipped_steps``,
``rewinds``, ``skipped_samples``), beside one record per event (``kind``: ``skip``,
``rewind``, ``diverged``).

**Which upstream design this follows.** OLMo-core's ``SkipStepOptimizer``
(``SkipStepAdamW``) keeps a rolling window of losses and grad norms and makes the
update a no-op when the step's loss or norm is non-finite or more than
``sigma_factor`` (6) standard deviations above the window's mean: the decision is
per step, local to the optimizer, and costs nothing but a small reduction. We follow
it for the decision (window, z-score, skip without update). Megatron-LM's rerun state
machine instead re-runs a suspicious step in process to tell a transient hardware
fault from a real one (same result twice: a data or model problem; different: a
faulty GPU, exit and requeue elsewhere); it needs Megatron-LM's own training loop
and data iterator, and on a CPU test (deterministic) a rerun never disagrees, so it
would only double the cost of every bad step here. Where OLMo-core only skips a
spiking step, we rewind and skip data as PaLM did: a spike's step has already moved
the weights by the time its loss is known (DeepSpeed applies the update inside
``engine.step()``), so skipping alone would keep the damage.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

EXIT_DIVERGED = 6
"""The entrypoint's exit code for a run that diverged (``launch.train.__main__``)."""
FILE = "guard.json"
SPIKE_FACTOR = 1000.0
"""``TRAINCTL_FAULT_SPIKE_AT_STEP`` multiplies the step's loss value (not its gradient) by this."""
STD_FLOOR = 0.01
"""The window's standard deviation counts as at least this share of its mean: a flat window (a
constant loss) would otherwise call any rounding difference a spike."""


class Diverged(Exception):
    """Raised on every rank together when training cannot go on; the message is the outcome's cause."""

    def __init__(self, cause: str, step: int):
        super().__init__(cause)
        self.cause, self.step = cause, step


# --- the pure decisions -----------------------------------------------------------------------

@dataclass
class Counters:
    """What happened in this run so far, across jobs (``RUN_DIR/guard.json``)."""

    skipped_steps: int = 0
    rewinds: int = 0
    skipped_samples: int = 0
    skips: list = field(default_factory=list)
    """Data windows skipped after a rewind: ``{"step", "from_sample", "to_sample"}`` (the checkpoint's step
    and data position, and where the data continues instead)."""


@dataclass
class Verdict:
    action: str
    """"ok", "skip" (no update happened), "rewind" (a spike) or "diverged"."""
    cause: str = ""
    zscore: float | None = None


def finite(x) -> bool:
    return x is not None and math.isfinite(x)


def zscore(history: list[float], loss: float, window: int) -> float | None:
    """How many standard deviations ``loss`` lies above the mean of the last ``window`` losses; None
    while fewer than ``window`` are known."""
    if len(history) < window:
        return None
    last = history[-window:]
    mean = sum(last) / window
    std = math.sqrt(sum((x - mean) ** 2 for x in last) / window)
    return (loss - mean) / max(std, STD_FLOOR * abs(mean), 1e-12)


def decide(policy, counters: Counters, consecutive: int, history: list[float], *, step: int,
           loss: float, grad_norm: float | None, engine_skipped: bool, have_checkpoint: bool) -> Verdict:
    """The verdict on step ``step`` (1-based) from the agreed loss and grad norm; ``consecutive``: skips
    just before it; ``history``: the finite losses of the steps before it (oldest first)."""
    bad = []
    if not finite(loss):
        bad.append(f"loss {loss}")
    if grad_norm is not None and not finite(grad_norm):
        bad.append(f"grad norm {grad_norm}")
    if engine_skipped and not bad:
        bad.append("the engine found non-finite gradients")
    if bad:
        what = f"step {step}: {', '.join(bad)}"
        if consecutive + 1 >= policy.max_consecutive_skips:
            return Verdict("diverged", f"{what}: {consecutive + 1} non-finite step(s) in a row "
                                       f"(train.guard.max_consecutive_skips={policy.max_consecutive_skips})")
        if counters.skipped_steps + 1 >= policy.max_skipped_steps:
            return Verdict("diverged", f"{what}: {counters.skipped_steps + 1} non-finite step(s) in this run "
                                       f"(train.guard.max_skipped_steps={policy.max_skipped_steps})")
        return Verdict("skip", f"{what}: skipped, no update")
    if policy.spike_zscore is None:
        return Verdict("ok")
    z = zscore(history, loss, policy.spike_window)
    if z is None or z <= policy.spike_zscore:
        return Verdict("ok", zscore=z)
    mean = sum(history[-policy.spike_window:]) / policy.spike_window
    what = (f"loss spike at step {step}: {loss:.4g} is {z:.1f} standard deviations above the mean {mean:.4g} "
            f"of the last {policy.spike_window} steps (train.guard.spike_zscore={policy.spike_zscore})")
    if counters.rewinds >= policy.max_rewinds:
        return Verdict("diverged", f"{what}; {counters.rewinds} rewind(s) already "
                                   f"(train.guard.max_rewinds={policy.max_rewinds})", z)
    if not have_checkpoint:
        return Verdict("diverged", f"{what}; no checkpoint before it to rewind to", z)
    return Verdict("rewind", what, z)


def resume_position(counters: Counters, step: int, consumed: int) -> int:
    """Where the data continues after resuming at ``step`` with ``consumed`` samples: past the newest
    skipped window recorded for exactly that checkpoint, else ``consumed``."""
    for skip in reversed(counters.skips):
        if skip["step"] == step and skip["from_sample"] == consumed:
            return int(skip["to_sample"])
    return consumed


# --- test-only fault knobs -------------------------------------------------------------------

def fault_steps(name: str, env=os.environ) -> set[int]:
    """``TRAINCTL_FAULT_*_AT_STEP=N[,M,A-B...]``: 1-based step numbers (test-only knobs, off by default)."""
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in env.get(name, "").split(","))):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps


class Faults:
    """The loss faults tests inject: each listed step fires the first time that step runs in a process,
    so a rewind replays it clean (as a skipped bad batch would be)."""

    def __init__(self, env=os.environ):
        self.nan = fault_steps("TRAINCTL_FAULT_NAN_AT_STEP", env)
        self.spike = fault_steps("TRAINCTL_FAULT_SPIKE_AT_STEP", env)
        self.weight = fault_steps("TRAINCTL_FAULT_NAN_WEIGHT_AT_STEP", env)
        self.fired: set[tuple[str, int]] = set()

    def kind(self, step: int) -> str | None:
        """"nan", "spike" or None for 1-based ``step``; called once per step by ``train_step``."""
        for kind, steps in (("nan", self.nan), ("spike", self.spike)):
            if step in steps and (kind, step) not in self.fired:
                self.fired.add((kind, step))
                return kind
        return None


def corrupt_weight(faults: Faults, step: int, tensors) -> None:
    """``TRAINCTL_FAULT_NAN_WEIGHT_AT_STEP``: after step ``step``'s update, the first element of the first
    non-empty tensor of ``tensors`` (this rank's parameters) becomes NaN, as silent corruption would."""
    if step in faults.weight and ("weight", step) not in faults.fired:
        faults.fired.add(("weight", step))
        first = next(t for t in tensors if t.numel())
        first.data.view(-1)[0] = float("nan")


def apply_fault(loss, kind: str | None, *, here: bool):
    """The loss tensor with ``kind``'s fault applied on this rank (``here``): NaN (value and gradients),
    or a spike (the value times ``SPIKE_FACTOR``, the gradient unchanged)."""
    if kind == "nan" and here:
        return loss * float("nan")
    if kind == "spike":
        return loss + (SPIKE_FACTOR - 1.0) * loss.detach()
    return loss


# --- the trainer's side ----------------------------------------------------------------------

class Guard:
    """The per-run state the trainer (``launch.train.loop``) consults after each step."""

    def __init__(self, policy, run_dir: Path, report, *, writer: bool):
        self.policy, self.report, self.writer = policy, report, writer
        self.path = run_dir / FILE
        self.counters = read(self.path)
        self.consecutive = 0
        self.history: list[tuple[int, float]] = []  # (step, finite loss) of recent steps
        self.last: dict = {}  # the last judged step's loss and z-score, for the rewind record

    def judge(self, step: int, loss: float, grad_norm: float | None, engine_skipped: bool,
              have_checkpoint: bool) -> Verdict:
        """Step ``step`` (1-based) is done: its verdict; counted and recorded. Raises ``Diverged``."""
        p = self.policy
        losses = [x for _, x in self.history[-p.spike_window:]] if p.spike_window else []
        v = decide(p, self.counters, self.consecutive, losses, step=step, loss=loss, grad_norm=grad_norm,
                   engine_skipped=engine_skipped, have_checkpoint=have_checkpoint)
        if v.action == "diverged":
            self.report.record("diverged", step=step, cause=v.cause, **self.fields())
            raise Diverged(v.cause, step)
        if v.action == "skip":
            self.consecutive += 1
            self.counters.skipped_steps += 1
            self._save()
            self.report.record("skip", step=step, cause=v.cause, loss=loss, grad_norm=grad_norm,
                               consecutive=self.consecutive, **self.fields())
            self.report.event(f"{v.cause} (skip {self.consecutive} in a row, {self.counters.skipped_steps} in "
                              f"this run)")
            return v
        self.consecutive = 0
        self.last = {"loss": loss, "zscore": v.zscore}
        if v.action == "ok":
            self.history.append((step, loss))
            del self.history[:-max(p.spike_window, 1)]
        return v

    def plan_rewind(self, spike_step: int, consumed: int, batch: int, ckpt_step: int, ckpt_consumed: int,
                    cause: str) -> None:
        """Record the data window to skip: from the checkpoint's position to past the spike's batch
        (``consumed``: the position after it) and ``spike_skip_batches`` more batches of ``batch``."""
        to = consumed + self.policy.spike_skip_batches * batch
        c = self.counters
        c.rewinds += 1
        c.skipped_samples += to - ckpt_consumed
        c.skips.append({"step": ckpt_step, "from_sample": ckpt_consumed, "to_sample": to})
        self._save()
        self.history = [(s, x) for s, x in self.history if s <= ckpt_step]
        self.consecutive = 0
        self.report.record("rewind", step=spike_step, cause=cause, **self.last, to_step=ckpt_step,
                           from_sample=ckpt_consumed, to_sample=to, **self.fields())
        self.report.event(f"{cause}: rewinding to the checkpoint of step {ckpt_step} and skipping samples "
                          f"{ckpt_consumed}..{to - 1} (rewind {c.rewinds} of at most {self.policy.max_rewinds})")

    def on_resume(self, step: int, consumed: int) -> int:
        """The data position to continue from after loading the checkpoint of ``step``."""
        self.history = [(s, x) for s, x in self.history if s <= step]
        self.consecutive = 0
        to = resume_position(self.counters, step, consumed)
        if to != consumed:
            self.report.event(f"skipping samples {consumed}..{to - 1} after step {step}, as a rewind past a loss "
                              f"spike decided ({self.path})")
        return to

    def fields(self) -> dict:
        """The counters every train record carries."""
        c = self.counters
        return {"skipped_steps": c.skipped_steps, "rewinds": c.rewinds, "skipped_samples": c.skipped_samples}

    def _save(self) -> None:
        if self.writer:
            tmp = self.path.with_name(f".{FILE}.{os.getpid()}")
            tmp.write_text(json.dumps(asdict(self.counters)) + "\n")
            os.replace(tmp, self.path)


def read(path: Path) -> Counters:
    """The run's counters; zero when the run has none yet."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return Counters()
    except (OSError, ValueError) as exc:
        from launch.errors import UserError

        raise UserError(f"{path}: not a record trainctl wrote ({type(exc).__name__}: {exc})\n  fix: restore it, "
                        "or remove it to forget the run's skipped steps and skipped data windows") from None
    return Counters(**{k: data[k] for k in ("skipped_steps", "rewinds", "skipped_samples", "skips") if k in data})
