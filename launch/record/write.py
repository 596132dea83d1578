"""The run directory's records, written so that a failure leaves nothing that looks like success.

Files are written to a staging folder inside the run directory; then the old
``plan.json`` is removed, the files are renamed into place one by one (a rename
within a filesystem is atomic) and ``plan.json`` comes last: a run directory
with a ``plan.json`` has all of its records, from one command. Artifacts an
earlier command wrote that this one does not (a ``job.sbatch`` after switching
to cluster=local) are removed, so the directory never mixes two runs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import shutil
import socket
import sys
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from launch import __version__
from launch.paths import project_root
from launch.backends import FILES as BACKEND_FILES

COMPLETION_MARKER = "plan.json"
ARTIFACTS = ("config.yaml", "overrides.yaml", "meta.json", "plan.json", "plan.png", "job.sbatch", "launch.sh",
             *BACKEND_FILES)
"""Every file a trainctl command writes into a run directory."""
_PACKAGES = ("trainctl", "hydra-core", "omegaconf", "jinja2", "rich", "torch", "deepspeed",
             "megatron-core", "transformer-engine", "transformers", "datasets", "tokenizers", "wandb")


def write_run(run_dir: Path, files: dict[str, str | bytes]) -> None:
    """Write ``files`` (name -> text or bytes) into ``run_dir``; ``plan.json`` lands last."""
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=run_dir))
    try:
        for name, text in files.items():
            if isinstance(text, bytes):
                (staging / name).write_bytes(text)
            else:
                (staging / name).write_text(text)
            if name.endswith((".sh", ".sbatch")):
                (staging / name).chmod(0o755)
        (run_dir / COMPLETION_MARKER).unlink(missing_ok=True)
        for name in ARTIFACTS:
            if name not in files:
                (run_dir / name).unlink(missing_ok=True)
        for name in sorted(files, key=lambda n: n == COMPLETION_MARKER):
            os.replace(staging / name, run_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_file(path: Path, text: str) -> None:
    """One file written whole: a temporary file beside it, renamed into place, with the permissions a
    plain open() would give (mkstemp's are 0600, which locks out the rest of a shared project)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def dump_json(data: object) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def meta(argv: list[str]) -> dict:
    """What ran: versions, git state of the project and of the user's directory, command, host, time."""
    root = project_root()
    cwd = Path.cwd()
    return {
        "trainctl_version": _version("trainctl") or __version__,
        "command": " ".join(_quote(a) for a in argv),
        "project_git": _git_state(root) if root else None,
        "workdir": str(cwd),
        "workdir_git": _git_state(cwd) if cwd != root else None,
        "python": platform.python_version(),
        "python_executable": sys.executable,  # the ${python:} that cluster profiles default cluster.python to
        "packages": {name: v for name in _PACKAGES if (v := _version(name))},
        "host": socket.gethostname(),
        "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _quote(arg: str) -> str:
    return shlex.quote(arg)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_state(path: Path) -> dict | None:
    """Commit and dirty flag of the git work tree holding ``path``, or None (one git call)."""
    try:
        out = subprocess.run(["git", "-C", str(path), "status", "--porcelain=v2", "--branch", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    lines = out.stdout.splitlines()
    commit = next((line.split()[2] for line in lines if line.startswith("# branch.oid ")), None)
    if commit is None or commit == "(initial)":
        return None
    return {"commit": commit, "dirty": any(not line.startswith("#") for line in lines)}
