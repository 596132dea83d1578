"""Goodput of a run across all its jobs, from its own records (no torch): ``trainctl status`` and the trainer.

Read from ``RUN_DIR/metrics.jsonl`` (rank 0's records, in the order written) and
``RUN_DIR/outcomes/*.json`` (how each job step ended, ``launch.record.outcome``):

- **job steps**: each starts with a ``job_start`` record (the trainer process's start
  time and its outcome key ``JOBREF.RESTART``) that ``launch.train.metrics.Reporter``
  writes; it ends at its last record or its outcome record's time, whichever is later.
  **Wall time** is the sum of the job steps' durations: time the run held its nodes
  (the queue waits between requeued jobs are not in it).
- **productive time**: the training steps that count, ``step_time_s`` x the steps each
  kept ``train`` record covers (from the previous logged step, or the step a ``resume``
  record says the job resumed from). Building, checkpoint loads and saves, validation and
  work later thrown away are not productive.
- **recomputed steps**: the steps covered by ``discarded_train`` records: trained by a job
  that ended without a checkpoint of them (``Reporter.rewind`` marks them when the next job
  resumes), so trained twice. Steps after the last logged one of a killed job are not known.
- **skipped steps** and **rewinds**: records of kind ``skip`` (one per step skipped for a
  non-finite loss or gradient) and ``rewind`` (one per loss spike rewound), which
  ``launch.train.guard`` writes.
- **endings**: how many job steps ended each way (``stopped``, ``crash``, ``hang``, ``node``,
  ...; ``no record`` for a job step killed before it could write one; ``running``). A job step
  that ended before the trainer logged anything (a failed health check, a configuration error)
  has an outcome record and no ``job_start``: it is counted here and in the job steps, with no
  wall time (its seconds are not known).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from launch.record import outcome

METRICS = "metrics.jsonl"
NO_RECORD = "no record"
RUNNING = "running"


@dataclass(frozen=True)
class Goodput:
    wall_s: float = 0.0
    productive_s: float = 0.0
    job_steps: int = 0
    recomputed_steps: int = 0
    skipped_steps: int = 0
    rewinds: int = 0
    endings: dict[str, int] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        return self.productive_s / self.wall_s if self.wall_s > 0 else None

    @property
    def restarts(self) -> int:
        """Job steps after the first: requeues and re-runs."""
        return max(0, self.job_steps - 1)

    def record(self) -> dict:
        """The figures as one metrics.jsonl object (kind ``goodput``)."""
        return {"kind": "goodput", "goodput": self.fraction, "productive_s": round(self.productive_s, 3),
                "wall_s": round(self.wall_s, 3), "job_steps": self.job_steps, "restarts": self.restarts,
                "recomputed_steps": self.recomputed_steps, "skipped_steps": self.skipped_steps,
                "rewinds": self.rewinds, "endings": dict(self.endings)}

    def line(self) -> str:
        frac = f"{100 * self.fraction:.1f}%" if self.fraction is not None else "n/a"
        ends = ", ".join(f"{k} {v}" for k, v in sorted(self.endings.items())) or "none"
        return (f"goodput {frac}: {self.productive_s:.1f} s productive training of {self.wall_s:.1f} s wall over "
                f"{self.job_steps} job step(s) ({self.restarts} restart(s)); {self.recomputed_steps} step(s) "
                f"recomputed after resumes; {self.skipped_steps} skipped step(s); {self.rewinds} rewind(s); "
                f"job steps ended: {ends}")


def of(run_dir: Path, *, running: bool = False, now: float | None = None) -> Goodput:
    """The run's goodput; ``running``: its last job step has not ended (it ends ``now`` if given)."""
    records = read_metrics(run_dir / METRICS)
    if not records:
        return Goodput()
    ended = _outcome_times(run_dir)
    segments: list[dict] = []
    prev, productive, recomputed, skipped, rewinds = 0, 0.0, 0, 0, 0
    for rec in records:
        kind, t = rec.get("kind"), _num(rec.get("time"))
        if kind == "job_start" or not segments:
            segments.append({"key": rec.get("job") if kind == "job_start" else None,
                             "start": t, "end": t})
        seg = segments[-1]
        if t is not None:
            seg["start"] = t if seg["start"] is None else min(seg["start"], t)
            seg["end"] = t if seg["end"] is None else max(seg["end"], t)
        step = rec.get("step")
        if kind == "resume" and isinstance(step, int):
            prev = step
        elif kind in ("train", "discarded_train") and isinstance(step, int):
            covered, prev = max(0, step - prev), step
            if kind == "train":
                productive += covered * (_num(rec.get("step_time_s")) or 0.0)
            else:
                recomputed += covered
        elif kind == "skip":
            skipped += 1
        elif kind == "rewind":
            rewinds += 1
    endings: Counter = Counter()
    wall = 0.0
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        done = ended.get(seg["key"]) if seg["key"] else None
        end = seg["end"]
        if done is not None:
            endings[done[0]] += 1
            end = max(end or done[1], done[1])
        else:
            endings[RUNNING if last and running else NO_RECORD] += 1
            if last and running and now is not None:
                end = max(end or now, now)
        if seg["start"] is not None and end is not None:
            wall += end - seg["start"]
    seen = {seg["key"] for seg in segments}
    early = [done for key, done in ended.items()  # ended before the trainer logged anything (none known in
             if key not in seen and seen != {None}]  # a metrics.jsonl older than its job_start records)
    endings.update(done[0] for done in early)
    return Goodput(wall_s=wall, productive_s=productive, job_steps=len(segments) + len(early),
                   recomputed_steps=recomputed,
                   skipped_steps=skipped, rewinds=rewinds, endings=dict(endings))


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's objects in order; a line being written (or damaged) is skipped."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _outcome_times(run_dir: Path) -> dict[str, tuple[str, float]]:
    """Outcome key (``JOBREF.RESTART``) -> (outcome, its time as unix seconds)."""
    found = {}
    for path in (run_dir / outcome.DIR).glob("*.json"):
        try:
            data = json.loads(path.read_text())
            found[path.stem] = (str(data["outcome"]), dt.datetime.fromisoformat(data["time"]).timestamp())
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _num(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
