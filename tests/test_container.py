"""Container mode: the mounts cover every path the config names, and the tiny job runs through them.

pyxis and enroot cannot run here (no registry, no GPUs). So the mounts are checked two ways:
- as data: every string key of the schema is set to a path and must be mounted, unless
  ``launch.executors.container.NOT_JOB_PATHS`` says why not (a new path key is mounted by
  default, nobody has to remember it); the H100 recipes' scripts mount every path their
  configs name;
- as a job: on the local Slurm, an ``srun`` wrapper (tests/pyxis/srun, a stand-in that says
  so) reads ``--container-image``/``--container-mounts`` as pyxis would and runs each task in
  bubblewrap, seeing only the host's system directories (the "image"), the test's
  virtualenv read-only (standing in for the trainctl[train] that slurm/Containerfile puts in
  the image), and the mounts. The tiny job trains through it, reading its data and tokenizer
  and writing checkpoints through the mounts; with one mount dropped it fails on the missing
  path, so the emulation does hide what is not mounted.
The image recipe (slurm/Containerfile) is not built here; its pinning and its constraint are
checked as text, and the [train] extra against NGC's torch versions.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from launch.executors.container import NOT_JOB_PATHS, as_path, config_paths, excluded, srun_options
from launch.executors.sbatch import render_sbatch
from launch.record.checkpoints import checkpoint_dir
from launch.verbs.plan import make_plan
from launch.config.compose import compose
from tests.conftest import ROOT, debian_tool, job_field, run_trainctl, typed, wait_for
from tests.test_reach import leaf_keys

PYXIS = ROOT / "tests" / "pyxis"


# --- every path key is walked ------------------------------------------------------------------

def _holds_text(tp) -> bool:
    """Whether a schema field's type can hold a string (str, Any, Optional/List/Dict of str)."""
    return tp is str or tp is typing.Any or any(_holds_text(a) for a in typing.get_args(tp))


def _shaped(tp, value: str):
    """``value`` in the field's shape: itself, a one-element list, or a one-entry dict."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        return _shaped(args[0], value)
    if origin is list:
        return [value]
    if origin is dict:
        return {"X": value}
    return value


def _set(cfg, key: str, value) -> None:
    """Set a schema key on a typed Config (``a.*.b``: on the first entry of the dict at ``a``)."""
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = next(iter(node.values())) if part == "*" else getattr(node, part)
    setattr(node, last, value)


def test_every_string_key_is_mounted_unless_it_says_why_not(tmp_path: Path) -> None:
    """All text keys of the schema at once, each set to a directory of its own: exactly the keys not in
    NOT_JOB_PATHS come out as mounts (a new key needs no list to be mounted; an exclusion needs a reason)."""
    cfg, _ = typed("recipe=tiny_slurm", "cluster.container_image=img")
    keys = {key: tp for key, tp in leaf_keys().items() if _holds_text(tp)}
    assert {"data.tokenizer", "data.prepared_dir", "data.sources.*.path", "stage.init_checkpoint",
            "train.checkpoint_dir", "cluster.calibration"} <= set(keys)  # the enumeration sees the path keys
    assert set(NOT_JOB_PATHS) <= set(leaf_keys()), "NOT_JOB_PATHS names a key the schema no longer has"
    cfg = copy.deepcopy(cfg)
    where = {}
    for i, (key, tp) in enumerate(sorted(keys.items())):
        where[key] = tmp_path / f"k{i}"
        where[key].mkdir()
        _set(cfg, key, _shaped(tp, str(where[key])))
    mounts = srun_options([cfg], [tmp_path / "run"], [], cwd=tmp_path, code=None)[0]
    mounted = {Path(entry.split(":")[0]) for entry in mounts.removeprefix("--container-mounts=").split(",")}
    missed = [k for k in keys if not excluded(k) and where[k] not in mounted]
    given = {"cluster.container_mounts"}  # excluded from the walk, and passed on as the user wrote it
    leaked = [k for k in keys if excluded(k) and k not in given and where[k] in mounted]
    assert not missed, f"path keys the walk did not mount: {missed}"
    assert not leaked, f"keys mounted although NOT_JOB_PATHS excludes them: {leaked}"


def test_which_values_are_paths(tmp_path: Path) -> None:
    assert as_path("/data/tok.json", tmp_path) == (Path("/data/tok.json"), False)
    assert as_path("/data/x/../tok.json", tmp_path) == (Path("/data/tok.json"), False)
    assert as_path("~/ckpt", tmp_path) == (Path.home() / "ckpt", False)
    assert as_path("./ckpt", tmp_path) == (tmp_path / "ckpt", True)
    for not_a_path in ("meta-llama/Llama-3.1-8B", "llama3_8b", "04:00:00", "auto", "https://host/x",
                       "s3://bucket/key", "", "^lo,docker"):
        assert as_path(not_a_path, tmp_path) is None, not_a_path
    (tmp_path / "meta-llama/Llama-3.1-8B").mkdir(parents=True)  # on disk, it is a local path (as for HF)
    assert as_path("meta-llama/Llama-3.1-8B", tmp_path) == (tmp_path / "meta-llama/Llama-3.1-8B", True)
    (tmp_path / "data").mkdir()
    assert as_path("data/prepared", tmp_path) == (tmp_path / "data/prepared", True)  # an output, not there yet


def _mounts(options: list[str]) -> list[str]:
    return options[0].removeprefix("--container-mounts=").split(",")


def test_parents_cover_children_and_new_outputs_mount_their_nearest_parent(tmp_path: Path) -> None:
    (tmp_path / "data/tok").mkdir(parents=True)
    (tmp_path / "data/tok/tokenizer.json").write_text("{}")
    (tmp_path / "ckpts").mkdir()
    cfg, _ = typed("recipe=tiny_slurm", "cluster.container_image=img", f"data.tokenizer={tmp_path}/data/tok/tokenizer.json",
                   f"data.prepared_dir={tmp_path}/data", f"train.checkpoint_dir={tmp_path}/ckpts/new/run1",
                   "cluster.container_mounts=['/site/models:/models:ro']")
    run = tmp_path / "runs/x"  # not written yet: the job script will be, before sbatch runs
    options = srun_options([cfg], [run], [checkpoint_dir(cfg, run)], cwd=tmp_path, code=ROOT)
    # the user's own mount kept as given; data/ covers its tokenizer; the new checkpoint dir via ckpts/;
    # the shipped sample sources under the checkout; no relative paths, so no working directory
    assert _mounts(options) == ["/site/models:/models:ro", f"{ROOT}:{ROOT}", f"{tmp_path}/ckpts:{tmp_path}/ckpts",
                                f"{tmp_path}/data:{tmp_path}/data", f"{run}:{run}"]
    assert len(options) == 1


def test_relative_paths_mount_the_submitting_directory_and_work_there(tmp_path: Path) -> None:
    """pyxis starts in the image's WORKDIR (NGC: /workspace), bare metal where sbatch ran: the same files
    only if the container works in the submitting directory, which must then be mounted."""
    (tmp_path / "data").mkdir()
    cfg, _ = typed("recipe=tiny_slurm", "cluster.container_image=img")  # data.prepared_dir: data/prepared
    options = srun_options([cfg], [tmp_path / "runs/x"], [], cwd=tmp_path, code=None)
    assert f"{tmp_path}:{tmp_path}" in _mounts(options) and options[1] == f"--container-workdir={tmp_path}"
    assert f"{tmp_path}/runs/x:{tmp_path}/runs/x" not in _mounts(options)  # covered by the directory above


def test_a_user_mount_at_the_same_path_covers_what_is_below_it(tmp_path: Path) -> None:
    cfg, _ = typed("recipe=tiny_slurm", "cluster.container_image=img", f"data.prepared_dir={tmp_path}/shards",
                   f"cluster.container_mounts=['{tmp_path}:{tmp_path}']")
    assert _mounts(srun_options([cfg], [tmp_path / "run"], [], cwd=tmp_path, code=ROOT)) == [
        f"{ROOT}:{ROOT}", f"{tmp_path}:{tmp_path}"]  # parents first; nothing of its own below the user's


@pytest.mark.parametrize("value, says", [
    ("/nonexistent-site/data/prepared", "cluster.container_mounts='[/nonexistent-site:/nonexistent-site]'"),
    ("/usr/share", "a system directory"),
    ("/tmp", "a system directory"),
    ("{tmp}/with,comma", "',' ends a mount"),
    ("{tmp}/with:colon", "':' splits source from target"),
    ("{tmp}/with space", "enroot's mount table splits at spaces"),
])
def test_paths_that_cannot_be_mounted_are_refused_with_the_key_and_a_fix(workdir: Path, value: str,
                                                                         says: str) -> None:
    value = value.format(tmp=workdir)
    if value.startswith(str(workdir)):
        Path(value).mkdir()  # it exists, so it is what would be mounted
    out = run_trainctl("render", "recipe=tiny_slurm", "cluster.container_image=img",
                       f"data.prepared_dir='{value}'", cwd=workdir)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"data.prepared_dir={value}:" in out.stderr and says in out.stderr and "fix:" in out.stderr
    assert not (workdir / "runs").exists()  # refused before anything was written


@pytest.mark.parametrize("recipe", ["llama3_8b_pretrain_h100", "llama3_70b_pretrain_h100",
                                    "llama3_405b_pretrain_h100", "llama3_8b_sft_h100"])
def test_the_h100_recipes_mount_every_path_their_config_names(tmp_path: Path, monkeypatch, recipe: str) -> None:
    """The shipped recipes name /data/... and /checkpoints/...; here a site tree under tmp_path stands in
    for them (the key and layout kept), and every path of the rendered config is under a mount."""
    monkeypatch.chdir(tmp_path)
    site = tmp_path / "site"
    (site / "ckpt").mkdir(parents=True)  # the checkpoint directory's parent: a file system of its own
    shipped, _ = typed(f"recipe={recipe}")
    moved = []
    for found in config_paths(shipped, tmp_path):
        key = found.source.split("=", 1)[0]
        new = site / found.path.relative_to("/")
        (new.parent if new.suffix else new).mkdir(parents=True, exist_ok=True)
        if new.suffix:
            new.write_text("{}")
        moved.append(f"{key}={new}")
    assert len(moved) >= 2, moved  # the recipe names data (and, for SFT, its init checkpoint)
    plan = make_plan(compose([f"recipe={recipe}", "cluster.container_image=nvcr.io/x/trainctl@sha256:0",
                              "cluster.python=python", f"train.checkpoint_dir={site}/ckpt/{recipe}", *moved]))
    run_dir = tmp_path / "runs" / recipe
    run_dir.mkdir(parents=True)
    text = render_sbatch(plan.cfg, run_dir, plan.numbers)
    mounts = [Path(m.split(":")[0]) for m in re.search(r"--container-mounts=(\S+)", text).group(1).split(",")]
    needed = [p.path for p in config_paths(plan.cfg, tmp_path)] + [run_dir, checkpoint_dir(plan.cfg, run_dir)]
    uncovered = [p for p in needed if not any(p.is_relative_to(m) for m in mounts)]
    assert not uncovered, (uncovered, mounts)
    assert "--container-image=nvcr.io/x/trainctl@sha256:0" in text


# --- the image recipe ----------------------------------------------------------------------------

def test_the_containerfile_pins_its_base_by_digest_and_installs_under_the_images_constraints() -> None:
    text = (ROOT / "slurm/Containerfile").read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert '*@sha256:*) ;;' in text and "exit 1" in text  # a tag alone is refused by the build
    assert re.search(r"--build-arg BASE_IMAGE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3@sha256:", text)
    assert "install-in-image.sh" in text
    script = (ROOT / "slurm/install-in-image.sh").read_text()
    assert "pip list --format=freeze" in script and '-c "$constraints" "${src}[train]"' in script
    assert '"$torch_after" != "$torch_before"' in script  # and it checks that torch stayed
    assert subprocess.run(["bash", "-n", str(ROOT / "slurm/install-in-image.sh")]).returncode == 0


def test_the_train_extra_accepts_the_torch_of_an_ngc_image() -> None:
    """NGC images carry NVIDIA's own torch builds, versioned like 2.12.0a0+<commit>, which sort before
    2.12.0: an extra pinning a release (torch==2.13.0) would make pip replace the image's torch."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    torch = next(Requirement(r) for r in extra if Requirement(r).name == "torch")
    accepts = lambda v: torch.specifier.contains(v, prereleases=True)  # noqa: E731 - how pip checks an installed one
    assert all(accepts(v) for v in ("2.12.0a0+abc1234", "2.13.0a0+git5f8e2a1", "2.13.0", "2.13.0+cpu"))
    assert not accepts("2.11.0")  # its torchrun lacks --shutdown-timeout, which the job script passes


# --- the job, through the pyxis emulation ----------------------------------------------------------

@pytest.fixture(scope="module")
def bwrap() -> str:
    path = debian_tool("bwrap", "bubblewrap")
    probe = subprocess.run([path, "--ro-bind", "/", "/", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"bubblewrap cannot make a mount namespace here: {probe.stderr.strip()}")
    return path


def _default_build_root() -> str:
    from torch.utils.cpp_extension import get_default_build_root

    return get_default_build_root()


def _setup(*lines: str) -> str:
    return "cluster.setup=[" + ",".join(f"'{line}'" for line in lines) + "]"


def test_the_tiny_job_trains_in_the_emulated_container_and_sees_only_its_mounts(tmp_path: Path, slurm_env: dict,
                                                                                bwrap: str) -> None:
    submit_dir, shards, ckpt, log = (tmp_path / n for n in ("submit", "shards", "ckpt", "pyxis-log"))
    for d in (submit_dir, ckpt / "tiny_slurm", ckpt / "hidden", log):
        d.mkdir(parents=True)
    data = [f"data.prepared_dir={shards}"]
    assert run_trainctl("prepare", "recipe=tiny_slurm", *data, cwd=submit_dir, env=slurm_env).returncode == 0
    # the wrapper first on the job's PATH, however the job was exported; then the "image's" python
    # (cluster.python=python, as with a real image: the submitting interpreter is refused in container mode)
    image = [f"export PATH={PYXIS}:{sys.prefix}/bin:$PATH",
             f"export PYXIS_EMULATED_IMAGE={sys.prefix}:{sys.base_prefix}", f"export PYXIS_EMULATED_LOG={log}"]
    # DeepSpeed JIT-compiles an op for its CPU ranks into ~/.cache/torch_extensions (a minute, in a fresh
    # container every time): mount the host's cache, as a site mounts a shared cache (a user mount, kept as given)
    jit_cache = Path(_default_build_root())
    jit_cache.mkdir(parents=True, exist_ok=True)
    common = ["recipe=tiny_slurm", *data, "cluster.container_image=trainctl-emulated", "cluster.python=python",
              "train.steps=8",
              "train.checkpoint_interval=4", f"cluster.container_mounts=['{jit_cache}:{jit_cache}']"]
    jobs = {}
    for name, extra in (("hidden", [f"export PYXIS_EMULATED_DROP={shards}"]), ("tiny_slurm", [])):
        out = run_trainctl("submit", *common, f"name={name}", f"train.checkpoint_dir={ckpt}/{name}",
                           _setup(*image, *extra), cwd=submit_dir, env=slurm_env)
        assert out.returncode == 0, out.stderr
        jobs[name] = re.search(r"submitted job (\d+)", out.stdout).group(1)
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    for job in jobs.values():
        wait_for(lambda: job_field(slurm_env, job, "JobState") in ended, 150, f"job {job} to end")

    run = submit_dir / "runs/tiny_slurm"
    assert job_field(slurm_env, jobs["tiny_slurm"], "JobState") == "COMPLETED", \
        (run / f"slurm-{jobs['tiny_slurm']}.log").read_text()[-3000:]
    seen = json.loads((log / f"srun.{jobs['tiny_slurm']}.json").read_text())
    assert sorted(seen["mounts"]) == sorted(f"{p}:{p}" for p in (jit_cache, ROOT, shards, ckpt / "tiny_slurm", run))
    assert seen["workdir"] is None and seen["dropped"] == []
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # read the shards and the tokenizer through their mounts
    assert (ckpt / "tiny_slurm/latest").read_text().strip() == "step_0000008"  # written through its mount
    assert (ckpt / "tiny_slurm/final").is_dir()
    assert "done, not requeued" in (run / "job.log").read_text()

    hidden = submit_dir / "runs/hidden"
    assert job_field(slurm_env, jobs["hidden"], "JobState") == "FAILED"
    assert json.loads((log / f"srun.{jobs['hidden']}.json").read_text())["dropped"] == [str(shards)]
    assert re.search(r"configuration error found on \S+: the prepared data is missing .*shards",
                     (hidden / "job.log").read_text())  # the shards exist on the host: the container hid them
