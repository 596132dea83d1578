"""`trainctl tune`: the layout search, its records, and its accuracy against published layouts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from launch.config import derive
from launch.config.compose import compose_config
from launch.config.validate import validate
from launch.estimate import estimate
from launch.estimate.calibration import load_calibration
from launch.estimate.memory import memory_estimate
from launch.config.derive import pipeline_split, uneven_first_last
from launch.verbs.tune import NEAR_TIE, overrides, roomier, search, tune_record
from tests.conftest import run_trainctl
from tests.test_cli import BLOCK_KEYS
from tests.test_estimate import PUBLISHED, palm_flops_per_token


@pytest.fixture(scope="module")
def llama405b():
    """Llama 3 405B on 16,384 H100, 8K sequences, 2,048 of them (16M tokens) per step: the Llama 3 paper's run."""
    return search(compose_config(["recipe=llama3_405b_pretrain_h100"]))


def _shape(c) -> tuple:
    p = c.parallel
    return p.tp, p.pp, p.cp


# ---- the layouts ---------------------------------------------------------------------------

@pytest.mark.parametrize("layers,pp,vpp,expected", [
    (32, 4, 2, {}),  # 32 = 4 x 2 x 4
    (126, 16, 8, {"account_for_embedding_in_pipeline_split": True, "account_for_loss_in_pipeline_split": True}),
    (80, 3, 1, {"account_for_loss_in_pipeline_split": True}),  # 81 = 3 x 27
    (61, 4, 1, {"num_layers_in_first_pipeline_stage": 14, "num_layers_in_last_pipeline_stage": 15}),
    (5, 1, 2, None),  # no interleaving without a pipeline
])
def test_pipeline_split_is_one_megatron_accepts(layers, pp, vpp, expected):
    assert pipeline_split(layers, pp, vpp) == expected
    if expected is None:
        return
    cfg = compose_config(["recipe=llama3_70b_pretrain_h100", f"model.num_layers={layers}", f"parallel.pp={pp}",
                          f"parallel.vpp={vpp}", "parallel.tp=8", "parallel.cp=1", "cluster.nodes=64"])
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **expected))
    assert not [p for p in validate(cfg, derive(cfg)) if "pipeline" in str(p)]


def test_uneven_stages_are_lighter_at_the_ends():
    first, last = uneven_first_last(61, 4, 1)
    assert first + last + 2 * 16 == 61 and first <= 16 and last <= 16
    assert uneven_first_last(10, 2, 1) is None  # no middle stages to take the rest


def test_every_ranked_layout_is_valid_and_fits_and_every_rejection_says_why():
    # Llama 3 8B on 8 nodes (the issue's case): no pick exceeds the GPU's memory by the estimate.
    found = search(compose_config(["recipe=llama3_8b_pretrain_h100", "cluster.nodes=8"]))
    assert len(found.ranked) > 100 and found.rejected
    hbm = found.cfg.cluster.gpu.hbm_gib
    for cand in found.ranked:
        variant = dataclasses.replace(found.cfg, parallel=cand.parallel)
        d = derive(variant)
        assert not validate(variant, d)
        assert memory_estimate(variant, d)[0]["per_gpu_peak"] == cand.memory["per_gpu_peak"] <= hbm
    steps = [c.step_s for c in found.ranked]
    assert steps == sorted(steps)
    assert all(c.rejected for c in found.rejected)
    assert any(c.rejected.startswith("memory: needs") for c in found.rejected)


def test_the_search_covers_the_knobs_of_the_issue(llama405b):
    seen = {k: {getattr(c.parallel, k) for c in llama405b.ranked + llama405b.rejected}
            for k in ("tp", "pp", "vpp", "cp", "micro_batch_size", "recompute", "distributed_optimizer",
                      "num_layers_in_first_pipeline_stage")}
    assert seen["tp"] == {1, 2, 4, 8}  # tp <= GPUs per node
    assert {1, 2, 4, 8, 16, 32, 64} <= seen["pp"] and {1, 2, 4, 8} <= seen["vpp"]
    assert seen["cp"] == {1, 2}  # 8,192 tokens, at least tune.min_tokens_per_cp_rank=4,096 per rank
    assert {1, 2} <= seen["micro_batch_size"] and len(seen["recompute"]) == 3
    assert seen["distributed_optimizer"] == {True, False}
    assert len(seen["num_layers_in_first_pipeline_stage"]) > 1  # uneven first/last stages where needed


def test_moe_searches_expert_parallelism():
    found = search(compose_config(["recipe=mixtral_8x7b_pretrain_h100", "cluster.nodes=8",
                                   "train.global_batch_size=256"]))
    assert {c.parallel.ep for c in found.ranked} == {1, 2, 4, 8}
    best = found.ranked[0].parallel
    # Megatron-Core's MoE README runs Mixtral 8x7B on 64 H100 with TP 1, EP 8.
    assert (best.tp, best.ep) == (1, 8)


def test_deepspeed_searches_zero_stages_only():
    found = search(compose_config(["recipe=llama3_8b_sft_h100", "cluster.nodes=2"]))
    assert {(c.parallel.tp, c.parallel.pp) for c in found.ranked} == {(1, 1)}  # cp > 1 is Ulysses
    assert {c.parallel.zero_stage for c in found.ranked + found.rejected} == {0, 1, 2, 3}
    assert {c.parallel.recompute.name for c in found.ranked} <= {"none", "full"}
    assert found.ranked[0].parallel.zero_stage >= 1  # 8B states do not fit unsharded (16 B/param = 128 GB)


# ---- accuracy against published layouts ------------------------------------------------------

def test_llama3_405b_pick_is_tp8_pp8_or_more(llama405b):
    """The issue's case: 16,384 H100, 8K sequences, 16M tokens per step. The pick, TP 8 x PP 8 x CP 2, is
    the layout NVIDIA tunes for this model on H100 (Megatron-Bridge's llama31_405b H100 recipes).

    Against the 400 TFLOP/s/GPU Meta reported for its own stack (Llama Team 2024, table 4; PaLM's FLOP
    count) the prediction is 25-30% higher, outside the issue's +-15%, on purpose: NVIDIA measured this
    layout on Megatron-Core at 55% MFU (dgxc-benchmarking: 206 tokens/s/GPU on 1,024 H100, ~547 TFLOP/s
    in the same count; the next test), so an estimator that matched Meta's figure would under-predict
    Megatron-Core by a quarter. Here the prediction must lie above Meta's and within 30% of it."""
    best = llama405b.ranked[0]
    assert best.parallel.tp == 8 and best.parallel.pp >= 8 and best.parallel.cp == 2
    palm_tflops = best.throughput["tokens_per_s_per_gpu"] * palm_flops_per_token(llama405b.cfg) / 1e12
    assert 1.0 < palm_tflops / 400 < 1.30, palm_tflops
    # The pick beats Meta's own layout (TP 8, PP 16, CP 1) by the model, but not by an implausible margin.
    meta = compose_config(["recipe=llama3_405b_pretrain_h100", "parallel.recompute=none"])
    as_run = estimate(meta, derive(meta))["throughput"]["step_time_s"]
    assert 1.0 < as_run / best.step_s < 1.15


def test_llama31_405b_pick_at_nvidias_scale_is_nvidias_layout_and_predicts_its_measurement():
    """On NVIDIA's benchmark (1,024 H100, 512 sequences of 8K, bf16 gradient reduction) the pick is
    its layout, TP 8 PP 8 CP 2, and predicts its measured tokens/s/GPU. NVIDIA's 8 virtual stages (two
    layers each) come second, within half a percent of 16 stages of one layer: a tie by the estimate."""
    found = search(compose_config(["recipe=llama3_405b_pretrain_h100", "cluster.nodes=128",
                                   "train.global_batch_size=512", "train.grad_reduce_in_fp32=false"]))
    best = found.ranked[0]
    assert (best.parallel.tp, best.parallel.pp, best.parallel.cp) == (8, 8, 2)
    nvidia = next(c for c in found.ranked if _shape(c) == (8, 8, 2) and c.parallel.vpp == 8)
    assert nvidia.step_s <= best.step_s * (1 + NEAR_TIE)
    measured = PUBLISHED["llama31_405b_bf16"].figure
    assert abs(best.throughput["tokens_per_s_per_gpu"] / measured - 1) <= 0.15


def test_llama3_405b_search_rejects_metas_layout_without_recompute_on_memory(llama405b):
    # Megatron-Core without recompute at TP 8 x PP 16 x CP 1 does not fit 80 GB by the estimate (93 GiB);
    # with CP 2 (half the activations) it does, which is why the pick uses CP 2.
    meta = [c for c in llama405b.rejected if _shape(c) == (8, 16, 1) and c.parallel.vpp == 8
            and c.parallel.recompute.name == "none" and c.parallel.micro_batch_size == 1
            and c.parallel.distributed_optimizer and c.parallel.account_for_loss_in_pipeline_split]
    assert len(meta) == 1 and meta[0].rejected.startswith("memory: needs 93")


@pytest.mark.parametrize("overrides,published,source", [
    (("recipe=llama3_70b_pretrain_h100", "cluster.nodes=8", "train.global_batch_size=128"), (4, 4, 2),
     "NeMo 24.07 performance summary / Megatron-Bridge H100 recipe: Llama 3 70B, 64 GPUs, TP 4 PP 4 CP 2"),
    (("recipe=gpt3_175b_pretrain_h100", "cluster.nodes=16", "train.global_batch_size=256"), (4, 8, 1),
     "NeMo 24.07 performance summary (the MLPerf layout): GPT-3 175B, 128 GPUs, TP 4 PP 8"),
    (("model=llama3_8b", "cluster=h100", "cluster.nodes=1", "model.seq_length=8192", "train.global_batch_size=128",
      "train.grad_reduce_in_fp32=false"), (1, 1, 2),
     "dgxc-benchmarking v25.04.02 / Megatron-LM examples/llama: Llama 3 8B, 8 GPUs, TP 1 PP 1 CP 2"),
])
def test_picks_match_published_tuned_layouts(overrides, published, source):
    found = search(compose_config(list(overrides)))
    assert _shape(found.ranked[0]) == published, source


# ---- the command ------------------------------------------------------------------------------

TUNE_70B = ("recipe=llama3_70b_pretrain_h100", "cluster.nodes=8", "train.global_batch_size=128")


def test_tune_writes_tune_json_and_a_parallel_option_plan_can_select(workdir: Path):
    plan = run_trainctl("plan", *TUNE_70B, cwd=workdir)
    assert plan.returncode == 0, plan.stderr
    out = run_trainctl("tune", *TUNE_70B, "tune.top_k=3", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "why #1:" in out.stdout and "your layout ranks #" in out.stdout
    run_dir = workdir / "runs/llama3_70b_pretrain_h100"
    assert (run_dir / "plan.json").is_file() and (run_dir / "config.yaml").is_file()  # plan's records kept

    record = json.loads((run_dir / "tune.json").read_text())
    assert record["best"]["rank"] == 1 and record["why_best"]
    assert record["searched"] == len(record["candidates"]) > record["fit"] > 0
    for block in ("parallel", "memory_gib", "throughput"):
        assert BLOCK_KEYS[block] <= set(record["best"][block])
    rejected = [c for c in record["candidates"] if c["rejected"]]
    assert rejected and all(c["rank"] is None and c["throughput"] is None for c in rejected)
    assert sum(record["rejected_by"].values()) == len(rejected) and "memory" in record["rejected_by"]
    assert f"rejected {len(rejected):,}: " in out.stdout
    ranked = [c for c in record["candidates"] if c["rank"]]
    assert [c["rank"] for c in ranked] == list(range(1, len(ranked) + 1))

    option = run_dir / "conf/parallel/llama3_70b_pretrain_h100_tuned.yaml"
    assert option.is_file()
    env = {"TRAINCTL_CONFIG_PATH": str(run_dir / "conf")}
    replan = run_trainctl("plan", *TUNE_70B, "parallel=llama3_70b_pretrain_h100_tuned", "hydra.run.dir=runs/re",
                          cwd=workdir, env=env)
    assert replan.returncode == 0, replan.stderr
    numbers = json.loads((workdir / "runs/re/plan.json").read_text())
    assert numbers["parallel"] == {k: v for k, v in record["best"]["parallel"].items() if k in BLOCK_KEYS["parallel"]}
    assert numbers["throughput"]["step_time_s"] == pytest.approx(record["best"]["throughput"]["step_time_s"])


@pytest.mark.parametrize("overrides,message", [
    (("recipe=llama3_70b_pretrain_h100", "estimate.mfu=0.4"), "estimate.mfu=0.4: tune ranks layouts"),
    (("recipe=llama3_70b_pretrain_h100", "tune.layout_name='a b'"), "tune.layout_name=a b"),
    (("recipe=llama3_405b_pretrain_h100", "cluster.nodes=1"), "cluster.nodes=1: none of the"),
    (("recipe=llama3_70b_pretrain_h100", "train.steps=10"), "problems no parallel layout can mend"),
    (("recipe=tiny_local", "tune.probe=true"), "tune.probe=true: probes run as a Slurm job array"),
])
def test_tune_refuses_with_exit_2_and_writes_nothing(workdir: Path, overrides, message):
    out = run_trainctl("tune", *overrides, cwd=workdir)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not list(workdir.glob("runs/*/tune.json"))


# ---- calibration ------------------------------------------------------------------------------

def _calibration(tmp_path: Path, **values) -> Path:
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"cluster": "h100", "step_time_ratio": 1.0, "memory_ratio": None, **values}))
    return path


def test_calibration_scales_step_time_and_memory(tmp_path: Path):
    base = compose_config(["recipe=llama3_70b_pretrain_h100"])
    path = _calibration(tmp_path, step_time_ratio=1.25, memory_ratio=1.1)
    cal = compose_config(["recipe=llama3_70b_pretrain_h100", f"cluster.calibration={path}"])

    a, b = estimate(base, derive(base)), estimate(cal, derive(cal), load_calibration(cal))
    assert b["throughput"]["step_time_s"] == pytest.approx(1.25 * a["throughput"]["step_time_s"])
    assert b["throughput"]["mfu"] == pytest.approx(a["throughput"]["mfu"] / 1.25)
    assert b["run"]["wall_clock_days"] > a["run"]["wall_clock_days"]
    # the tensors scale, the CUDA context and NCCL buffers (estimate.*_gib) do not
    fixed = base.estimate.cuda_context_gib + base.estimate.nccl_buffers_gib
    assert b["memory_gib"]["per_gpu_peak"] - fixed == pytest.approx(1.1 * (a["memory_gib"]["per_gpu_peak"] - fixed))


@pytest.mark.parametrize("content,message", [
    (None, "cannot be read"),
    ("{not json", "not JSON"),
    (json.dumps({"cluster": "other", "step_time_ratio": 1.2}), "measured on cluster 'other'"),
    (json.dumps({"cluster": "h100", "step_time_ratio": -1}), "step_time_ratio=-1 must be a number from"),
    ('{"cluster": "h100", "step_time_ratio": Infinity}', "step_time_ratio=inf must be a number from"),
    (json.dumps({"cluster": "h100", "memory_ratio": True}), "memory_ratio=True must be a number from"),
    ("[1, 2]", "holds a list, not the object"),
    (b"\xff\xfe{", "not JSON"),
])
def test_a_bad_calibration_file_is_a_user_error(workdir: Path, content, message):
    path = workdir / "cal.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = run_trainctl("plan", "recipe=llama3_70b_pretrain_h100", f"cluster.calibration={path}", cwd=workdir)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_a_near_tie_that_needs_much_less_memory_is_named():
    """Llama 3 8B on 64 GPUs at 8K: tp1 cp2 wins by under 1% at ~72 GiB; tp2 cp2 is as fast by the
    estimate's own error and needs half the memory: the user is told, and tune.json records it."""
    found = search(compose_config(["model=llama3_8b", "cluster=h100", "cluster.nodes=8", "model.seq_length=8192",
                                   "train.global_batch_size=128"]))
    best, alt = found.ranked[0], roomier(found)
    assert alt is not None and alt is not best
    assert alt.step_s <= best.step_s * 1.02
    assert alt.memory["per_gpu_peak"] <= best.memory["per_gpu_peak"] - 0.1 * best.memory["hbm"]
    assert tune_record(found)["roomier"]["overrides"] == overrides(alt, found.cfg.backend.name)


def test_the_use_it_line_of_a_sweep_point_names_that_points_values(workdir: Path):
    out = run_trainctl("tune", "-m", "recipe=tiny_local", "train.global_batch_size=8,16", cwd=workdir)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("use it:")]
    assert [[w for w in line.split() if w.startswith("train.global_batch_size")] for line in lines] == [
        ["train.global_batch_size=8"], ["train.global_batch_size=16"]]  # the point's value, not the sweep's "8,16"


def test_a_layout_outside_the_searched_set_is_placed_among_the_ranked(workdir: Path):
    """sequence_parallel is kept on auto by the search; a user's explicit true is still judged and placed."""
    out = run_trainctl("tune", *TUNE_70B, "parallel.sequence_parallel=true", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "your layout (outside the searched set) would rank #" in out.stdout and "#None" not in out.stdout


def test_tune_files_are_readable_by_the_group_like_any_other_file(workdir: Path):
    out = run_trainctl("tune", "recipe=tiny_local", cwd=workdir)
    assert out.returncode == 0, out.stderr
    for path in (workdir / "runs/tiny_local/tune.json", workdir / "runs/tiny_local/conf/parallel/tiny_local_tuned.yaml"):
        assert path.stat().st_mode & 0o044 == 0o044  # the test process's umask is 022


@pytest.mark.parametrize("overrides,message", [
    (("tune.layout_name=tp8",), "parallel=tp8 is a shipped option"),
    (("name=a/b",), "name=a/b: tune writes the best layout as parallel/a/b_tuned.yaml"),
    (("tune.max_micro_batch_size=0",), "tune.max_micro_batch_size=0: must be at least 1"),
])
def test_tune_settings_are_checked(workdir: Path, overrides, message):
    out = run_trainctl("tune", "recipe=tiny_local", *overrides, cwd=workdir)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


# ---- probes (the Slurm path itself: tests/test_slurm.py) ----------------------------------------

def test_a_probe_runs_the_whole_candidate_layout_and_keeps_nothing():
    """The 405B recipe sets account_for_*; a candidate with explicit first/last stages must not inherit
    them (Megatron refuses both at once), and the probe must not touch the user's checkpoints."""
    from launch.config.compose import compose
    from launch.verbs.plan import make_plan
    from launch.verbs.probe import probe_config

    overrides = ["recipe=llama3_405b_pretrain_h100", "train.checkpoint_dir=/shared/ckpt/405b"]
    found = search(compose_config(overrides))
    uneven = next(c for c in found.ranked if c.parallel.num_layers_in_first_pipeline_stage is not None)
    probe = make_plan(probe_config(compose(overrides), uneven.parallel, 20, "p1")).cfg
    assert probe.parallel == uneven.parallel
    assert (probe.train.checkpoint_dir, probe.train.save_final, probe.train.steps) == (None, False, 20)
    assert probe.train.checkpoint_interval >= probe.train.steps


def test_probe_predictions_leave_out_an_applied_calibration(tmp_path: Path):
    from launch.verbs.probe import uncalibrated

    path = _calibration(tmp_path, step_time_ratio=2.0)
    plain = search(compose_config(list(TUNE_70B)))
    calibrated = search(compose_config([*TUNE_70B, f"cluster.calibration={path}"]))
    assert calibrated.ranked[0].step_s == pytest.approx(2 * plain.ranked[0].step_s)
    assert (uncalibrated(calibrated.cfg, calibrated.ranked[0])["step_time_s"]
            == pytest.approx(plain.ranked[0].step_s))


def test_measure_reads_whole_training_records_only(tmp_path: Path):
    from launch.verbs.probe import measure

    good = {"kind": "train", "step_time_s": 2.0, "peak_memory_gib": 30.0, "memory_kind": "cuda_max_allocated"}
    lines = [json.dumps({**good, "step_time_s": 9.0}), "[]", json.dumps({**good, "peak_memory_gib": None}),
             json.dumps({"kind": "train"}), json.dumps({"kind": "eval", "loss": 1}), json.dumps(good),
             json.dumps({**good, "step_time_s": 4.0}), '{"kind": "tra']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    m = measure(tmp_path)
    assert m["step_time_s"] == 3.0 and m["windows"] == 2  # the first window (start-up) is left out
    assert measure(tmp_path / "missing") is None


def test_probes_of_another_search_are_refused(tmp_path: Path):
    from launch.errors import UserError
    from launch.verbs.probe import RECORD, collect, probe_dir, searched

    cfg = compose_config(list(TUNE_70B))
    probe_dir(tmp_path).mkdir()
    record = {"searched": {**searched(cfg), "nodes": 16}, "probes": []}
    (probe_dir(tmp_path) / RECORD).write_text(json.dumps(record))
    with pytest.raises(UserError, match="nodes 16 then, 8 now"):
        collect(tmp_path, cfg)
    (probe_dir(tmp_path) / RECORD).write_text('{"probes": [')
    with pytest.raises(UserError, match="not a probe record"):
        collect(tmp_path, cfg)


def test_a_tie_says_what_broke_it():
    """tiny_local: ZeRO-1 and ZeRO-2 take the same predicted time; ZeRO-2 shards the gradients too."""
    from launch.verbs.tune import why_best

    found = search(compose_config(["recipe=tiny_local"]))
    best, second = found.ranked[:2]
    assert best.step_s == second.step_s
    assert why_best(found.cfg, best, second, found.calibration)[0].endswith("ranked first for less memory")
