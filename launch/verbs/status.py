"""``trainctl status [RUN_DIR ...]`` and ``trainctl cancel RUN_DIR``.

A path is a run directory (``job.json``), a sweep directory (``sweep.json``:
each point) or a pipeline directory (``pipeline.json``: each stage, in order);
no path means every run under ./runs that has been submitted. The state comes
from Slurm; progress from the run's own files: ``metrics.jsonl`` (the trainer's
last logged step and loss), ``outcomes/`` (how the job's last step ended, where, and
why: ``launch.record.outcome``), ``job.log`` (the job script's last decision: started,
requeued and why, finished), the crash streak the script keeps and the nodes its
requeues leave out (``job.excluded.JOBREF``), with why. Under the table, per run: its
nodes' heartbeats (``heartbeats/``, ``launch.record.heartbeats``: the newest and oldest,
and the nodes without progress past their hang timeout while the job runs, named
STALLED), and its goodput across all its jobs (``launch.record.goodput``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launch.errors import UserError
from launch.executors import local, slurm
from launch.record import goodput, heartbeats, jobs, outcome
from launch.record.read import PLAN, read_config, read_plan


@dataclass(frozen=True)
class Row:
    label: str
    run_dir: Path
    job_id: str | None
    pipeline: str | None = None
    """The pipeline directory this row is a stage of: a stage after a failed one never runs."""


def runs_of(paths: list[str]) -> list[Row]:
    if not paths:
        found = sorted(p.parent for p in Path("runs").glob("**/" + jobs.JOB_RECORD))
        if not found:
            raise UserError("no submitted runs under ./runs\n  fix: trainctl status RUN_DIR, or submit one "
                            "with trainctl submit ...")
        return [Row(str(d), d, jobs.latest_job_id(d)) for d in found]
    rows: list[Row] = []
    for text in paths:
        path = Path(text).absolute()  # once, here: records and /proc hold absolute paths; labels keep the text
        text = str(Path(text))
        if not path.is_dir():
            raise UserError(f"{text}: {'not a directory' if path.exists() else 'does not exist'}\n"
                            "  fix: give a run, sweep or pipeline directory that `trainctl submit` printed (runs/NAME)")
        if (sweep := jobs.read(path / jobs.SWEEP_RECORD)) is not None:
            rows += [Row(f"{text}/{Path(p['run_dir']).name}", path / p["run_dir"], p.get("job_id"))
                     for p in sweep["points"]]
        elif (pipeline := jobs.read(path / jobs.PIPELINE_RECORD)) is not None:
            rows += [Row(f"{text} [{s['name']}]", path / s["run_dir"], s.get("job_id"), str(path))
                     for s in pipeline["stages"]]
        elif (record := jobs.read(path / jobs.JOB_RECORD)) is not None and record.get("jobs"):
            last = record["jobs"][-1]
            if last.get("array_tasks"):  # trainctl prepare's job array: one row per shard
                rows += [Row(f"{text} [{name}]", path, f"{last['job_id']}_{i}")
                         for i, name in enumerate(last["array_tasks"])]
            else:
                rows.append(Row(text, path, last["job_id"]))
        else:
            raise UserError(f"{text}: no job.json, sweep.json or pipeline.json: nothing was submitted from there\n"
                            "  fix: give a run directory that `trainctl submit` printed")
    return rows


def status_main(args: list[str]) -> int:
    rows = runs_of(args)
    states = _states(rows)
    table = Table(box=None, header_style="bold")
    for column in ("run", "job", "state", "elapsed", "requeues", "crashes", "step", "loss", "last outcome",
                   "nodes left out", "last word from the job"):
        table.add_column(column, overflow="fold")
    doomed: set[str] = set()  # pipelines with a failed stage
    for row in rows:
        s = states.get(row.job_id or "")
        step, loss = last_metrics(row.run_dir)
        total = planned_steps(row.run_dir)
        state = describe(s) if s else "not submitted"
        if row.pipeline and s:
            if row.pipeline in doomed and s.state == "PENDING":
                state = NEVER
            if state == NEVER or s.state in FAILED:
                doomed.add(row.pipeline)
        cells = [row.label, row.job_id or "-", state, s.elapsed if s else "",
                 str(s.restarts) if s else "", str(crashes(row.run_dir, row.job_id)),
                 "" if step is None else f"{step}/{total}" if total else str(step), "" if loss is None else f"{loss:.4g}",
                 last_outcome(row.run_dir, row.job_id), excluded(row.run_dir, row.job_id), last_log_line(row.run_dir)]
        table.add_row(*map(escape, cells))  # a run directory may contain [brackets]
    console = Console(width=200)
    console.print(table)
    for row in rows:  # under the table: lines too long for a cell
        s = states.get(row.job_id or "")
        beats = node_beats(row.run_dir, running=bool(s) and s.state == "RUNNING")
        figures = goodput.of(row.run_dir, running=bool(s) and s.active)
        for line in ([beats] if beats else []) + ([figures.line()] if figures.job_steps else []):
            console.print(escape(f"{row.label}: {line}"), soft_wrap=True)
    return 0


def cancel_main(args: list[str]) -> int:
    if not args:
        raise UserError("cancel needs a run, sweep or pipeline directory\n  fix: trainctl cancel runs/NAME")
    rows = runs_of(args)
    states = _states(rows)
    active = [r for r in rows if r.job_id and states.get(r.job_id) and states[r.job_id].active]
    if not active:
        print("nothing to cancel: no job of " + ", ".join(args) + " is pending or running")
        return 0
    for r in [r for r in active if jobs.is_local(r.job_id)]:  # SIGTERM to its launcher: checkpoint, then stop
        local.cancel(r.job_id)
        print(f"stopping local run {r.job_id}: its ranks save a checkpoint, then end: {r.label}")
    active = [r for r in active if not jobs.is_local(r.job_id)]
    if not active:
        return 0
    slurm.cancel([r.job_id for r in active])
    for r in active:
        print(f"cancelled job {r.job_id} ({states[r.job_id].state}): {r.label}")
    return 0


NEVER = "NEVER RUNS (an earlier stage failed)"
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _states(rows: list[Row]) -> dict:
    """job id -> JobState: local runs from their records, the rest from Slurm (one query)."""
    found = {r.job_id: jobs.local_state(r.run_dir) for r in rows if jobs.is_local(r.job_id)}
    found.update(slurm.states([r.job_id for r in rows if r.job_id and not jobs.is_local(r.job_id)]))
    return found


def describe(state) -> str:
    if state.state == "PENDING" and state.reason == "DependencyNeverSatisfied":
        return NEVER
    if state.state == "PENDING" and state.reason not in ("", "None"):
        return f"PENDING ({state.reason})"
    if state.state in FAILED and state.exit_code:
        return f"{state.state} (exit {state.exit_code})"
    return state.state


def planned_steps(run_dir: Path) -> int | None:
    """The run's planned steps, or None where nothing was planned (a prepare job's directory).

    Its records are read through ``launch.record.read``, so a damaged ``config.yaml`` or ``plan.json``
    is reported here, before the job that would read it is requeued.
    """
    if not (run_dir / PLAN).exists():
        return None
    read_config(run_dir)
    return read_plan(run_dir).run.steps


def last_metrics(run_dir: Path) -> tuple[int | None, float | None]:
    """Step and loss of the last training record in RUN_DIR/metrics.jsonl (one JSON object per logged step)."""
    for line in reversed(_tail(run_dir / "metrics.jsonl")):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if record.get("kind", "train") == "train" and "loss" in record:  # not eval, not discarded_train
            return record.get("step"), record["loss"]
    return None, None


def node_beats(run_dir: Path, *, running: bool, shown: int = 10) -> str:
    """One line for all nodes' heartbeats (a run may have thousands): the newest and the oldest, then, while
    the job runs, the nodes without progress past their hang timeout, named STALLED (at most ``shown``)."""
    beats = sorted(heartbeats.read_all(run_dir), key=lambda b: -b.unix)
    if not beats:
        return ""

    def one(b) -> str:
        return f"{b.node} at step {b.step} ({b.phase}) {b.age():.0f} s ago"

    line = f"heartbeats from {len(beats)} node(s): newest {one(beats[0])}"
    if len(beats) > 1:
        line += f", oldest {one(beats[-1])}"
    now = (beats[0].job, beats[0].restart)  # a node an earlier job step ran on (excluded since) is not stalled
    stalled = [b for b in beats if running and (b.job, b.restart) == now and b.stalled()]
    if stalled:
        more = f" and {len(stalled) - shown} more" if len(stalled) > shown else ""
        line += (f"; STALLED (no progress past train.hang_timeout_s={stalled[-1].hang_timeout_s:g}): "
                 + ", ".join(f"{b.node} {b.age():.0f} s ago at step {b.step}" for b in stalled[-shown:]) + more)
    return line


def last_log_line(run_dir: Path) -> str:
    line = _last_line(run_dir / "job.log")
    return line.split(": ", 2)[-1] if line else ""


def crashes(run_dir: Path, job_id: str | None) -> int:
    """The job's crashes in a row without a new checkpoint (``job.crashes.JOBREF``: "N LATEST")."""
    try:
        return int((run_dir / f"job.crashes.{job_id}").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return 0


def excluded(run_dir: Path, job_id: str | None) -> str:
    """The nodes the job's requeues leave out and why, one a line: "node3: health check: GPU 2 ...".

    The job script keeps them in ``job.excluded.JOBREF`` ("NODE<TAB>why", oldest first; bounded by
    ``cluster.max_excluded_nodes``), where a requeue after a ``node`` outcome or a crash adds one.
    """
    try:
        lines = (run_dir / f"job.excluded.{job_id}").read_text(errors="replace").splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return ""
    return "\n".join(f"{node}: {why}" if why else node
                     for node, _, why in (line.partition("\t") for line in lines) if node)


def last_outcome(run_dir: Path, job_id: str | None) -> str:
    """How the job's latest step ended: "crash on node3 (rank 5, step 120): RuntimeError: ...".

    A damaged record is named in the cell instead of failing the whole table: status is
    what one runs to look at a broken run, and the job script already treats that step
    as one without a record (a crash).
    """
    path = outcome.last(run_dir, job_id)
    if path is None:
        return ""
    try:
        r = outcome.read(path)
    except UserError:
        return f"damaged record {path.parent.name}/{path.name}"
    where = ", ".join(x for x in (f"rank {r.rank}" if r.rank is not None else "",
                                  f"step {r.step}" if r.step is not None else "") if x)
    return f"{r.outcome.value} on {r.node}{f' ({where})' if where else ''}: {r.cause}"


def _last_line(path: Path) -> str:
    lines = _tail(path)
    return lines[-1].strip() if lines else ""


def _tail(path: Path, size: int = 8192) -> list[str]:
    """The last lines of a file (up to ``size`` bytes), without reading all of a long log."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
