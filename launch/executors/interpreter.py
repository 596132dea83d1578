"""Will the nodes find a working interpreter and the run directory? Checked by ``submit`` on a Slurm profile.

A job that starts a bare ``python3`` without torch, or reads a virtualenv under
``/tmp`` of the login node, fails on the compute nodes minutes or hours after
submission (when the queue lets it start); both are visible from the login node
in a fraction of a second, so submit refuses them before anything is written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from launch.config.schema import BackendName, Config, Scheduler

ENGINES = {BackendName.deepspeed: ("torch", "deepspeed"), BackendName.megatron: ("torch", "megatron-core")}
"""The distributions (names as pip knows them) a training rank of each backend imports."""

TIMEOUT_S = 20.0
"""An interpreter on a slow shared file system can take seconds to start; more than this is a hang."""

# Reads package metadata only: importing torch would take seconds and may need a GPU driver the login node lacks.
_PROBE = """
import importlib.metadata as m, sys
missing = []
for name in sys.argv[1:]:
    try:
        m.version(name)
    except m.PackageNotFoundError:
        missing.append(name)
print("MISSING:" + " ".join(missing))
"""


def _ways_out(python: str) -> str:
    return (f"  fix: install the engines into that interpreter (`{python} -m pip install 'trainctl[train]'`), "
            "or point cluster.python at one that has them (with cluster.setup lines that prepare it, e.g. "
            "cluster.setup='[source /shared/venv/bin/activate]' cluster.python=python)")


def engines_problem(cfg: Config) -> str | None:
    """Why ``cluster.python`` cannot run this training job on the nodes, or None.

    Runs that interpreter once, here on the login node, to read the package
    metadata of trainctl, torch and the backend's engine (never importing them). Skipped,
    returning None, where the interpreter is only known on the node: with
    ``cluster.setup`` lines (a module or venv they load) or a
    ``cluster.container_image`` (the image's interpreter); and on cluster=local,
    where launch.sh runs on this machine and fails at once by itself.
    """
    c = cfg.cluster
    if c.scheduler != Scheduler.slurm or c.setup or c.container_image:
        return None
    names = ("trainctl", *ENGINES[cfg.backend.name])  # the job runs `python -m launch.train`: trainctl too
    try:
        out = subprocess.run([c.python, "-c", _PROBE, *names], capture_output=True, text=True, timeout=TIMEOUT_S)
    except OSError as exc:
        return (f"cluster.python={c.python}: cannot be run ({exc.strerror or exc}); the job script starts every "
                f"rank with it\n{_ways_out(c.python)}")
    except subprocess.TimeoutExpired:
        return (f"cluster.python={c.python}: did not answer within {TIMEOUT_S:.0f} s when asked for its "
                f"packages\n{_ways_out(c.python)}")
    answer = [line for line in out.stdout.splitlines() if line.startswith("MISSING:")]
    if out.returncode != 0 or not answer:
        said = (out.stderr.strip().splitlines() or ["nothing"])[-1]
        return (f"cluster.python={c.python}: is not a Python that can report its packages (exit "
                f"{out.returncode}: {said})\n{_ways_out(c.python)}")
    missing = answer[-1].removeprefix("MISSING:").split()
    if missing:
        return (f"cluster.python={c.python}: lacks {', '.join(missing)}, which backend={cfg.backend.name.name} "
                f"needs on every rank\n{_ways_out(c.python)}")
    return None


def image_problem(cfg: Config) -> str | None:
    """Container mode with ``cluster.python`` still the submitting interpreter (the h100 profile's ``${python:}``).

    The image has its own Python; this path exists there only if a mount brings it. An
    interpreter that is not found at all (``execve``) leaves no outcome record on the node, so
    the job would take the crash path and be requeued instead of stopping: refused here.
    """
    c = cfg.cluster
    if c.scheduler != Scheduler.slurm or not c.container_image:
        return None
    python = Path(os.path.abspath(c.python))
    if python != Path(os.path.abspath(sys.executable)):
        return None
    if any(python.is_relative_to(m.split(":")[0]) for m in c.container_mounts):
        return None
    return (f"cluster.python={c.python}: the interpreter running trainctl here, but the job runs in "
            f"cluster.container_image={c.container_image}, which has its own Python and does not see this one\n"
            "  fix: cluster.python=python (the image's interpreter, with trainctl[train] installed: "
            "slurm/Containerfile), or mount this interpreter's file system with cluster.container_mounts")


def shared_problem(cfg: Config, run_dir: Path) -> str | None:
    """Why the nodes would not see the interpreter or the run directory, or None.

    Every node reads the interpreter and reads and writes the run directory, so
    both must live on a file system the nodes mount (``cluster.shared_paths``;
    empty: the site is not described and nothing is checked, as on the local
    test profiles, where the "nodes" are this machine). The interpreter is
    checked only on bare metal without ``cluster.setup``: otherwise it is
    found on the node.
    """
    c = cfg.cluster
    if c.scheduler != Scheduler.slurm or not c.shared_paths:
        return None
    roots = [Path(p) for p in c.shared_paths]
    listed = f"cluster.shared_paths={list(c.shared_paths)}"
    run = Path(os.path.abspath(run_dir))
    if not any(run.is_relative_to(r) for r in roots):
        return (f"run directory {run}: not under {listed}; the nodes would not see the job script or write "
                "their checkpoints and logs there\n  fix: run trainctl from a directory on shared storage, or "
                "set hydra.run.dir=/shared/.../runs/NAME (or add that file system to cluster.shared_paths if "
                "the nodes mount it)")
    if c.setup or c.container_image:
        return None
    found = shutil.which(c.python)  # a bare name is looked up on PATH, as the job's shell will
    python = Path(os.path.abspath(found or c.python))  # not resolved: a venv's python links to a system one
    if not any(python.is_relative_to(r) for r in roots):
        return (f"cluster.python={c.python}: {python} is not under {listed}; the nodes would not find it\n"
                f"  fix: create the virtualenv on shared storage and install trainctl[train] there, or set "
                "cluster.setup lines that prepare an interpreter on the node (module load ..., source "
                "/shared/venv/bin/activate) with cluster.python=python")
    return None
