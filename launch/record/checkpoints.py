"""Checkpoints on disk: committed by a rename, found again through ``latest``, refused when they do not fit.

Layout under ``train.checkpoint_dir`` (default ``RUN_DIR/checkpoints``)::

    step_0000010/          the engine's files (DeepSpeed's shards of every rank, or a Megatron-Core
                           distributed checkpoint), rng_rank{R}.pt (each rank's RNG states),
                           trainctl.json (step, consumed samples, layout, the run's resolved config,
                           record version, the manifest: launch.record.manifest, its own
                           CRC-32): trainctl.json marks it complete
    step_0000020/
    latest                 "step_0000020"
    final/                 the end-of-run export (the next stage's stage.init_checkpoint)

The sequence (``launch.train.loop.Trainer.save``): every rank writes into
``.tmp_step_NNNNNNN``, then, after a barrier, all ranks checksum the files, rank 0 adds
trainctl.json, renames the directory to ``step_NNNNNNN`` and replaces ``latest`` atomically
(temporary file + ``os.replace``); it keeps the newest ``train.keep_checkpoints`` good steps. A job killed during a save leaves
only a ``.tmp_`` directory, which the next save of that step replaces; ``latest``
always names a complete step. ``checkpoint_dir`` must be a file system every node
sees (as RUN_DIR is on SLURM).

What may change on resume is ``launch.config.resume``'s; the trainer checks on the
node, ``submit`` on the login node (``resume_problem``).
``latest`` is DeepSpeed's own file name and format too, so ``deepspeed``'s
``zero_to_fp32.py`` works on the directory.

**Trust** (``launch.record.manifest``): the marker holds a manifest of every file
(size, CRC-32), computed after the barrier by all ranks in parallel, and a CRC-32 of
itself. A checkpoint is *good* when its marker is readable, sealed and holds a
manifest, and every file listed is there with its size (``inspect``: stats, no
reading; what ``submit`` checks on the login node). Resume walks the candidates
(``candidates``: the step ``latest`` names, then older steps, newest first), and the
trainer verifies each one's checksums across its ranks before loading it, skipping a
damaged one with one line saying why. Checkpoints exist but none verifies: the job stops
with the ``config`` outcome (``none_verifies``) rather than train from step 0 over them.
A marker without a manifest (written before trainctl verified checkpoints) is loaded as
before, unverified, with a warning line. Pruning (``prune``) keeps the newest
``train.keep_checkpoints`` good ones and everything newer than the oldest of them, so
it never deletes the only checkpoint that verifies.

**Storage.** A directory that cannot be written is found before the model is built
(``writable_problem``); a save that fails for want of space or quota (``STORAGE_ERRNOS``)
removes its ``.tmp_`` directory and ends the job with ``StorageFull`` (the ``storage``
outcome: stop, no requeue; ``launch.record.outcome``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from launch.config.resume import refusal
from launch.config.schema import BackendName, Config
from launch.errors import UserError
from launch.record import fingerprint, manifest
from launch.record.write import write_file

KEEP = 3
"""``train.keep_checkpoints``'s default."""
STEP_DIR = re.compile(r"^step_(\d{7,})$")
MARKER = "trainctl.json"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_dir(cfg, run_dir: Path) -> Path:
    """train.checkpoint_dir, or RUN_DIR/checkpoints."""
    return Path(cfg.train.checkpoint_dir).expanduser().absolute() if cfg.train.checkpoint_dir \
        else run_dir / "checkpoints"


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


@dataclass(frozen=True)
class Inspection:
    marker: dict | None
    problem: str | None
    """Why this checkpoint must not be loaded; None: good (or legacy, see ``warning``)."""
    warning: str | None = None
    """Set for a checkpoint without a manifest: loadable, but nothing can be verified."""

    @property
    def verifiable(self) -> bool:
        return self.problem is None and self.warning is None


def inspect(step_dir: Path, *, sizes: bool = True) -> Inspection:
    """The cheap checks: the marker readable, sealed, with a step and a data position; its manifest's files
    present with their sizes (``sizes``: a stat per file, no reading). No checksums: ``verify_share``."""
    try:
        marker = json.loads((step_dir / MARKER).read_text())
    except FileNotFoundError:
        return Inspection(None, f"no {MARKER} (never committed, or partly deleted)")
    except (OSError, ValueError) as exc:
        return Inspection(None, f"unreadable {MARKER} ({exc})")
    if not isinstance(marker, dict):
        return Inspection(None, f"unreadable {MARKER} (not an object)")
    problem = manifest.seal_problem(marker)
    missing = [k for k in ("step", "consumed_samples") if not isinstance(marker.get(k), int)]
    if problem or missing:
        return Inspection(None, problem or f"no {' or '.join(missing)} in {MARKER}")
    if "manifest" not in marker:
        return Inspection(marker, None, "no manifest (saved before trainctl verified checkpoints): "
                                        "loaded unverified")
    found = marker["manifest"]
    problem = manifest.shape_problem(found)
    if problem is None and found.get("step") != marker["step"]:
        problem = f"the manifest is of step {found.get('step')}, the marker of step {marker['step']}"
    if problem is None and sizes:
        problem = manifest.size_problem(step_dir, found)
    return Inspection(marker, problem)


def verify_share(step_dir: Path, found: Inspection, rank: int, world: int) -> str | None:
    """This rank's part of a checkpoint's verification: the checksums of its ``manifest.share`` of the files."""
    if not found.verifiable:
        return found.problem
    listed = found.marker["manifest"]
    return manifest.checksum_problem(step_dir, listed, manifest.share(manifest.sizes_of(listed), rank, world))


def rng_problem(step_dir: Path, found: Inspection, world: int) -> str | None:
    """Why the RNG states of ``world`` ranks cannot be restored from ``step_dir`` (same layout only), or None."""
    want = [f"rng_rank{r}.pt" for r in range(world)]
    listed = found.marker.get("manifest", {}).get("pieces", {}).get("rng") if found.marker else None
    absent = [n for n in want if n not in listed] if listed is not None else \
        [n for n in want if not (step_dir / n).is_file()]
    return f"missing file {absent[0]} (the RNG states of rank {absent[0][8:-3]})" if absent else None


def candidates(checkpoint_dir: Path) -> list[Path]:
    """The step directories a resume tries, in order: the one ``latest`` names, then the older ones, newest
    first (a ``latest`` that names nothing: every step, newest first). Damaged ones included."""
    steps = sorted((p for p in _listdir(checkpoint_dir) if STEP_DIR.match(p.name) and p.is_dir()),
                   key=step_of, reverse=True)
    latest = checkpoint_dir / "latest"
    try:
        named = checkpoint_dir / latest.read_text().strip() if latest.is_file() else None
    except OSError:
        named = None
    if named is None or named not in steps:
        return steps
    return [named] + [p for p in steps if step_of(p) < step_of(named)]


def _listdir(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def find_resume(checkpoint_dir: Path) -> Path | None:
    """The first candidate that passes the cheap checks (``inspect``), or None when there is no checkpoint;
    ``UserError`` (``none_verifies``) when there are checkpoints and none of them passes."""
    skipped = []
    for step_dir in candidates(checkpoint_dir):
        problem = inspect(step_dir).problem
        if problem is None:
            return step_dir
        skipped.append((step_dir, problem))
    if skipped:
        raise none_verifies(checkpoint_dir, skipped)
    return None


def skip_line(step_dir: Path, problem: str) -> str:
    """The one line a resume prints for a checkpoint it does not load."""
    return f"skipped checkpoint {step_dir}: {problem}; trying the one before it"


def none_verifies(checkpoint_dir: Path, skipped: list[tuple[Path, str]]) -> UserError:
    reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
    return UserError(f"train.checkpoint_dir={checkpoint_dir}: no checkpoint there verifies ({reasons}), so this run "
                     "stops instead of training from step 0 over them\n  fix: restore a good copy of a step "
                     f"directory, or move {checkpoint_dir} aside to train this run from scratch")


def read_marker(step_dir: Path) -> dict:
    """A step directory's ``trainctl.json``; ``UserError`` naming it when it is damaged."""
    found = inspect(step_dir, sizes=False)
    if found.marker is None or found.problem:
        raise UserError(f"{step_dir / MARKER}: {found.problem}\n  fix: move {step_dir} aside to resume "
                        "from the checkpoint before it")
    return found.marker


def write_json(path: Path, data: dict) -> None:
    """A marker written whole through a new file (never in place: ``final``'s files may be hard links)."""
    write_file(path, json.dumps(data, indent=2) + "\n")


def commit(checkpoint_dir: Path, tmp_tag: str, step: int, marker: dict, keep: int = KEEP) -> Path:
    """Rank 0, after every rank wrote ``tmp_tag``: mark it complete (sealed), rename it, point ``latest`` at it,
    prune."""
    tmp, final = checkpoint_dir / tmp_tag, checkpoint_dir / step_name(step)
    write_json(tmp / MARKER, manifest.seal(marker))
    if final.exists():  # the same step saved again (a resumed run that stopped at once): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_latest(checkpoint_dir, final.name)
    prune(checkpoint_dir, keep)
    return final


def publish_final(tmp: Path, final: Path, marker: dict) -> None:
    """Rank 0's last move of an export: the marker (with the fingerprint of the weights, for the next stage
    to check it starts from them: ``launch.record.fingerprint``) written last, then ``tmp`` renamed to
    ``final`` in place of an older one."""
    write_json(tmp / MARKER, {**marker, "weights_sha256": fingerprint.of_directory(tmp)})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def write_latest(checkpoint_dir: Path, tag: str) -> None:
    tmp = checkpoint_dir / f".latest.{os.getpid()}"
    tmp.write_text(tag)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint_dir / "latest")


def prune(checkpoint_dir: Path, keep: int = KEEP) -> list[Path]:
    """Delete the step directories older than the ``keep``-th newest good one (never the one ``latest`` names);
    the deleted ones.

    Good: a sealed marker with a manifest (``inspect`` without sizes: no stat per shard at every save). A
    damaged or unverifiable (pre-manifest) checkpoint does not count, so the newest good ones survive
    however many damaged ones follow them: pruning never deletes the only checkpoint that verifies.
    """
    latest = (checkpoint_dir / "latest").read_text().strip() if (checkpoint_dir / "latest").is_file() else None
    steps = sorted((p for p in _listdir(checkpoint_dir) if STEP_DIR.match(p.name) and p.is_dir()),
                   key=step_of, reverse=True)
    good, deleted = 0, []
    for i, step_dir in enumerate(steps):
        if good >= max(1, keep):
            deleted += [old for old in steps[i:] if old.name != latest]
            break
        good += inspect(step_dir, sizes=False).verifiable
    for old in deleted:
        shutil.rmtree(old, ignore_errors=True)
    return deleted


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""A save that fails with these fails again until someone frees space: the ``storage`` outcome."""


class StorageFull(Exception):
    """A save ran out of space or quota; its ``.tmp_`` directory is removed, the older checkpoints are intact."""


def storage_line(checkpoint_dir: Path, step: int, error: str, good: Path | None) -> str:
    """The one line a save that ran out of space prints: where, how much is free, what is left."""
    try:
        free = f"{shutil.disk_usage(checkpoint_dir).free / 2**30:.2f} GiB free"
    except OSError as exc:
        free = f"free space unknown ({exc.strerror})"
    return (f"checkpoint of step {step} not saved: {error}; {checkpoint_dir} has {free}; the partial save was "
            f"removed, latest is {good.name if good else 'none'}; stopped, not requeued: free space there and "
            "submit again (it resumes from latest)")


def writable_problem(checkpoint_dir: Path) -> str | None:
    """Why checkpoints cannot be written under ``checkpoint_dir``, or None: a file is created and removed in
    it, or in its nearest existing parent when it does not exist yet (nothing is created for good here).

    A real write, not ``os.access``: root passes every permission check, and a read-only mount or a
    path under a regular file fails only when written.
    """
    target = checkpoint_dir
    while not target.exists() and target.parent != target:
        target = target.parent
    probe = target / f".trainctl_write_probe.{os.uname().nodename}.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"trainctl")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        return (f"train.checkpoint_dir={checkpoint_dir}: cannot write there ({type(exc).__name__}: "
                f"[Errno {exc.errno}] {exc.strerror}: {target}); nothing was trained\n  fix: point "
                "train.checkpoint_dir at a writable directory every node sees, or make this one writable")
    return None


def directory_problem(cfg: Config, run_dir: Path) -> str | None:
    """``submit``'s check of the checkpoint directory, where this machine sees what the job will: a local run
    (``cluster.scheduler=local``) trains here. On Slurm the nodes may mount other paths: the job checks."""
    if cfg.cluster.scheduler.value != "local":
        return None
    return writable_problem(checkpoint_dir(cfg, run_dir))


def resume_refusal(step_dir: Path, raw: dict, backend: BackendName) -> str | None:
    """Why this run may not resume from ``step_dir`` (``launch.config.resume.refusal``), or None."""
    return refusal(step_dir, read_marker(step_dir), raw, backend)


def resume_problem(cfg: Config, run_dir: Path) -> str | None:
    """``submit``'s check, on the login node: why the job would refuse to resume this run's checkpoint, or None.

    The job makes the same checks (``launch.train.preflight``), but only after its wait in the queue.
    Checkpoints that exist but of which none passes the cheap checks (``find_resume``) raise ``UserError``.
    """
    step_dir = find_resume(checkpoint_dir(cfg, run_dir))
    if step_dir is None:
        return None
    raw = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    return resume_refusal(step_dir, raw, cfg.backend.name)
