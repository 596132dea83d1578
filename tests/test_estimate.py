"""The estimator against published numbers and the formulas it cites.

Configs are composed exactly as the CLI composes them (launch.config.compose).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import subprocess
import sys

import pytest

from launch.config import derive
from launch.config.compose import compose_config
from launch.estimate import estimate
from launch.estimate.flops import flops_per_token, megatron_flops_per_token
from launch.estimate.memory import (
    GIB, deepspeed_state_bytes, layer_activation_bytes, megatron_state_bytes,
    microbatches_in_flight, stage_memory, stage_state_bytes,
)
from launch.estimate.params import (
    largest_module_params, params_active, params_total, stage_params, word_embedding_params,
)
from launch.estimate.perf import bubble_fraction
from launch.config.slurm_time import parse_time_limit
from launch.estimate.run import checkpoint_bytes, young_daly_interval_seconds
from launch.estimate.scaling import chinchilla_loss

RECIPES = [
    "llama3_8b_pretrain_h100",
    "llama3_70b_pretrain_h100",
    "llama3_405b_pretrain_h100",
    "gpt3_175b_pretrain_h100",
    "mixtral_8x7b_pretrain_h100",
]


@functools.lru_cache(maxsize=None)
def _compose(overrides: tuple[str, ...]):
    cfg = compose_config(list(overrides))
    return cfg, derive(cfg)


def composed(*overrides: str):
    """(cfg, derived) for overrides; cached, so treat them as read-only."""
    return _compose(tuple(overrides))


def model(name: str):
    return composed(f"model={name}")[0].model


@pytest.fixture(scope="module", autouse=True)
def _hydra_warm():
    """Hydra's first composition imports its plugins (~1.5 s); pay it once, outside the tests."""
    composed()


@functools.lru_cache(maxsize=None)
def plan(*overrides: str) -> dict:
    return estimate(*composed(*overrides))


# ---- parameters: published counts ----------------------------------------------------

def test_llama3_8b_params_exact():
    # Hugging Face meta-llama/Meta-Llama-3-8B: 8,030,261,248 parameters ("8.03B").
    assert params_total(model("llama3_8b")) == 8_030_261_248


def test_llama3_70b_params():
    # Llama 3 herd paper / HF meta-llama/Meta-Llama-3-70B: 70.6B.
    assert round(params_total(model("llama3_70b")) / 1e9, 1) == 70.6


def test_llama3_405b_params():
    # HF meta-llama/Llama-3.1-405B: 405.9B (to 0.1B).
    assert abs(params_total(model("llama3_405b")) / 1e9 - 405.9) < 0.1


def test_mixtral_params_total_and_active():
    # Jiang et al. 2024, "Mixtral of Experts": 46.7B total, 12.9B active (HF: 46,702,792,704).
    m = model("mixtral_8x7b")
    assert params_total(m) == 46_702_792_704
    assert round(params_active(m) / 1e9, 1) == 12.9


def test_gpt3_175b_params():
    # Brown et al. 2020, table 2.1: 175.0B.
    assert params_total(model("gpt3_175b")) == pytest.approx(175e9, rel=0.005)


def test_dense_active_equals_total():
    m = model("llama3_70b")
    assert params_active(m) == params_total(m)


def test_stage_params_sum_to_model_without_tp():
    cfg, d = composed("model=llama3_8b", "backend=deepspeed")  # no vocabulary padding
    assert sum(s.total for s in stage_params(cfg, d)) == params_total(cfg.model)


def test_stage_params_pipeline_split_and_tied_copy():
    # GPT-3 is tied: with pp > 1 the last stage holds a second copy of the embedding.
    cfg, d = composed("recipe=gpt3_175b_pretrain_h100", "parallel.tp=1", "parallel.vpp=1")
    stages = stage_params(cfg, d)
    assert len(stages) == cfg.parallel.pp
    extra = sum(s.total for s in stages) - params_total(cfg.model)
    padded = 50304  # 50257 padded to a multiple of 128 (Megatron)
    vocab_padding = (padded - cfg.model.vocab_size) * cfg.model.hidden_size
    assert extra == pytest.approx(padded * cfg.model.hidden_size + vocab_padding)
    assert stages[0].total > stages[1].total  # embedding + positions


def test_stage_params_tensor_parallel_share():
    cfg, d = composed("recipe=llama3_70b_pretrain_h100")
    per_gpu = sum(s.total for s in stage_params(cfg, d))
    assert per_gpu == pytest.approx(params_total(cfg.model) / cfg.parallel.tp, rel=0.01)


def test_experts_split_over_ep():
    cfg, d = composed("recipe=mixtral_8x7b_pretrain_h100")
    s = stage_params(cfg, d)[1]
    one_expert = 3 * 4096 * 14336
    assert s.expert == s.layers * 8 * one_expert / cfg.parallel.ep


# ---- FLOPs ---------------------------------------------------------------------------

def test_llama3_8b_flops_per_token_megatron_formula():
    # Megatron-LM num_floating_point_operations (megatron/training/training.py), written
    # out for Llama-3-8B: 3 (fwd+bwd) * 2 (FMA) * [L*(h*(q+2k) + q*h + q*s + 3*h*f) + h*V].
    L, h, f, s, V = 32, 4096, 14336, 8192, 128256
    q, k = 32 * 128, 8 * 128
    expected = 6 * (L * (h * (q + 2 * k) + q * h + q * s + 3 * h * f) + h * V)
    cfg, _ = composed("model=llama3_8b")
    assert flops_per_token(cfg) == expected
    # 6N plus attention: within 10% of 6N, and above it.
    six_n = 6 * params_total(cfg.model)
    assert 1.0 < expected / six_n < 1.10


def test_gpt3_flops_match_narayanan():
    # Narayanan et al. 2021, appendix: model FLOPs per step 72*B*s*l*h^2*(1 + s/(6h) + V/(12*l*h))
    # (eq. 3's 96 includes a recomputed forward). They count the full s x s attention
    # matrix; Megatron's code counts half of it under the causal mask: 6*l*h*s per token less.
    m = model("gpt3_175b")
    l, h, s, V = 96, 12288, 2048, 51200
    narayanan = 72 * l * h**2 * (1 + s / (6 * h) + V / (12 * l * h))  # per token
    assert megatron_flops_per_token(m, V) == pytest.approx(narayanan - 6 * l * h * s, rel=1e-12)


def test_flops_blocks_consistent():
    cfg, d = composed("recipe=llama3_8b_pretrain_h100")
    f = plan("recipe=llama3_8b_pretrain_h100")["flops"]
    assert f["per_step"] == f["per_token"] * cfg.train.global_batch_size * cfg.model.seq_length
    assert f["total"] == f["per_token"] * d.tokens
    assert f["per_token_6nd"] == 6 * params_total(cfg.model)


def test_moe_flops_count_topk_experts():
    # Megatron's formula for Mixtral 8x7B: topk = 2 experts' MLP per token.
    L, h, f, s, V, topk = 32, 4096, 14336, 4096, 32000, 2
    q, k = 32 * 128, 8 * 128
    expected = 6 * (L * (h * (q + 2 * k) + q * h + q * s + 3 * h * f * topk) + h * V)
    cfg, _ = composed("recipe=mixtral_8x7b_pretrain_h100")
    assert flops_per_token(cfg) == expected
    assert flops_per_token(cfg) < 6 * params_total(cfg.model) / 3


# ---- memory: model states ------------------------------------------------------------

@pytest.mark.parametrize("dp", [1, 8, 64, 512])
def test_megatron_distributed_optimizer_bytes_per_param(dp):
    # theoretical_memory_usage.py: 6 + 12/dp with the distributed optimizer, else 18.
    cfg, _ = composed("recipe=llama3_8b_pretrain_h100")
    assert megatron_state_bytes(cfg, 1, dp).total == 6 + 12 / dp
    plain = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, distributed_optimizer=False))
    assert megatron_state_bytes(plain, 1, dp).total == 18


def test_fp32_weights_take_four_bytes():
    cfg, _ = composed("recipe=tiny_local")
    states = deepspeed_state_bytes(
        dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero_stage=0)), 1, 1)
    assert (states.weights, states.grads, states.optimizer) == (4, 4, 8)


def _deepspeed(*extra: str):
    return composed("backend=deepspeed", "model=llama3_8b", "cluster=h100", "cluster.nodes=8",
                    "train.precision=bf16", *extra)


def test_zero3_8b_on_64_gpus_is_16_bytes_per_param_sharded():
    # ZeRO paper (Rajbhandari et al. 2020, fig. 1): (2 + 2 + 12) * Psi / N under stage 3.
    cfg, d = _deepspeed("parallel.zero_stage=3")
    assert d.dp == 64
    P = params_total(cfg.model)
    assert deepspeed_state_bytes(cfg, P, 64).total == pytest.approx(16 * 8.03e9 / 64, rel=0.001)
    # The estimate adds the largest module, gathered (bf16 weights + grads).
    full = stage_state_bytes(cfg, d, stage_params(cfg, d)[0])
    assert full.total == pytest.approx(16 * P / 64 + 4 * largest_module_params(cfg.model))


# DeepSpeed's reference formulas, from deepspeed/runtime/zero/stage_1_and_2.py and
# deepspeed/runtime/zero/stage3.py (returns (cpu_mem, gpu_mem[, largest_layer_memory])).

def ds_estimate_zero2_gpu(total_params, num_gpus_per_node, num_nodes, cpu_offload):
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        return 2 * total_params
    return 4 * total_params + int(16 * total_params / total_gpus)


def ds_estimate_zero3_gpu(total_params, largest_layer_params, num_gpus_per_node, num_nodes,
                          cpu_offload, cpu_offload_params):
    total_gpus = num_nodes * num_gpus_per_node
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            return largest_layer_memory
        return largest_layer_memory + int(2 * total_params / total_gpus)
    return largest_layer_memory + int(18 * total_params / total_gpus)


@pytest.mark.parametrize("offload", [False, True])
def test_zero2_against_deepspeed_estimator(offload):
    extra = ("parallel.offload_optimizer=cpu",) if offload else ()
    cfg, d = _deepspeed("parallel.zero_stage=2", *extra)
    P, N = params_total(cfg.model), d.world_size
    ours = stage_state_bytes(cfg, d, stage_params(cfg, d)[0]).total
    ds = ds_estimate_zero2_gpu(P, 8, 8, cpu_offload=offload)
    if offload:
        assert ours == ds  # bf16 weights only
    else:
        # DeepSpeed also counts full-size bf16 gradients (2P) and an fp32 gradient
        # partition (4/N instead of the ZeRO paper's 2/N): 2P + 2P/N more.
        assert ds - ours == pytest.approx(2 * P + 2 * P / N, abs=1)


@pytest.mark.parametrize("offload_optimizer,offload_params", [(False, False), (True, False), (True, True)])
def test_zero3_against_deepspeed_estimator(offload_optimizer, offload_params):
    extra = []
    if offload_optimizer:
        extra.append("parallel.offload_optimizer=cpu")
    if offload_params:
        extra.append("parallel.offload_params=cpu")
    cfg, d = _deepspeed("parallel.zero_stage=3", *extra)
    P, N, L = params_total(cfg.model), d.world_size, largest_module_params(cfg.model)
    assert L == word_embedding_params(cfg.model)  # the embedding is Llama's largest module
    ours = stage_state_bytes(cfg, d, stage_params(cfg, d)[0]).total
    ds = ds_estimate_zero3_gpu(P, L, 8, 8, offload_optimizer, offload_params)
    if offload_optimizer:
        assert ours == pytest.approx(ds, abs=1)
    else:
        # DeepSpeed counts 18 bytes per sharded parameter, the ZeRO paper 16.
        assert ds - ours == pytest.approx(2 * P / N, abs=1)


# ---- memory: activations -------------------------------------------------------------

def _gpt3(*extra: str):
    return composed("model=gpt3_175b", "cluster=h100", "parallel.micro_batch_size=1", *extra)


def test_korthikanti_activations_without_parallelism(monkeypatch):
    # Korthikanti et al. 2022, eq. 1: s*b*h*(34 + 5*a*s/h) bytes per layer.
    import launch.estimate.memory as memory
    monkeypatch.setattr(memory, "FLASH_ATTENTION", False)
    cfg, d = _gpt3()
    s, b, h, a = 2048, 1, 12288, 96
    got = layer_activation_bytes(cfg, d, keep_scores=True)
    assert got == pytest.approx(s * b * h * (34 + 5 * a * s / h))


@pytest.mark.parametrize("sp", [True, False])
def test_korthikanti_activations_with_tensor_parallelism(monkeypatch, sp):
    # Table 2: tensor parallel sbh(10 + 24/t + 5as/(ht)); with sequence parallel sbh(34/t + 5as/(ht)).
    import launch.estimate.memory as memory
    monkeypatch.setattr(memory, "FLASH_ATTENTION", False)
    cfg, d = _gpt3("parallel.tp=8", f"parallel.sequence_parallel={str(sp).lower()}")
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    base = 34 / t if sp else 10 + 24 / t
    got = layer_activation_bytes(cfg, d, keep_scores=True)
    assert got == pytest.approx(s * b * h * (base + 5 * a * s / (h * t)))


def test_selective_recompute_drops_the_scores(monkeypatch):
    import launch.estimate.memory as memory
    monkeypatch.setattr(memory, "FLASH_ATTENTION", False)
    cfg, d = _gpt3("parallel.tp=8")
    assert layer_activation_bytes(cfg, d, keep_scores=False) == pytest.approx(2048 * 12288 * 34 / 8)


def test_full_recompute_keeps_layer_inputs():
    none = stage_memory(*composed("recipe=llama3_8b_pretrain_h100", "parallel.recompute=none"))[0]
    full = stage_memory(*composed("recipe=llama3_8b_pretrain_h100", "parallel.recompute=full"))[0]
    assert full.activations < none.activations / 5


def test_interleaved_first_stage_matches_megatron_penalty():
    # theoretical_memory_usage.py: the first stage holds pp * (1 + (pp-1)/(pp*vpp)) micro-batches.
    for pp, vpp in [(4, 2), (8, 2), (16, 2), (4, 5)]:
        assert microbatches_in_flight(0, pp, vpp, 1000) == pytest.approx(pp * (1 + (pp - 1) / (pp * vpp)))
    assert [microbatches_in_flight(i, 4, 1, 1000) for i in range(4)] == [4, 3, 2, 1]
    assert microbatches_in_flight(0, 8, 1, 2) == 2  # fewer micro-batches than stages


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_fit_in_h100_memory(recipe):
    mem = plan(f"recipe={recipe}")["memory_gib"]
    assert mem["hbm"] == 79.6
    assert mem["fits"], f"{recipe}: {mem['per_gpu_peak']:.1f} GiB"
    assert mem["per_gpu_peak"] <= 79.6


def test_llama3_405b_needs_recomputation():
    mem = plan("recipe=llama3_405b_pretrain_h100", "parallel.recompute=none")["memory_gib"]
    assert not mem["fits"]
    assert mem["per_gpu_peak"] > 79.6


def test_memory_stages_reported_first_to_last():
    p = plan("recipe=llama3_405b_pretrain_h100")
    assert len(p["memory_stages_gib"]) == 16
    assert max(p["memory_stages_gib"]) == pytest.approx(p["memory_gib"]["per_gpu_peak"])


def test_memory_parts_add_up():
    mem = plan("recipe=llama3_70b_pretrain_h100")["memory_gib"]
    parts = mem["weights"] + mem["grads"] + mem["optimizer"] + mem["activations"]
    assert parts < mem["per_gpu_peak"] < parts * 1.1 + 2


# ---- throughput ----------------------------------------------------------------------

@pytest.mark.parametrize("recipe", RECIPES)
def test_mfu_is_plausible(recipe):
    t = plan(f"recipe={recipe}")["throughput"]
    assert 0.2 < t["mfu"] < 0.6
    assert t["tflops_per_gpu"] == pytest.approx(t["mfu"] * 989.0)


def test_bubble_fraction():
    cfg, d = composed("recipe=gpt3_175b_pretrain_h100")
    assert bubble_fraction(cfg, d) == pytest.approx((8 - 1) / (d.grad_accum_steps * 2))


def test_full_recompute_is_slower():
    sel = plan("recipe=llama3_8b_pretrain_h100")["throughput"]["step_time_s"]
    full = plan("recipe=llama3_8b_pretrain_h100", "parallel.recompute=full")["throughput"]["step_time_s"]
    assert 1.1 < full / sel < 4 / 3  # one more forward of the layers; comms do not grow as much


# ---- run -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [
    ("04:00:00", 4 * 3600), ("2-00:00:00", 2 * 86400), ("1-12:30:15", 86400 + 12 * 3600 + 30 * 60 + 15),
    ("30", 1800), ("10:30", 630), ("3-6", 3 * 86400 + 6 * 3600), ("UNLIMITED", math.inf),
])
def test_parse_time_limit(text, seconds):
    assert parse_time_limit(text) == seconds


def test_parse_time_limit_rejects_garbage():
    with pytest.raises(ValueError):
        parse_time_limit("four hours")


def test_run_block_arithmetic():
    cfg, d = composed("recipe=llama3_70b_pretrain_h100")
    p = plan("recipe=llama3_70b_pretrain_h100")
    r, step = p["run"], p["throughput"]["step_time_s"]
    assert r["steps"] == d.steps and r["tokens"] == 15_000_000_000_000
    assert r["wall_clock_days"] == pytest.approx(d.steps * step / 86400)
    assert r["gpu_hours"] == pytest.approx(d.steps * step / 3600 * 2048)
    assert r["cost_usd"] == pytest.approx(r["gpu_hours"] * 2.5)
    assert r["energy_mwh"] == pytest.approx(r["gpu_hours"] * 700 * 1.3 / 1e6)
    assert r["expected_failures"] == pytest.approx(r["gpu_hours"] / 50700)
    assert r["jobs_needed"] == math.ceil(r["wall_clock_days"] * 24 / 4)


def test_young_daly_checkpoint_interval():
    cfg, d = composed("recipe=llama3_405b_pretrain_h100")
    p = plan("recipe=llama3_405b_pretrain_h100")
    write = checkpoint_bytes(cfg, params_total(cfg.model)) / 100e9
    assert checkpoint_bytes(cfg, 1) == 14  # bf16 weights + fp32 master, m, v
    mtbf = 50700 / 16384 * 3600
    assert young_daly_interval_seconds(write, mtbf) == math.sqrt(2 * write * mtbf)
    assert p["run"]["checkpoint_interval_min"] == pytest.approx(math.sqrt(2 * write * mtbf) / 60)


# ---- scaling -------------------------------------------------------------------------

def test_chinchilla_loss():
    # Hoffmann et al. 2022, eq. 10: Chinchilla (70B, 1.4T tokens) -> 1.94.
    assert chinchilla_loss(70e9, 1.4e12) == pytest.approx(1.94, abs=0.005)


def test_scaling_block_uses_active_params():
    p = plan("recipe=mixtral_8x7b_pretrain_h100")
    assert p["scaling"]["tokens_per_param"] == pytest.approx(1e12 / p["model"]["params_active"])


# ---- the entry point -----------------------------------------------------------------

def test_plan_keys_exact():
    p = plan("recipe=llama3_8b_pretrain_h100")
    required = {
        "model": {"params_total", "params_active"},
        "flops": {"per_token", "per_step", "total"},
        "memory_gib": {"per_gpu_peak", "weights", "grads", "optimizer", "activations", "hbm", "fits"},
        "throughput": {"step_time_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu"},
        "run": {"tokens", "steps", "wall_clock_days", "gpu_hours", "cost_usd", "energy_mwh",
                "expected_failures", "checkpoint_interval_min", "jobs_needed"},
        "scaling": {"tokens_per_param", "predicted_loss"},
    }
    assert set(p) == set(required) | {"memory_stages_gib"}
    for block, keys in required.items():
        assert keys <= set(p[block]), block
    assert set(p["flops"]) == required["flops"] | {"per_token_6nd"}
    for block in required:
        if block != "flops":
            assert set(p[block]) == required[block], block


def test_estimate_imports_nothing_heavy():
    code = ("import sys, launch.estimate; "
            "heavy = {'torch', 'deepspeed', 'megatron', 'numpy'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_memory_in_gib():
    p = plan("recipe=llama3_8b_pretrain_h100")
    stage = stage_memory(*composed("recipe=llama3_8b_pretrain_h100"))[0]
    assert p["memory_gib"]["per_gpu_peak"] == pytest.approx(stage.peak / GIB)
