"""Container mode (pyxis/enroot): which host paths the job's container must see, derived from the config.

A container sees only the image and what ``srun --container-mounts`` binds into it.
A list of mounts kept by hand forgets something sooner or later (the tokenizer, a
later stage's ``stage.init_checkpoint``, a ``train.checkpoint_dir`` on another file
system), and the job finds out on the node, after its wait in the queue. So the
mounts are derived: every leaf of the resolved config is walked, every value that
names a file or directory is collected, and so are the run directory, the checkpoint
directory and trainctl's own code when it runs from a checkout. Each is mounted at
the same path (``SRC:SRC``), so the config's paths mean inside the container what
they mean on the login node. A key is left out only by being listed in
``NOT_JOB_PATHS`` with the reason; tests/test_container.py sets every string key of
the schema to a path and fails on one the walk misses, so a new path key is mounted
without anyone remembering to.

Which value is a path (``as_path``): an absolute path or ``~``; a relative value that
exists in the submitting directory (or whose first component does), or that starts
with ``./`` or ``../``. A relative value that names nothing on disk (a Hugging Face
hub id such as ``meta-llama/Llama-3.1-8B``, a preset's name) is not, nor is a URL.
Relative paths are resolved by the job against its working directory, which is the
submitting directory on bare metal (sbatch starts the job where ``trainctl submit``
ran) but the image's ``WORKDIR`` under pyxis (``/workspace`` in NGC images). So when
the config has one, the submitting directory is mounted and made the container's
working directory (``--container-workdir``): the same files either way.

Which directory is mounted (``_mount_point``): the path itself when it exists; an
output that does not exist yet (a new checkpoint directory, the next stage's
``init_checkpoint``) through its nearest existing parent, not created here: render
and submit write nothing outside the run directory (a dry ``trainctl render`` on a
laptop must not make ``/lustre/...`` directories), and the parent shows the job the
same tree it would see on bare metal, where the trainer creates the directory. The
run directories count as existing: the job script is written into them before
sbatch sees it. Parents cover children (one mount each), and never ``/`` or a
system directory of the image (``/usr``, ``/etc``, ... would hide the image's own).

Pure functions of the config and a few questions to the disk (does this path
exist); no torch, nothing at import.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from launch.errors import UserError

NOT_JOB_PATHS: dict[str, str] = {
    "cluster.python": "the interpreter inside the image (the image's own, e.g. python); never a host path to mount",
    "cluster.container_image": "the image itself, which pyxis reads on the host (a registry reference or a .sqsh file)",
    "cluster.container_mounts": "the user's own mounts, passed on as given",
    "cluster.setup": "shell lines of the batch script, run outside the container",
    "cluster.directives": "#SBATCH options, read by sbatch outside the container",
    "cluster.env": "the environment inside the container, whose paths may be the image's own "
                   "(LD_LIBRARY_PATH=/usr/local/cuda/lib64), which a host mount would hide",
    "cluster.shared_paths": "file systems named for submit's check (launch/executors/interpreter.py); to mount one "
                            "whole, list it in cluster.container_mounts",
    "cluster.calibration": "read by the estimate on the login node (plan, tune); the job never opens it",
    "pipeline": "each stage's overrides make a run of its own, whose job gets its own mounts",
}
"""Schema keys whose values are never mounted, each with the reason. Every other string leaf is walked."""

SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
               "/sys", "/usr")
"""Trees of the image: no directory in them is mounted (a host directory there would hide the image's files)."""
SYSTEM_TOPS = ("/", "/opt", "/tmp", "/var", *SYSTEM_DIRS)
"""Directories never mounted whole (their sub-directories may be: /tmp/x, /opt/site/data)."""
UNSAFE_CHARS = (",", ":", " ", "\t", "\n", '"', "'", "\\", "$", "`")
"""pyxis splits --container-mounts at ',' and each entry at ':', and writes each mount into a shell script of
enroot's as ``echo "SRC DST flags"`` (pyxis_slurmstepd.c): a space splits the entry, a quote or $ is the shell's."""


@dataclass(frozen=True)
class JobPath:
    """One path the job reads or writes, and what named it (a config key, or the run directory...)."""

    source: str
    """``data.tokenizer=/data/tok.json``, or "the run directory" ...: what an error message names."""
    path: Path
    """Absolute, normalised (``..`` removed), symlinks kept: the path as the job will open it."""
    relative: bool = False
    """Written relative to the submitting directory."""


# --- the walk -------------------------------------------------------------------------------------

def leaves(node, key: str = "", schema_key: str = "") -> Iterator[tuple[str, str, object]]:
    """(dotted key, schema key, value) of every leaf of a config; a dict's entries are ``*`` in the schema key."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from leaves(getattr(node, f.name), _join(key, f.name), _join(schema_key, f.name))
    elif isinstance(node, dict):
        for name, value in node.items():
            yield from leaves(value, f"{key}.{name}", f"{schema_key}.*")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from leaves(value, f"{key}[{i}]", schema_key)
    else:
        yield key, schema_key, node


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def excluded(schema_key: str) -> bool:
    """Whether ``schema_key`` (or a group above it) is listed in ``NOT_JOB_PATHS``."""
    return any(schema_key == k or schema_key.startswith(f"{k}.") for k in NOT_JOB_PATHS)


def as_path(value: object, base: Path) -> tuple[Path, bool] | None:
    """(absolute path, written relative?) when ``value`` names a file or directory; None otherwise.

    The rule of the module docstring: absolute or ``~`` always; relative only when it
    (or its first component) exists under ``base`` or it starts with ``./``/``../``, as
    Hugging Face's ``from_pretrained`` takes a name that exists on disk for a local path.
    """
    if not isinstance(value, str) or not value.strip() or "://" in value:
        return None
    if value.startswith("~"):
        value = os.path.expanduser(value)
    if os.path.isabs(value):
        return Path(os.path.normpath(value)), False
    first = Path(value).parts[0]
    if value.startswith(("./", "../")) or value in (".", "..") or (base / first).exists():
        return Path(os.path.normpath(base / value)), True
    return None


def config_paths(cfg, base: Path) -> list[JobPath]:
    """Every value of ``cfg`` (a typed Config) that names a path, keys in ``NOT_JOB_PATHS`` left out."""
    found = []
    for key, schema_key, value in leaves(cfg):
        hit = None if excluded(schema_key) else as_path(value, base)
        if hit:
            found.append(JobPath(f"{key}={value}", hit[0], hit[1]))
    return found


# --- from paths to mounts -----------------------------------------------------------------------

def job_paths(cfgs: list, run_dirs: list[Path], checkpoint_dirs: list[Path], *, base: Path,
              code: Path | None) -> list[JobPath]:
    """What the job (every point of an array) reads or writes: the configs' paths, run and checkpoint dirs, code."""
    paths = [JobPath("the run directory", Path(os.path.abspath(d))) for d in run_dirs]
    paths += [JobPath(f"the checkpoint directory {d}", Path(os.path.abspath(d))) for d in checkpoint_dirs]
    if code is not None:  # a checkout (or editable install): the job may run this code, not only the image's
        paths.append(JobPath(f"trainctl's code (the checkout {code})", code))
    for cfg in cfgs:
        paths += config_paths(cfg, base)
    if any(p.relative for p in paths):
        paths.append(JobPath("the submitting directory (the config has relative paths)", base))
    return paths


def _mount_point(path: Path, will_exist: list[Path]) -> Path:
    """``path`` if it exists (or will: a run directory), else its nearest such parent (``/`` at worst)."""
    point = path
    while not (point.exists() or point in will_exist) and point != point.parent:
        point = point.parent
    return point


def _problem(job_path: JobPath, point: Path) -> str | None:
    """Why ``point`` cannot be mounted for ``job_path``, with the fix; None if it can."""
    what = job_path.source
    if point == Path("/"):
        top = f"/{job_path.path.parts[1]}" if len(job_path.path.parts) > 1 else "/lustre"
        return (f"{what}: neither {job_path.path} nor any directory above it (below /) exists here, so there is "
                "nothing to mount into the container\n  fix: correct the path if it is an input (the login node sees "
                "the nodes' shared file systems); create the directory of an output; or, if only the nodes have that "
                f"file system, mount it yourself: cluster.container_mounts='[{top}:{top}]'")
    system = str(point) in SYSTEM_TOPS or (point.is_dir() and any(point.is_relative_to(d) for d in SYSTEM_DIRS))
    if system:
        return (f"{what}: mounting it would mount {point}, a system directory, over the image's own\n"
                "  fix: keep data, checkpoints and runs in a directory of their own (e.g. under /lustre or your home)")
    bad = sorted({c for c in UNSAFE_CHARS if c in str(point)})
    if bad:
        return (f"{what}: the directory to mount, {point}, has {' '.join(repr(c) for c in bad)}, which "
                "pyxis's --container-mounts cannot carry (',' ends a mount, ':' splits source from target, "
                "enroot's mount table splits at spaces)\n  fix: move it to a path without them, or mount a "
                "parent directory without them through cluster.container_mounts (e.g. "
                "cluster.container_mounts='[/lustre:/lustre]')")
    return None


def _identity_mounts(user_mounts: list[str]) -> list[Path]:
    """The user's mounts that show a host directory at its own path (``SRC:SRC``): they cover what is below."""
    roots = []
    for entry in user_mounts:
        src, _, rest = entry.partition(":")
        dst = rest.partition(":")[0] or src
        if src and os.path.isabs(src) and os.path.normpath(src) == os.path.normpath(dst):
            roots.append(Path(os.path.normpath(src)))
    return roots


def mount_points(paths: list[JobPath], user_mounts: list[str], will_exist: list[Path]) -> list[Path]:
    """The directories (or files) to mount, parents covering children; ``UserError`` listing every problem."""
    covered = _identity_mounts(user_mounts)
    points, problems = [], []
    for job_path in paths:
        if any(job_path.path.is_relative_to(root) for root in covered):
            continue
        point = _mount_point(job_path.path, will_exist)
        problem = _problem(job_path, point)
        if problem:
            problems.append(problem)
        else:
            points.append(point)
    if problems:
        raise UserError(list(dict.fromkeys(problems)))
    kept: list[Path] = []
    for point in sorted(set(points), key=lambda p: (len(p.parts), str(p))):
        if not any(point.is_relative_to(k) for k in kept):
            kept.append(point)
    return kept


def srun_options(cfgs: list, run_dirs: list[Path], checkpoint_dirs: list[Path], *, cwd: Path,
                 code: Path | None) -> list[str]:
    """srun's ``--container-mounts`` (and ``--container-workdir`` when the config has relative paths).

    ``cfgs``: the run's config, or every point's of a job array (one script mounts what all of them
    need); ``cwd``: the submitting directory (the job's working directory on bare metal); ``code``:
    trainctl's checkout, None for a wheel (the image has its own). The user's
    ``cluster.container_mounts`` are kept as given; all entries are ordered parents first, so that a
    mount inside another is not hidden by it.
    """
    c = cfgs[0].cluster
    base = _working_directory(c.directives, cwd)
    paths = job_paths(cfgs, run_dirs, checkpoint_dirs, base=base, code=code)
    will_exist = [Path(os.path.abspath(d)) for d in run_dirs]
    derived = [f"{p}:{p}" for p in mount_points(paths, list(c.container_mounts), will_exist)]
    entries = sorted([*c.container_mounts, *derived], key=_target_depth)
    options = ["--container-mounts=" + ",".join(entries)]
    if any(p.relative for p in paths):
        options.append(f"--container-workdir={base}")
    return options


def _working_directory(directives: dict, cwd: Path) -> Path:
    """Where the job starts on bare metal: ``#SBATCH --chdir`` if the profile sets one, else where sbatch runs."""
    for key, value in directives.items():
        if key.lstrip("-") in ("chdir", "D") and value:
            return Path(os.path.abspath(os.path.expanduser(value)))
    return Path(os.path.abspath(cwd))


def _target_depth(entry: str) -> int:
    src, _, rest = entry.partition(":")
    return len(Path(rest.partition(":")[0] or src).parts)
