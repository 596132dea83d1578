"""The collective parts of trusted checkpoints: checksums split across the ranks, answers all ranks agree on.

``launch.record.manifest`` and ``launch.record.checkpoints`` hold the rules (no torch);
this module runs them on every rank of a job (``launch.train.loop.Trainer.save`` and
``resume``): each rank checksums its ``manifest.share`` of a step directory's files, and
``all_gather_object`` brings the parts to every rank, so all ranks take the same decision
(load this checkpoint or skip it; commit or stop) in one collective.

``TRAINCTL_FAULT_DISK_FULL_AT_STEP=N`` (tests only, README "Test-only fault knobs"): at
the save of step N the last rank writes half of its RNG file, after the engine's shards,
and raises ``OSError(ENOSPC)``, as a file system that filled up mid-save does.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from launch.record import checkpoints as ckpt
from launch.record import manifest

FAULT_DISK_FULL = "TRAINCTL_FAULT_DISK_FULL_AT_STEP"


def gather(item) -> list:
    """Every rank's ``item``, in rank order, on every rank."""
    items = [None] * dist.get_world_size()
    dist.all_gather_object(items, item)
    return items


def agree(problem: str | None) -> str | None:
    """The first problem any rank found (in rank order), on every rank; None if none did."""
    return next((p for p in gather(problem) if p), None)


def storage_error(fn: Callable, *args) -> str | None:
    """Run ``fn``; a storage error (``checkpoints.STORAGE_ERRNOS``) is returned as one line, others propagate."""
    try:
        fn(*args)
    except OSError as exc:
        if exc.errno not in ckpt.STORAGE_ERRNOS:
            raise
        return f"{type(exc).__name__}: [Errno {exc.errno}] {exc.strerror}" + (f": {exc.filename}" if exc.filename
                                                                               else "")
    return None


def file_checksums(directory: Path, rank: int, world: int) -> tuple[dict[str, int], dict[str, str]]:
    """(sizes, checksums) of every file in ``directory`` but the marker, each rank hashing its share.

    Rank 0 lists the directory once and sends the listing (every rank splits the same list);
    the checksums come back to every rank (all_gather_object: rank 0 writes the manifest).
    """
    listing = [manifest.listing(directory, exclude=(ckpt.MARKER,)) if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    sizes = listing[0]
    sums = {}
    for part in gather(manifest.checksums(directory, manifest.share(sizes, rank, world))):
        sums.update(part)
    return sizes, sums


def verify(step_dir: Path, rank: int, world: int, layout: dict) -> tuple[ckpt.Inspection, str | None]:
    """(the cheap inspection, why ``step_dir`` must not be loaded or None), the same on every rank.

    Checksums across the ranks; the RNG states of every rank required where the layout is the one it
    was saved with (on another layout rank r is not the same rank: none are restored, as before).
    """
    found = ckpt.inspect(step_dir)
    problem = ckpt.verify_share(step_dir, found, rank, world)
    if problem is None and saved_layout(found.marker) == layout:
        problem = ckpt.rng_problem(step_dir, found, world)
    return found, agree(problem)


def saved_layout(marker: dict) -> dict:
    return marker.get("layout") or {"world": marker.get("world_size")}


def inject_disk_full(step: int, rank: int, world: int, directory: Path) -> None:
    """The test-only fault: the save of step N fills the disk on the last rank, halfway through a file."""
    at = os.environ.get(FAULT_DISK_FULL)
    if not at or int(at) != step or rank != world - 1:
        return
    path = directory / f"rng_rank{rank}.pt"
    path.write_bytes(b"\0" * 4096)  # part of a file, as a write that ran out of space leaves it
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
