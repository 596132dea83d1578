"""``trainctl size``: the seed's worked example, scaling-law sizing, and bad input, through the real CLI
and through the pure functions of launch/verbs/size.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.config.compose import compose_config
from launch.config.schema import ScalingLaw
from launch.estimate.run import Facility
from launch.verbs.size import CHECKPOINT_BYTES_PER_PARAM, Hardware, hardware, problems, run_shape, size_numbers
from launch.verbs.size_schema import SizeConfig
from tests.conftest import ROOT, run_trainctl

SIZE_KEYS = {"flops", "wall_clock_days", "gpu_hours", "cost_usd", "energy_mwh", "expected_failures",
             "mtbf_cluster_min", "checkpoint_interval_min", "optimal_params", "optimal_tokens", "predicted_loss"}
SEED_EXAMPLE = ("params=70e9", "tokens=15e12", "gpus=16384", "mfu=0.4", "mtbf_hours=50000")
H100_SEED = Hardware(gpu_name="H100", peak_tflops=989.0, facility=Facility(
    usd_per_gpu_hour=2.5, gpu_power_w=700, node_overhead_w=575, pue=1.3, grid_kgco2_per_kwh=0.39,
    gpu_mtbf_hours=50700, checkpoint_write_gbps=100, time_limit_s=4 * 3600))


def size_json(workdir: Path, *args: str, name: str = "size") -> dict:
    out = run_trainctl("size", *args, cwd=workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads((workdir / "runs" / name / "size.json").read_text())


# ---- through the CLI ------------------------------------------------------------------

def test_seed_worked_example(workdir: Path):
    # seed 001, Code/Output 19.1.1: 6.300e+24 FLOPs, 11.2 days (270 h), 4.424e+06 GPU-hours,
    # 88 expected failures, one every 183 min.
    out = run_trainctl("size", *SEED_EXAMPLE, cwd=workdir)
    assert out.returncode == 0, out.stderr
    run_dir = workdir / "runs" / "size"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "meta.json", "overrides.yaml", "size.json"]
    s = json.loads((run_dir / "size.json").read_text())
    assert SIZE_KEYS <= set(s)
    assert s["flops"] == pytest.approx(6.3e24)
    assert f"{s['wall_clock_days']:.1f}" == "11.2" and round(s["wall_clock_days"] * 24) == 270
    assert s["gpu_hours"] == pytest.approx(4.424e6, rel=1e-3)
    assert round(s["expected_failures"]) == 88
    assert round(s["mtbf_cluster_min"]) == 183
    # beyond the seed, from the h100 profile: 14 B/param at 100 GB/s, Young/Daly; $2.5/GPU-h; 1,275 W x PUE 1.3
    assert s["checkpoint_write_s"] == pytest.approx(70e9 * 14 / 100e9)
    assert s["checkpoint_interval_min"] == pytest.approx((2 * 9.8 * 183.1 * 60) ** 0.5 / 60, rel=1e-3)
    assert s["cost_usd"] == pytest.approx(s["gpu_hours"] * 2.5)
    assert s["energy_mwh"] == pytest.approx(s["gpu_hours"] * 1275 * 1.3 / 1e6)
    assert "6.3e+24" in out.stdout and "88.5, one every 183 min" in out.stdout
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["params"] == 70e9 and config["gpus"] == 16384
    assert "Traceback" not in out.stderr


def test_compute_alone_gives_the_compute_optimal_split(workdir: Path):
    # Chinchilla: Gopher's 5.76e23 FLOPs -> 70B parameters on 1.4T tokens (the re-fitted law reproduces it).
    s = size_json(workdir, "compute=5.76e23", "scaling_law=besiroglu")
    assert s["optimal_params"] == pytest.approx(70e9, rel=0.10)
    assert s["optimal_tokens"] == pytest.approx(1.4e12, rel=0.10)
    assert (s["params"], s["tokens"]) == pytest.approx((s["optimal_params"], s["optimal_tokens"]))
    assert s["flops"] == pytest.approx(5.76e23)
    assert s["kaplan_params"] > 5 * s["optimal_params"]  # Kaplan 2020 puts far more into the model


def test_inference_aware_optimum_is_smaller_than_chinchilla(workdir: Path):
    s = size_json(workdir, "compute=5.76e23", "inference_tokens=1e14")
    inf = s["inference_optimal"]
    assert inf["params"] < s["optimal_params"] and inf["tokens"] > s["optimal_tokens"]
    assert inf["lifetime_flops"] < inf["compute_optimal_lifetime_flops"]
    assert inf["compute_optimal_params"] == pytest.approx(s["optimal_params"], rel=1e-6)


def test_gpu_profile_from_the_search_path_and_overrides(workdir: Path, tmp_path: Path):
    site = tmp_path / "site"
    (site / "cluster").mkdir(parents=True)
    (site / "cluster" / "mysite.yaml").write_text("defaults:\n  - h100\n  - _self_\nname: mysite\n"
                                                  "usd_per_gpu_hour: 1.5\npue: 1.1\n")
    for how in ({"env": {"TRAINCTL_CONFIG_PATH": str(site)}, "args": []},
                {"env": {}, "args": [f"hydra.searchpath=[file://{site}]"]}):
        out = run_trainctl("size", "params=8e9", "tokens=1e12", "gpu=mysite", "node_overhead_w=0", *how["args"],
                           cwd=workdir, env=how["env"])
        assert out.returncode == 0, out.stderr
        s = json.loads((workdir / "runs/size/size.json").read_text())
        assert s["gpu"] == "H100-SXM-80GB"  # the gpu block comes from h100 through the site profile's defaults
        assert s["cost_usd"] == pytest.approx(s["gpu_hours"] * 1.5)
        assert s["energy_mwh"] == pytest.approx(s["gpu_hours"] * 700 * 1.1 / 1e6)
        assert s["facility"]["pue"] == 1.1 and s["facility"]["node_overhead_w"] == 0


def test_multirun_and_rerun(workdir: Path):
    out = run_trainctl("size", "-m", "params=8e9,70e9", "tokens=15e12", cwd=workdir)
    assert out.returncode == 0, out.stderr
    points = sorted((workdir / "runs/size").glob("*/size.json"))
    assert len(points) == 2 and all("params=" in p.parent.name for p in points)
    for tokens in ("1e12", "2e12"):
        assert run_trainctl("size", "params=1e9", f"tokens={tokens}", "name=again", cwd=workdir).returncode == 0
    assert json.loads((workdir / "runs/again/size.json").read_text())["tokens"] == 2e12


def test_help_and_cfg_job(workdir: Path):
    out = run_trainctl("size", "--help", cwd=workdir)
    assert out.returncode == 0, out.stderr
    for word in ("trainctl size", "params:", "inference_tokens:", "scaling_law:", "gpu: h100"):
        assert word in out.stdout, word
    out = run_trainctl("size", "--cfg", "job", "params=1e9", "tokens=2e10", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["params"] == 1e9
    assert list(workdir.iterdir()) == []


BAD = [
    (["params=-1", "tokens=1e12"], "params=-1: must be a positive number"),
    ([], "params, tokens, compute: none is given"),
    (["params=7e10"], "only params=7e+10 is given"),
    (["params=1", "tokens=1", "compute=6"], "give two of them, not three"),
    (["params=7e10", "tokens=1e12", "gpu=h200"], "gpu=h200: no cluster profile named 'h200'"),
    (["params=7e10", "tokens=1e12", "mfu=1.5"], "mfu=1.5: must be a fraction"),
    (["params=7e10", "tokens=1e12", "gpus=0"], "gpus=0: must be at least 1"),
    (["params=7e10", "tokens=1e12", "time_limit=forever"], "time_limit='forever'"),
    (["params=7e10", "tokens=1e12", "+extra=1"], "extra: no such key in trainctl size's config"),
    (["params=abc"], "params: Value 'abc'"),
]


@pytest.mark.parametrize("args,words", BAD, ids=[" ".join(b[0]) or "nothing" for b in BAD])
def test_bad_input_exits_2_without_traceback_or_directory(workdir: Path, args, words):
    out = run_trainctl("size", *args, cwd=workdir)
    assert out.returncode == 2, out.stdout + out.stderr
    assert words in out.stderr
    assert "fix:" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert list(workdir.iterdir()) == []


def test_failed_rerun_keeps_the_previous_records(workdir: Path):
    size_json(workdir, "params=1e9", "tokens=2e10")
    before = {p.name: p.read_text() for p in (workdir / "runs/size").iterdir()}
    assert run_trainctl("size", "params=-1e9", "tokens=2e10", cwd=workdir).returncode == 2
    assert {p.name: p.read_text() for p in (workdir / "runs/size").iterdir()} == before


def test_size_imports_no_training_packages(workdir: Path):
    code = ("import sys; from launch.cli import main; rc = main(['size', 'compute=1e24', 'inference_tokens=1e13']);"
            "heavy = [m for m in ('torch', 'deepspeed', 'megatron', 'transformers', 'numpy') if m in sys.modules];"
            "print(heavy); sys.exit(rc or bool(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout + out.stderr


# ---- the pure functions ---------------------------------------------------------------

def test_size_numbers_seed_example():
    cfg = SizeConfig(params=70e9, tokens=15e12, gpus=16384, mfu=0.4, mtbf_hours=50_000)
    s = size_numbers(cfg, hardware(cfg, compose_config(["cluster=h100"]).cluster))
    assert s["flops"] == 6.3e24
    assert s["wall_clock_days"] == pytest.approx(6.3e24 / (989e12 * 0.4 * 16384) / 86400)
    assert s["expected_failures"] == pytest.approx(s["gpu_hours"] / 50_000)  # the seed's 50,000, not the profile's
    assert s["mtbf_cluster_min"] == pytest.approx(50_000 / 16384 * 60)
    assert s["inference_optimal"] is None


def test_hardware_takes_the_profile_and_the_overrides():
    h100 = compose_config(["cluster=h100"]).cluster
    hw = hardware(SizeConfig(usd_per_gpu_hour=1.0, time_limit="1-00:00:00"), h100)
    assert (hw.gpu_name, hw.peak_tflops) == ("H100-SXM-80GB", 989.0)
    assert (hw.facility.usd_per_gpu_hour, hw.facility.time_limit_s) == (1.0, 86400)
    assert (hw.facility.pue, hw.facility.gpu_mtbf_hours, hw.facility.node_overhead_w) == (1.3, 50700, 575)


def test_a_profile_without_a_usable_time_limit_is_a_user_error():
    import dataclasses

    from launch.errors import UserError

    h100 = compose_config(["cluster=h100"]).cluster
    with pytest.raises(UserError, match="time_limit='00:00:00'"):
        hardware(SizeConfig(), dataclasses.replace(h100, time_limit="00:00:00"))


def test_checkpoint_write_seconds_given_or_from_bandwidth():
    from launch.estimate.run import checkpoint_bytes

    assert checkpoint_bytes(compose_config(["recipe=llama3_8b_pretrain_h100"]), 1) == CHECKPOINT_BYTES_PER_PARAM
    given = size_numbers(SizeConfig(params=1e9, tokens=1e10, checkpoint_write_s=60), H100_SEED)
    assert given["checkpoint_write_s"] == 60
    derived = size_numbers(SizeConfig(params=1e9, tokens=1e10), H100_SEED)
    assert derived["checkpoint_write_s"] == pytest.approx(1e9 * 14 / 100e9)


def test_run_shape_from_any_two():
    assert run_shape(SizeConfig(params=1e9, compute=6e19))[:2] == pytest.approx((1e9, 1e10))
    assert run_shape(SizeConfig(tokens=1e10, compute=6e19))[:2] == pytest.approx((1e9, 1e10))
    n, d, how = run_shape(SizeConfig(compute=5.76e23, scaling_law=ScalingLaw.besiroglu))
    assert 6 * n * d == pytest.approx(5.76e23) and "besiroglu" in how


def test_problems_names_every_bad_key():
    found = problems(SizeConfig(params=-1.0, tokens=0.0, gpus=0, mfu=0.0, inference_tokens=-5, pue=0.0))
    for key in ("params=-1", "tokens=0", "gpus=0", "mfu=0", "inference_tokens=-5", "pue=0"):
        assert any(p.startswith(key) for p in found), key
    assert all("fix:" in p for p in found)
    assert problems(SizeConfig(params=1e9, tokens=1e10)) == []


def test_size_suggests_its_own_keys(workdir):
    out = run_trainctl("size", "parms=7e9", cwd=workdir)
    assert out.returncode == 2 and "did you mean params?" in out.stderr and "Traceback" not in out.stderr
