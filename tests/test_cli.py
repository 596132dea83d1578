"""The command line as a user meets it: records written, sweeps, errors with exit 2 and no traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.config.compose import compose_config
from tests.conftest import HEAVY, ROOT, run_trainctl

PLAN_KEYS = {
    "world_size", "nodes", "gpus_per_node", "parallel", "model", "flops", "memory_gib", "throughput", "run", "scaling",
}
BLOCK_KEYS = {
    "parallel": {"tp", "pp", "cp", "ep", "vpp", "dp", "micro_batch_size", "grad_accum_steps", "global_batch_size"},
    "model": {"params_total", "params_active"},
    "flops": {"per_token", "per_step", "total"},
    "memory_gib": {"per_gpu_peak", "weights", "grads", "optimizer", "activations", "hbm", "fits"},
    "throughput": {"step_time_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu"},
    "run": {"tokens", "steps", "wall_clock_days", "gpu_hours", "cost_usd", "energy_mwh", "expected_failures",
            "checkpoint_interval_min", "jobs_needed"},
    "scaling": {"tokens_per_param", "predicted_loss"},
}


def test_plan_writes_the_run_records(workdir: Path):
    out = run_trainctl("plan", "recipe=tiny_local", "train.steps=30", cwd=workdir)
    assert out.returncode == 0, out.stderr
    run_dir = workdir / "runs" / "tiny_local"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "meta.json", "overrides.yaml", "plan.json"]

    plan = json.loads((run_dir / "plan.json").read_text())
    assert PLAN_KEYS <= set(plan)
    for block, keys in BLOCK_KEYS.items():
        assert keys <= set(plan[block]), block
    assert plan["world_size"] == 2 and plan["parallel"]["dp"] == 2
    assert plan["parallel"]["grad_accum_steps"] == 2  # 8 sequences = 2 micro x 2 accum x 2 dp
    assert plan["run"]["steps"] == 30

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["steps"] == 30 and config["backend"]["name"] == "deepspeed"
    assert Path(config["data"]["sources"]["prose"]["path"]).is_file()  # ${asset:...} resolved
    assert yaml.safe_load((run_dir / "overrides.yaml").read_text()) == ["recipe=tiny_local", "train.steps=30"]

    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["command"] == "trainctl plan recipe=tiny_local train.steps=30"
    assert meta["packages"]["hydra-core"].startswith("1.3")
    assert {"trainctl_version", "project_git", "workdir_git", "python", "host", "time_utc"} <= set(meta)
    assert "Traceback" not in out.stderr
    assert "runs/tiny_local" in out.stdout.replace("\n", "")


def test_config_yaml_recomposes_to_the_same_config(workdir: Path):
    assert run_trainctl("plan", "recipe=llama3_70b_pretrain_h100", cwd=workdir).returncode == 0
    from omegaconf import OmegaConf

    from launch.config.schema import Config

    written = OmegaConf.load(workdir / "runs/llama3_70b_pretrain_h100/config.yaml")
    again = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), written))
    assert again == compose_config(["recipe=llama3_70b_pretrain_h100"])


def test_overrides_reach_the_plan(workdir: Path):
    out = run_trainctl("plan", "recipe=llama3_70b_pretrain_h100", "parallel.tp=8", "cluster.nodes=32", cwd=workdir)
    assert out.returncode == 0, out.stderr
    plan = json.loads((workdir / "runs/llama3_70b_pretrain_h100/plan.json").read_text())
    assert plan["world_size"] == 256
    assert plan["parallel"]["tp"] == 8
    assert plan["parallel"]["dp"] == 256 // (8 * 4 * 2)
    assert plan["parallel"]["grad_accum_steps"] == 512 // plan["parallel"]["dp"]
    assert "tp 8 x pp 4 (vpp 5) x cp 2 x dp 4" in out.stdout  # derived, in the table


def test_cfg_job_resolve_prints_and_writes_nothing(workdir: Path):
    out = run_trainctl("plan", "--cfg", "job", "--resolve", "recipe=tiny_local", cwd=workdir)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["name"] == "tiny_local" and printed["cluster"]["gpus_per_node"] == 2
    assert "${" not in out.stdout
    assert not (workdir / "runs").exists()


def test_multirun_gives_each_point_its_own_directory(workdir: Path):
    out = run_trainctl("plan", "-m", "model=llama3_8b", "cluster=h100", "parallel.tp=2,4,8", "train.global_batch_size=64",
                       cwd=workdir)
    assert out.returncode == 0, out.stderr
    points = sorted((workdir / "runs" / "run").glob("*/plan.json"))
    assert len(points) == 3
    assert sorted(json.loads(p.read_text())["parallel"]["tp"] for p in points) == [2, 4, 8]
    assert all("parallel.tp=" in p.parent.name for p in points)


def test_hydra_mode_override_still_makes_a_sweep(workdir: Path):
    """trainctl skips Hydra's mode probe (one composition per run) unless hydra.mode= is given: then Hydra's own."""
    out = run_trainctl("plan", "hydra.mode=MULTIRUN", "parallel.micro_batch_size=1,2", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert len(list((workdir / "runs" / "run").glob("*/plan.json"))) == 2
    single = run_trainctl("plan", "name=single", cwd=workdir)
    assert single.returncode == 0 and (workdir / "runs/single/plan.json").is_file()


def test_multirun_reports_bad_points_and_plans_the_rest(workdir: Path):
    out = run_trainctl("plan", "-m", "cluster.gpus_per_node=4", "parallel.tp=1,4", cwd=workdir)
    assert out.returncode == 2
    assert "2 KV groups cannot be split evenly over tp=4" in out.stderr
    sweep = workdir / "runs" / "run"
    assert sorted(p.name for p in sweep.iterdir()) == ["cluster.gpus_per_node=4,parallel.tp=1", "multirun.yaml"]


def test_sweep_points_never_share_a_directory(workdir: Path):
    out = run_trainctl("plan", "-m", "name=a,a", "train.steps=30,40", "hydra.sweep.subdir=same", cwd=workdir)
    assert out.returncode == 2
    assert "another point of this sweep already wrote this run directory" in out.stderr
    assert json.loads((workdir / "runs/a/same/plan.json").read_text())["run"]["steps"] == 30


def test_switching_cluster_removes_the_other_job_script(workdir: Path):
    assert run_trainctl("render", "cluster=h100", cwd=workdir).returncode == 0
    assert run_trainctl("render", "cluster=local", cwd=workdir).returncode == 0
    names = {p.name for p in (workdir / "runs/run").iterdir()}
    assert "launch.sh" in names and "job.sbatch" not in names
    assert run_trainctl("plan", cwd=workdir).returncode == 0
    assert "launch.sh" not in {p.name for p in (workdir / "runs/run").iterdir()}


BAD = [
    (["parallel.tpp=2"], "did you mean parallel.tp?"),
    (["parallel.tp=abc"], "parallel.tp: Value 'abc'"),
    (["+parallel.foo=1"], "parallel.foo: no such key"),
    (["model=llama3_7b"], "did you mean model=llama3_70b?"),
    (["recipe=tiny_locl"], "did you mean recipe=tiny_local?"),
    (["parallel.tp=["], "cannot parse the override"),
    (["parallel.recompute=some"], "one of none, selective, full"),
    (["parallel.sequence_parallel=maybe"], "parallel.sequence_parallel=maybe: must be auto, true or false"),
    (["data.prepare_on=there"], "data.prepare_on: Invalid value 'there', expected one of [here, slurm]"),
    (["cluster.gpus_per_node=3"], "global batch 8 is not divisible by micro_batch_size*dp = 1*3 = 3"),
    (["name=../../etc"], "name=../../etc"),
    (["name=../elsewhere/deeper"], "name=../elsewhere/deeper"),
    (["~train"], "train: has no value"),
    (["~train.seed"], "does not support deletion"),
    (["recipe=null"], "a config group was set to null"),
    (["-m", "--cfg", "job"], "Only one of"),
    (["hydra.run.dir=/proc/trainctl-test"], "/proc/trainctl-test"),
    (["train.tokens=1e9"], "takes a value of type int or null"),
    (["cluster.time_limit=00:00:00"], "not a positive SLURM time limit"),
    (["+cluster.env.WANDB_API_KEY=abc"], "looks like a secret"),
    (["-m", "cluster.gpus_per_node=4", "parallel.tp=3,4"], "cannot be split evenly"),
]


@pytest.mark.parametrize("verb", ["plan", "render"])
@pytest.mark.parametrize("args,words", BAD, ids=[b[0][0] for b in BAD])
def test_bad_input_exits_2_without_traceback_or_directory(workdir: Path, verb, args, words):
    out = run_trainctl(verb, *args, cwd=workdir)
    assert out.returncode == 2, out.stdout + out.stderr
    assert words in out.stderr
    assert "fix:" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert list(workdir.iterdir()) == [] and not (workdir.parent / "elsewhere").exists()


def test_unknown_verb(workdir: Path):
    out = run_trainctl("plna", cwd=workdir)
    assert out.returncode == 2 and "did you mean 'trainctl plan'" in out.stderr


def test_version_names_trainctl_and_the_engines_found(workdir: Path):
    from importlib import metadata

    out = run_trainctl("--version", cwd=workdir)
    assert out.returncode == 0 and out.stdout.startswith(f"trainctl {metadata.version('trainctl')} (Python 3."), out
    assert re.search(rf"^\s+megatron-core\s+{re.escape(metadata.version('megatron-core'))}$", out.stdout, re.M)
    assert re.search(r"^\s+deepspeed\s+\S+$", out.stdout, re.M) and list(workdir.iterdir()) == []


def test_a_token_in_the_config_is_refused_without_being_printed_or_written(workdir: Path):
    token = "hf_" + "Q7rT" * 9
    out = run_trainctl("render", "recipe=tiny_slurm", f"cluster.setup=['export HF_TOKEN={token}']", cwd=workdir)
    assert out.returncode == 2 and "cluster.setup[0]=<hidden>" in out.stderr and "fix:" in out.stderr, out.stderr
    assert token not in out.stdout + out.stderr and list(workdir.iterdir()) == []


def test_failed_rerun_keeps_the_previous_records(workdir: Path):
    assert run_trainctl("plan", "recipe=tiny_local", cwd=workdir).returncode == 0
    run_dir = workdir / "runs/tiny_local"
    before = {p.name: p.read_text() for p in run_dir.iterdir()}
    out = run_trainctl("plan", "recipe=tiny_local", "parallel.micro_batch_size=3", cwd=workdir)
    assert out.returncode == 2
    assert {p.name: p.read_text() for p in run_dir.iterdir()} == before


def test_rerun_lands_in_the_same_directory(workdir: Path):
    for steps in (50, 60):
        assert run_trainctl("plan", "recipe=tiny_local", f"train.steps={steps}", cwd=workdir).returncode == 0
    assert [p.name for p in (workdir / "runs").iterdir()] == ["tiny_local"]
    assert json.loads((workdir / "runs/tiny_local/plan.json").read_text())["run"]["steps"] == 60


@pytest.mark.parametrize("cluster,script", [("local", "launch.sh"), ("h100", "job.sbatch")])
def test_render_writes_the_job_script(workdir: Path, cluster, script):
    out = run_trainctl("render", f"cluster={cluster}", "backend=deepspeed", f"data.prepared_dir={workdir / 'unprepared'}",
                       cwd=workdir)
    assert out.returncode == 0, out.stderr
    path = workdir / "runs/run" / script
    assert path.stat().st_mode & 0o111
    assert (workdir / "runs/run/plan.json").is_file()
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # valid shell
    if cluster == "local":  # runs torchrun here: the trainer starts, finds no prepared data, and says so
        done = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and "trainctl: the prepared data is missing" in done.stderr


def test_help_lists_verbs_groups_and_options(workdir: Path):
    top = run_trainctl("--help", cwd=workdir)
    assert top.returncode == 0 and "plan" in top.stdout and "render" in top.stdout
    assert "model: gpt3_175b, llama3_405b" in top.stdout and "recipe: " in top.stdout
    out = run_trainctl("plan", "--help", cwd=workdir)
    assert out.returncode == 0, out.stderr
    for word in ("recipe:", "llama3_405b_pretrain_h100", "model:", "mixtral_8x22b", "parallel:", "cluster:", "h100",
                 "stage:", "dpo", "optim:", "wsd", "backend:", "deepspeed", "data:"):
        assert word in out.stdout, word


def test_user_recipes_and_cluster_profiles_join_through_the_search_path(workdir: Path, tmp_path: Path):
    site = tmp_path / "site-configs"
    (site / "cluster").mkdir(parents=True)
    (site / "recipe").mkdir()
    (site / "cluster" / "mysite.yaml").write_text(
        "defaults:\n  - h100\n  - _self_\nname: mysite\npartition: gpu-long\naccount: proj42\nusd_per_gpu_hour: 1.9\n")
    (site / "recipe" / "my_8b.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /recipe/llama3_8b_pretrain_h100\n  - override /cluster: mysite\n"
        "  - _self_\nname: my_8b\ncluster:\n  nodes: 16\n")
    for how in ({"env": {"TRAINCTL_CONFIG_PATH": str(site)}, "args": []},
                {"env": {}, "args": [f"hydra.searchpath=[file://{site}]"]}):
        out = run_trainctl("plan", "recipe=my_8b", *how["args"], cwd=workdir, env=how["env"])
        assert out.returncode == 0, out.stderr
        config = yaml.safe_load((workdir / "runs/my_8b/config.yaml").read_text())
        assert config["cluster"]["partition"] == "gpu-long" and config["cluster"]["nodes"] == 16
        assert config["cluster"]["gpu"]["hbm_gib"] == 79.6 and config["model"]["num_layers"] == 32


def test_a_broken_search_path_or_config_file_is_one_line_naming_it(workdir: Path, tmp_path: Path):
    site = tmp_path / "site"
    (site / "recipe").mkdir(parents=True)
    (site / "recipe" / "broken.yaml").write_text("# @package _global_\nname: my_run\ncluster: [nodes\n")
    out = run_trainctl("plan", "recipe=broken", cwd=workdir, env={"TRAINCTL_CONFIG_PATH": str(site)})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"{site}/recipe/broken.yaml, line 4, column 1: not valid YAML" in out.stderr and "fix:" in out.stderr
    for entry in (tmp_path / "absent", site / "recipe" / "broken.yaml"):  # silently skipped by Hydra
        for verb in ("plan", "--help"):
            out = run_trainctl(verb, "recipe=tiny_local", cwd=workdir, env={"TRAINCTL_CONFIG_PATH": f"{site}:{entry}"})
            assert out.returncode == 2 and f"TRAINCTL_CONFIG_PATH: {entry} " in out.stderr, out.stderr
    (workdir / "afile").write_text("x")
    for verb in ("status", "cancel"):
        out = run_trainctl(verb, "afile", cwd=workdir)
        assert out.returncode == 2 and out.stderr.startswith("trainctl: error: afile: not a directory"), out.stderr
    assert not (workdir / "runs").exists()  # nothing written


@pytest.mark.parametrize("verb,allowed", [("plan", ()), ("tune", ()), ("render", ("numpy", "matplotlib"))])
def test_cli_path_imports_no_training_packages(workdir: Path, verb, allowed):
    """plan and tune import none of HEAVY; render only matplotlib (and its numpy) for plan.png."""
    code = (f"import sys; from launch.cli import main; rc = main(['{verb}', 'recipe=llama3_405b_pretrain_h100']);"
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules and m not in {allowed!r}];"
            "print(heavy); sys.exit(rc or bool(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout + out.stderr


def test_render_refuses_a_layout_that_does_not_fit(workdir: Path):
    out = run_trainctl("render", "recipe=llama3_405b_pretrain_h100", "parallel.recompute=none", cwd=workdir)
    assert out.returncode == 2
    assert "exceeds the 79.6 GiB" in out.stderr and "parallel.recompute=full" in out.stderr
    assert "estimate.allow_oom=true" in out.stderr
    assert not (workdir / "runs").exists()
    # plan still shows it (it is how you find out), and allow_oom lets render go ahead
    planned = run_trainctl("plan", "recipe=llama3_405b_pretrain_h100", "parallel.recompute=none", cwd=workdir)
    assert planned.returncode == 0 and "DOES NOT FIT" in planned.stdout
    forced = run_trainctl("render", "recipe=llama3_405b_pretrain_h100", "parallel.recompute=none",
                          "estimate.allow_oom=true", cwd=workdir)
    assert forced.returncode == 0, forced.stderr


def test_oom_suggestions_each_fit_when_applied(workdir: Path):
    from launch.config import derive
    from launch.estimate import UNCALIBRATED, estimate
    from launch.verbs.oom import memory_problem

    base = ["recipe=llama3_8b_sft_h100", "parallel.zero_stage=0", "parallel.recompute=none"]
    cfg = compose_config(base)
    message = memory_problem(cfg, estimate(cfg, derive(cfg))["memory_gib"]["per_gpu_peak"], UNCALIBRATED)
    suggestions = [line.split("->")[0].split() for line in message.splitlines() if "->" in line]
    assert suggestions
    for overrides in suggestions:
        fixed = compose_config(base + overrides)
        assert estimate(fixed, derive(fixed))["memory_gib"]["fits"], overrides


def test_render_draws_the_memory_chart(workdir: Path):
    pytest.importorskip("matplotlib")  # the [chart] extra; the [test] extra installs it
    assert run_trainctl("render", "recipe=llama3_70b_pretrain_h100", cwd=workdir).returncode == 0
    png = (workdir / "runs/llama3_70b_pretrain_h100/plan.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert run_trainctl("plan", "recipe=llama3_70b_pretrain_h100", cwd=workdir).returncode == 0
    assert not (workdir / "runs/llama3_70b_pretrain_h100/plan.png").exists()  # plan writes no chart: stale one removed


def test_render_writes_the_backends_files_and_drops_the_other_backends(workdir: Path):
    assert run_trainctl("render", "recipe=tiny_local", cwd=workdir).returncode == 0
    ds = json.loads((workdir / "runs/tiny_local/ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    out = run_trainctl("render", "recipe=tiny_local", "backend=megatron", cwd=workdir)
    assert out.returncode == 0, out.stderr
    names = {p.name for p in (workdir / "runs/tiny_local").iterdir()}
    assert {"megatron.yaml", "megatron_args.txt"} <= names and "ds_config.json" not in names


@pytest.mark.parametrize("args", [["--help"], ["plan", "--help"]])
def test_a_reader_that_stops_early_gets_no_traceback(workdir: Path, args):
    """`trainctl --help | head -1`: the pipe closes while trainctl still writes."""
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = " ".join([sys.executable, "-m", "launch", *args]) + " | head -1"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=workdir, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.startswith(("usage: trainctl", "trainctl plan"))
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr
