"""submit on a Slurm profile refuses an interpreter without the engines, or paths the nodes cannot see.

Real interpreters, run as subprocesses: the test's own (the venv with trainctl[train]),
a system Python without torch, a path that does not exist. Nothing is queued: the
refusals come from check_submittable, before anything is written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch.errors import UserError
from launch.record.write import meta
from launch.verbs.submit import check_submittable
from tests.conftest import run_trainctl, typed

SYSTEM_PYTHON = "/usr/bin/python3"


def _lacks_torch(python: str) -> bool:
    probe = "import importlib.metadata as m\ntry: m.version('torch')\nexcept m.PackageNotFoundError: raise SystemExit(3)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=20).returncode == 3
    except OSError:
        return False


def test_submit_refuses_an_interpreter_that_does_not_exist(workdir: Path) -> None:
    out = run_trainctl("submit", "recipe=tiny_slurm", "cluster.python=/nonexistent/bin/python",
                       "submit.preflight=true", cwd=workdir)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "cluster.python=/nonexistent/bin/python: cannot be run" in out.stderr
    assert "trainctl[train]" in out.stderr and "cluster.setup" in out.stderr  # both ways out
    assert not (workdir / "runs").exists()  # refused before anything was written


@pytest.mark.skipif(not _lacks_torch(SYSTEM_PYTHON), reason=f"needs a {SYSTEM_PYTHON} without torch")
def test_an_interpreter_without_the_engines_is_refused_with_what_is_missing(workdir: Path) -> None:
    cfg, _ = typed("recipe=tiny_slurm", f"cluster.python={SYSTEM_PYTHON}")
    with pytest.raises(UserError, match=r"lacks trainctl, torch, deepspeed, which backend=deepspeed needs") as err:
        check_submittable(cfg, workdir / "runs" / "x")
    assert f"{SYSTEM_PYTHON} -m pip install 'trainctl[train]'" in str(err.value)
    cfg, _ = typed("recipe=tiny_slurm", f"cluster.python={SYSTEM_PYTHON}", "backend=megatron")
    with pytest.raises(UserError, match=r"lacks trainctl, torch, megatron-core"):
        check_submittable(cfg, workdir / "runs" / "x")


def test_no_check_where_the_interpreter_is_only_known_on_the_node(workdir: Path) -> None:
    for extra in ("cluster.setup=[true]", "cluster.container_image=img", "train.rank_check_s=5"):
        cfg, _ = typed("recipe=tiny_slurm", "cluster.python=/nonexistent/bin/python", extra)
        check_submittable(cfg, workdir / "runs" / "x")  # no refusal


def test_an_interpreter_with_the_engines_passes(workdir: Path) -> None:
    cfg, _ = typed("recipe=tiny_slurm", f"cluster.python={sys.executable}")
    check_submittable(cfg, workdir / "runs" / "x")


def test_submit_refuses_a_run_directory_outside_the_shared_paths(workdir: Path) -> None:
    out = run_trainctl("submit", "recipe=tiny_slurm", "cluster.shared_paths=[/lustre]", "submit.preflight=true",
                       cwd=workdir)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"run directory {workdir.resolve()}" in out.stderr or f"run directory {workdir}" in out.stderr
    assert "not under cluster.shared_paths=['/lustre']" in out.stderr and "fix:" in out.stderr
    assert not (workdir / "runs").exists()


def test_an_interpreter_outside_the_shared_paths_is_refused(workdir: Path) -> None:
    venv = Path(sys.executable).parent.parent
    cfg, _ = typed("recipe=tiny_slurm", f"cluster.python={sys.executable}", f"cluster.shared_paths=[{workdir}]")
    with pytest.raises(UserError, match=r"is not under cluster.shared_paths"):
        check_submittable(cfg, workdir / "runs" / "x")
    cfg, _ = typed("recipe=tiny_slurm", f"cluster.python={sys.executable}",
                   f"cluster.shared_paths=[{workdir},{venv}]")
    check_submittable(cfg, workdir / "runs" / "x")
    cfg, _ = typed("recipe=tiny_slurm", "cluster.setup=[true]", "cluster.python=python",
                   f"cluster.shared_paths=[{workdir}]")
    check_submittable(cfg, workdir / "runs" / "x")  # with setup the interpreter is the node's


def test_the_h100_profile_runs_the_submitting_interpreter_and_meta_records_it() -> None:
    cfg, _ = typed("recipe=llama3_8b_pretrain_h100")
    assert cfg.cluster.python == sys.executable and cfg.cluster.shared_paths == []
    assert meta(["trainctl", "plan"])["python_executable"] == sys.executable


def test_the_submitting_interpreter_is_refused_inside_an_image(workdir: Path) -> None:
    """The h100 profile's default (${python:}) with a container image: the image would not have it."""
    image = "cluster.container_image=nvcr.io/nvidia/pytorch:25.01-py3"
    cfg, _ = typed("recipe=tiny_slurm", image, f"cluster.python={sys.executable}", "train.rank_check_s=5")
    with pytest.raises(UserError, match=r"the interpreter running trainctl here, but the job runs in") as err:
        check_submittable(cfg, workdir / "runs" / "x")
    assert "fix: cluster.python=python" in str(err.value)
    check_submittable(typed("recipe=tiny_slurm", image, "cluster.python=python")[0], workdir / "runs" / "x")
    root = Path(sys.executable).parts[1]
    mounted, _ = typed("recipe=tiny_slurm", image, f"cluster.python={sys.executable}",
                       f"cluster.container_mounts=[/{root}:/{root}]")
    check_submittable(mounted, workdir / "runs" / "x")  # mounted: the image sees it
