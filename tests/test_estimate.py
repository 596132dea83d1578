"""The estimator against published numbers and the formulas it cites.

Configs are composed exactly as the CLI composes them (launch.config.compose).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import subprocess
import sys
import time

import pytest

from launch.config import derive
from launch.config.compose import compose_config
from launch.estimate import estimate
from launch.estimate.flops import flops_per_token, megatron_flops_per_token
from launch.estimate.memory import (
    GIB, chunk_layers, deepspeed_state_bytes, layer_activation_bytes, megatron_state_bytes,
    microbatches_in_flight, peak_in_flight_bytes, stage_memory, stage_state_bytes,
)
from launch.estimate.params import (
    largest_module_params, model_vocab_size, params_active, params_total, query_size, stage_params,
    word_embedding_params,
)
from launch.estimate.perf import (
    bubble_fraction, collective_seconds, compute_seconds, cp_comm_seconds, rates, step_terms, tp_comm_seconds,
)
from launch.config.slurm_time import parse_time_limit

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


def test_zero3_8b_on_64_gpus_is_18_bytes_per_param_sharded():
    # DeepSpeed's accounting (estimate_zero3_model_states_mem_needs): 2 (bf16 weights)
    # + 4 (fp32 gradient partition) + 12 (fp32 master, Adam m, v) per sharded parameter.
    cfg, d = _deepspeed("parallel.zero_stage=3")
    assert d.dp == 64
    P = params_total(cfg.model)
    assert deepspeed_state_bytes(cfg, P, 64).total == pytest.approx(18 * 8.03e9 / 64, rel=0.001)
    # The estimate adds the largest module, gathered (bf16 weights + grads).
    full = stage_state_bytes(cfg, d, stage_params(cfg, d)[0])
    assert full.total == pytest.approx(18 * P / 64 + 4 * largest_module_params(cfg.model))


@pytest.mark.parametrize("offload", [False, True])
def test_zero2_against_deepspeeds_own_estimator(offload):
    """Within 5% of the installed deepspeed's estimate_zero2_model_states_mem_needs."""
    stage_1_and_2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    extra = ("parallel.offload_optimizer=cpu",) if offload else ()
    cfg, d = _deepspeed("parallel.zero_stage=2", *extra)
    ours = stage_state_bytes(cfg, d, stage_params(cfg, d)[0]).total
    _, ds_gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(
        params_total(cfg.model), num_gpus_per_node=8, num_nodes=8, cpu_offload=offload)
    assert ours == pytest.approx(ds_gpu, rel=0.05)


@pytest.mark.parametrize("offload_optimizer,offload_params", [(False, False), (True, False), (True, True)])
def test_zero3_against_deepspeeds_own_estimator(offload_optimizer, offload_params):
    """Within 5% of the installed deepspeed's estimate_zero3_model_states_mem_needs."""
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    extra = []
    if offload_optimizer:
        extra.append("parallel.offload_optimizer=cpu")
    if offload_params:
        extra.append("parallel.offload_params=cpu")
    cfg, d = _deepspeed("parallel.zero_stage=3", *extra)
    P, L = params_total(cfg.model), largest_module_params(cfg.model)
    assert L == word_embedding_params(cfg.model)  # the embedding is Llama's largest module
    ours = stage_state_bytes(cfg, d, stage_params(cfg, d)[0]).total
    _, ds_gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
        P, L, num_gpus_per_node=8, num_nodes=8, cpu_offload=offload_optimizer, cpu_offload_params=offload_params)
    assert ours == pytest.approx(ds_gpu, rel=0.05)


# ---- memory: activations -------------------------------------------------------------

def _gpt3(*extra: str):
    return composed("model=gpt3_175b", "cluster=h100", "parallel.micro_batch_size=1", *extra)


NO_FLASH = "estimate.flash_attention=false"  # Korthikanti's tables store the s x s scores


def test_korthikanti_activations_without_parallelism():
    # Korthikanti et al. 2022, eq. 1: s*b*h*(34 + 5*a*s/h) bytes per layer.
    cfg, d = _gpt3(NO_FLASH)
    s, b, h, a = 2048, 1, 12288, 96
    got = layer_activation_bytes(cfg, d, keep_scores=True)
    assert got == pytest.approx(s * b * h * (34 + 5 * a * s / h))


@pytest.mark.parametrize("sp", [True, False])
def test_korthikanti_activations_with_tensor_parallelism(sp):
    # Table 2: tensor parallel sbh(10 + 24/t + 5as/(ht)); with sequence parallel sbh(34/t + 5as/(ht)).
    cfg, d = _gpt3("parallel.tp=8", f"parallel.sequence_parallel={str(sp).lower()}", NO_FLASH)
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    base = 34 / t if sp else 10 + 24 / t
    got = layer_activation_bytes(cfg, d, keep_scores=True)
    assert got == pytest.approx(s * b * h * (base + 5 * a * s / (h * t)))


def test_selective_recompute_drops_the_scores():
    cfg, d = _gpt3("parallel.tp=8", NO_FLASH)
    assert layer_activation_bytes(cfg, d, keep_scores=False) == pytest.approx(2048 * 12288 * 34 / 8)


def test_flash_attention_stores_no_scores():
    # Fused attention keeps Q, K, V, O and the fp32 softmax statistics (4a/h per element), never s x s.
    cfg, d = _gpt3("parallel.tp=8")
    s, h, a, t = 2048, 12288, 96, 8
    assert layer_activation_bytes(cfg, d, keep_scores=True) == pytest.approx(s * h * (34 + 4 * a / h) / t)


def test_full_recompute_keeps_layer_inputs():
    none = stage_memory(*composed("recipe=llama3_8b_pretrain_h100", "parallel.recompute=none"))[0]
    full = stage_memory(*composed("recipe=llama3_8b_pretrain_h100", "parallel.recompute=full"))[0]
    assert full.activations < none.activations / 5


def test_interleaved_first_stage_matches_megatron_penalty():
    # theoretical_memory_usage.py: the first stage holds pp * (1 + (pp-1)/(pp*vpp)) micro-batches.
    for pp, vpp in [(4, 2), (8, 2), (16, 2), (4, 5), (16, 8)]:
        assert microbatches_in_flight(0, pp, vpp, 1000) == pytest.approx(pp * (1 + (pp - 1) / (pp * vpp)))
    assert [microbatches_in_flight(i, 4, 1, 1000) for i in range(4)] == [4, 3, 2, 1]
    assert microbatches_in_flight(0, 8, 1, 2) == 2  # fewer micro-batches than stages


@pytest.mark.parametrize("pp,vpp,m", [(4, 2, 4), (4, 2, 8), (8, 4, 8), (16, 8, 16), (16, 8, 32), (4, 3, 12)])
def test_in_flight_is_megatron_warmup_plus_one(pp, vpp, m):
    # schedules.py get_pp_rank_microbatches: rank r runs (pp-r-1)*2 + (vpp-1)*pp warm-up forwards
    # (all m*vpp when that is more), then one forward before each backward: the peak is warm-up + 1 chunks.
    for rank in range(pp):
        warmup = (pp - rank - 1) * 2 + (vpp - 1) * pp
        chunks = min(warmup + 1, m * vpp)
        assert microbatches_in_flight(rank, pp, vpp, m) == pytest.approx(chunks / vpp)


def _brute_force_peak(chunk_bytes, pp, rank, m):
    """Megatron-Core's interleaved schedule played over every micro-batch, no shortcut."""
    vpp = len(chunk_bytes)
    table = [c for start in range(0, m, pp) for c in range(vpp) for _ in range(min(pp, m - start))]
    warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, m * vpp)
    held = peak = 0.0
    for k in range(warmup):
        held += chunk_bytes[table[k]]
        peak = max(peak, held)
    for k in range(m * vpp - warmup):
        held += chunk_bytes[table[warmup + k]]
        peak = max(peak, held)
        held -= chunk_bytes[vpp - 1 - table[k]]
    return peak


@pytest.mark.parametrize("pp,vpp,m", [(4, 2, 40), (8, 4, 64), (16, 8, 64), (4, 5, 24)])
def test_in_flight_shortcut_matches_full_schedule(pp, vpp, m):
    # peak_in_flight_bytes plays three groups of pp micro-batches when m is long; unequal chunks
    # (an embedding-only first chunk) must give the same peak as the whole schedule.
    chunks = [0.1] + [1.0 + v for v in range(1, vpp)]
    for rank in range(pp):
        assert peak_in_flight_bytes(chunks, pp, rank, m) == pytest.approx(_brute_force_peak(chunks, pp, rank, m))


def test_llama3_405b_chunks_as_meta_balanced_them():
    # Llama Team 2024, sec. 3.3.2: one layer fewer on the first and last stages; the first
    # chunk holds only the embedding, the last only the output layer and the loss.
    cfg, d = composed("recipe=llama3_405b_pretrain_h100")
    assert chunk_layers(cfg, d, 0) == [0] + [1] * 7
    assert chunk_layers(cfg, d, 15) == [1] * 7 + [0]
    assert chunk_layers(cfg, d, 7) == [1] * 8
    assert sum(sum(chunk_layers(cfg, d, r)) for r in range(16)) == 126


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_fit_in_h100_memory(recipe):
    mem = plan(f"recipe={recipe}")["memory_gib"]
    assert mem["hbm"] == 79.6
    assert mem["fits"], f"{recipe}: {mem['per_gpu_peak']:.1f} GiB"
    assert mem["per_gpu_peak"] <= 79.6


def test_llama3_405b_needs_recomputation():
    # Meta's layout without activation checkpointing (as the Llama 3 paper ran it on its own
    # pipeline schedule) does not fit Megatron-Core's: pipeline rank 1 holds 128 (m = 16) to
    # 141 (m = 32) layer-micro-batches of ~0.57 GB each, next to 19 GB of model states.
    for extra in [(), ("cluster.nodes=1024",)]:
        mem = plan("recipe=llama3_405b_pretrain_h100", "parallel.recompute=none", *extra)
        assert not mem["memory_gib"]["fits"]
        stages = mem["memory_stages_gib"]
        assert stages.index(max(stages)) not in (0, 15)  # the first chunk is embedding-only


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


def test_more_microbatches_shrink_the_bubble():
    # Llama 3 405B: 16 micro-batches on 16,384 GPUs, 32 on 8,192 (the global batch stays 2,048).
    small = composed("recipe=llama3_405b_pretrain_h100")
    large = composed("recipe=llama3_405b_pretrain_h100", "cluster.nodes=1024")
    assert (small[1].grad_accum_steps, large[1].grad_accum_steps) == (16, 32)
    assert bubble_fraction(*small) == pytest.approx(15 / 128)
    assert bubble_fraction(*large) == pytest.approx(15 / 256)


def test_full_recompute_is_slower():
    sel = plan("recipe=llama3_8b_pretrain_h100")["throughput"]["step_time_s"]
    full = plan("recipe=llama3_8b_pretrain_h100", "parallel.recompute=full")["throughput"]["step_time_s"]
    assert 1.1 < full / sel < 4 / 3  # one more forward of the layers; comms do not grow as much


def test_full_recompute_adds_one_forward():
    # Korthikanti et al. 2022, sec. 5: full recomputation runs each layer's forward twice.
    cfg, d = composed("recipe=llama3_70b_pretrain_h100", "parallel.recompute=none")
    full, _ = composed("recipe=llama3_70b_pretrain_h100", "parallel.recompute=full")
    layers = 20
    assert compute_seconds(full, layers, False) == pytest.approx(compute_seconds(cfg, layers, False) * 4 / 3)


def test_compute_at_the_achievable_fraction():
    # One layer of Llama 3 70B, tp 4 x cp 2, bf16: 3 * 2 * MACs * s*b/cp / tp at 0.55 * 989 TFLOP/s.
    cfg, _ = composed("recipe=llama3_70b_pretrain_h100", "parallel.recompute=none")
    h, f, s, q, k = 8192, 28672, 8192, 8192, 1024
    macs = h * (q + 2 * k) + q * h + q * s / 2 * 2 + 3 * h * f
    expected = 6 * macs * (s / 2) / 4 / (0.55 * 989e12)
    assert compute_seconds(cfg, 1, False) == pytest.approx(expected)
    faster, _ = composed("recipe=llama3_70b_pretrain_h100", "parallel.recompute=none",
                         "estimate.achievable_fraction_dense=0.6")
    assert compute_seconds(faster, 1, False) == pytest.approx(expected * 0.55 / 0.6)


def test_fp8_runs_gemms_at_the_fp8_peak():
    # FP8 GEMMs at 1979 * 0.40 TFLOP/s, attention and logits stay BF16 (989 * 0.55).
    cfg, _ = composed("recipe=llama3_8b_pretrain_h100", "train.precision=fp8")
    r = rates(cfg)
    assert r.linear == pytest.approx(1979e12 * 0.40)
    assert r.attention == r.logits == pytest.approx(989e12 * 0.55)
    bf16 = plan("recipe=llama3_8b_pretrain_h100")["throughput"]
    fp8 = plan("recipe=llama3_8b_pretrain_h100", "train.precision=fp8")["throughput"]
    assert 1.1 < fp8["tokens_per_s_per_gpu"] / bf16["tokens_per_s_per_gpu"] < 1979 * 0.40 / (989 * 0.55)


@pytest.mark.parametrize("basis,peak", [("bf16", 989e12), ("fp8", 1979e12)])
def test_estimate_mfu_replaces_the_model(basis, peak):
    # step = model FLOPs per step / (world * peak * mfu), the peak of estimate.mfu_basis.
    cfg, d = composed("recipe=llama3_70b_pretrain_h100", "estimate.mfu=0.4", f"estimate.mfu_basis={basis}")
    p = plan("recipe=llama3_70b_pretrain_h100", "estimate.mfu=0.4", f"estimate.mfu_basis={basis}")
    t = p["throughput"]
    assert t["step_time_s"] == pytest.approx(p["flops"]["per_step"] / (d.world_size * peak * 0.4))
    assert t["mfu"] == pytest.approx(0.4)


def test_tp_comm_is_korthikanti_volume_over_nvlink():
    # Per layer and pass: 2 all-gathers + 2 reduce-scatters of 2*s*b*h bytes, (tp-1)/tp of it per GPU.
    cfg, _ = composed("recipe=llama3_405b_pretrain_h100", "parallel.recompute=none")
    message = 2 * 8192 * 16384
    assert tp_comm_seconds(cfg, 1) == pytest.approx(2 * 4 * message * 7 / 8 / 450e9)


def test_cp_ring_over_nvlink_inside_a_node_else_infiniband():
    # Ring attention: (cp-1)/cp of the sequence's K and V per layer forward, twice that backward.
    cfg, _ = composed("recipe=llama3_70b_pretrain_h100", "parallel.recompute=none")  # tp 4 x cp 2 = 8
    kv = 2 * 8192 * 1024 / 4 * 2
    assert cp_comm_seconds(cfg, 1) == pytest.approx(3 * kv / 2 / 450e9)
    wide, _ = composed("recipe=llama3_70b_pretrain_h100", "parallel.recompute=none", "parallel.cp=4",
                       "parallel.tp=8", "parallel.pp=2", "parallel.vpp=1")
    kv = 2 * 8192 * 1024 / 8 * 2
    assert cp_comm_seconds(wide, 1) == pytest.approx(3 * kv * 3 / 4 / 50e9)


def test_dp_collective_uses_every_nic_of_a_node():
    # tp 1: eight ranks of a DP group share a node, each carries 1/8 of the buffer across nodes.
    cfg, _ = composed("recipe=llama3_8b_pretrain_h100")
    gb = 8e9
    assert collective_seconds(cfg, gb, 16, 8) == pytest.approx(gb * 7 / 8 / 450e9 + gb / 8 * 1 / 2 / 50e9)
    assert collective_seconds(cfg, gb, 16, 1) == pytest.approx(gb * 15 / 16 / 50e9)


def test_step_terms_add_up():
    cfg, d = composed("recipe=gpt3_175b_pretrain_h100")
    t = step_terms(cfg, d)
    assert t.step_s == pytest.approx(d.grad_accum_steps * t.microbatch_s * (1 + t.bubble) + t.dp_s)
    assert plan("recipe=gpt3_175b_pretrain_h100")["throughput"]["step_time_s"] == pytest.approx(t.step_s)


@pytest.mark.parametrize("recipe", RECIPES)
def test_estimate_is_fast(recipe):
    # Issue 3: well under 100 ms for the 405B plan (the estimate alone, after composition).
    cfg, d = composed(f"recipe={recipe}")
    start = time.perf_counter()
    for _ in range(5):
        estimate(cfg, d)
    assert (time.perf_counter() - start) / 5 < 0.02


# ---- accuracy: published runs on H100 --------------------------------------------------
#
# Each case is a layout someone ran and published, composed as trainctl overrides, and the
# figure they reported. Figures are compared in the publisher's own unit: tokens/s/GPU where
# given; TFLOP/s/GPU converted to tokens/s/GPU with the FLOP count the publisher used.

def palm_flops_per_token(cfg) -> float:
    """6N + 12*L*H*Q*T (Chowdhery et al. 2022, "PaLM", appendix B): the MFU convention the
    Llama 3 paper cites (sec. 3.3.2, "BF16 MFU (Chowdhery et al., 2023)"); full attention."""
    m = cfg.model
    return 6 * params_total(m) + 12 * m.num_layers * query_size(m) * m.seq_length


def megatron_r08_flops_per_token(cfg) -> float:
    """Megatron-LM core_r0.8.0 ``num_floating_point_operations`` / (B*s): counts the full
    s x s attention (12*s/h per layer), as the r0.8 README tables and the MoE README do."""
    m = cfg.model
    L, h, s = m.num_layers, m.hidden_size, m.seq_length
    groups = m.num_query_groups or m.num_attention_heads
    topk = m.moe_router_topk if m.num_experts else 1
    gated = 1.5 if m.activation.name == "swiglu" else 1.0
    return 12 * L * h * h * ((1 + groups / m.num_attention_heads + s / h) * query_size(m) / h
                             + m.ffn_hidden_size / h * topk * gated
                             + model_vocab_size(cfg) / (2 * L * h))


FLOPS_CONVENTION = {"tflops_palm": palm_flops_per_token, "tflops_megatron_r08": megatron_r08_flops_per_token}


@dataclasses.dataclass(frozen=True)
class Published:
    source: str
    overrides: tuple[str, ...]
    figure: float
    unit: str
    """tokens (tokens/s/GPU), tflops_palm or tflops_megatron_r08 (TFLOP/s/GPU in that count)."""
    tolerance: float = 0.15


def _mlm_gpt(layers, hidden, heads, tp, pp, batch, mbs=1):
    """Megatron-LM README weak scaling (H100, core r0.8): GPT, vocab 131,072, seq 4,096, DP 48."""
    return ("model=gpt3_175b", f"model.num_layers={layers}", f"model.hidden_size={hidden}",
            f"model.ffn_hidden_size={4 * hidden}", f"model.num_attention_heads={heads}",
            "model.vocab_size=131072", "model.seq_length=4096", "model.max_position_embeddings=4096",
            "model.untie_embeddings_and_output_weights=true", "cluster=h100",
            f"cluster.nodes={48 * tp * pp // 8}", f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.vpp=1",
            f"parallel.micro_batch_size={mbs}", "parallel.recompute=none", f"train.global_batch_size={batch}",
            "train.steps=1", "train.tokens=null")


LLAMA3_405B_RECIPE = ("recipe=llama3_405b_pretrain_h100",)
META_AS_RUN = ("parallel.recompute=none",)
META_TOLERANCE = 0.25
"""Meta's own stack, not Megatron-Core: the paper reports document-masked attention that
unbalances the pipeline and no TP-communication overlap; a model calibrated on Megatron-Core
runs is expected to be optimistic for it."""
H100_FP8 = ("cluster=h100", "train.precision=fp8", "parallel.recompute=none", "train.steps=1", "train.tokens=null")
MLM_LLAMA = "Megatron-LM examples/llama/README.md, FP8 table (H100)"
NEMO_2407 = "NeMo docs/source/performance/performance_summary.md, NeMo 24.07, FP8, DGX-H100"
DGXC = "NVIDIA/dgxc-benchmarking v25.04.02 (NeMo 25.02.01), BF16, DGX-H100"
"""Its READMEs give the whole job's tokens/s; the figures below divide by the GPUs. NVIDIA's recipes there
run without recompute and reduce gradients in bf16 (NeMo's pretrain_performance_optimizations)."""
H100_BF16 = ("cluster=h100", "train.precision=bf16", "train.grad_reduce_in_fp32=false", "parallel.recompute=none",
             "train.steps=1", "train.tokens=null")

PUBLISHED = {
    # Llama Team 2024, "The Llama 3 Herd of Models", table 4 (TP 8, CP 1, PP 16, seq 8,192, 16M tokens/step).
    "llama3_405b_16k_recipe": Published("Llama 3 paper, table 4", LLAMA3_405B_RECIPE, 400, "tflops_palm"),
    "llama3_405b_8k_recipe": Published("Llama 3 paper, table 4", LLAMA3_405B_RECIPE + ("cluster.nodes=1024",),
                                       430, "tflops_palm"),
    "llama3_405b_16k_as_run": Published("Llama 3 paper, table 4", LLAMA3_405B_RECIPE + META_AS_RUN, 400,
                                        "tflops_palm", META_TOLERANCE),
    "llama3_405b_8k_as_run": Published("Llama 3 paper, table 4", LLAMA3_405B_RECIPE + META_AS_RUN +
                                       ("cluster.nodes=1024",), 430, "tflops_palm", META_TOLERANCE),
    # Megatron-LM README, weak scaling on H100 (images/model_table.png). Batch per DP rank = one
    # micro-batch when pp = 1 (at m = 4 the 32B's DP traffic, 0.47 s at 50 GB/s, could not be hidden).
    "mlm_gpt_16b": Published("Megatron-LM README, weak scaling", _mlm_gpt(32, 6144, 48, 4, 1, 192, mbs=4),
                             489.1, "tflops_megatron_r08"),
    "mlm_gpt_32b": Published("Megatron-LM README, weak scaling", _mlm_gpt(48, 7168, 56, 8, 1, 192, mbs=4),
                             459.6, "tflops_megatron_r08"),
    "mlm_gpt_70b": Published("Megatron-LM README, weak scaling", _mlm_gpt(84, 8192, 64, 8, 2, 384),
                             419.7, "tflops_megatron_r08"),
    "mlm_gpt_119b": Published("Megatron-LM README, weak scaling", _mlm_gpt(92, 10240, 80, 8, 4, 768),
                              420.5, "tflops_megatron_r08"),
    "mlm_gpt_177b": Published("Megatron-LM README, weak scaling", _mlm_gpt(96, 12288, 96, 8, 6, 1152),
                              432.8, "tflops_megatron_r08"),
    "mlm_gpt_314b": Published("Megatron-LM README, weak scaling", _mlm_gpt(96, 16384, 128, 8, 8, 1536),
                              474.4, "tflops_megatron_r08"),
    "mlm_gpt_462b": Published("Megatron-LM README, weak scaling", _mlm_gpt(112, 18432, 144, 8, 16, 3072),
                              459.9, "tflops_megatron_r08"),
    # Megatron-Core MoE README (core r0.8): Mixtral 8x7B BF16, 64 H100, TP 1 EP 8 PP 4 VP 8, GBS 256.
    "mixtral_8x7b_mcore": Published("megatron/core/transformer/moe/README.md (MCore v0.8)",
                                    ("recipe=mixtral_8x7b_pretrain_h100", "cluster.nodes=8", "parallel.vpp=8",
                                     "train.global_batch_size=256", "parallel.recompute=none"),
                                    438, "tflops_megatron_r08"),
    "llama3_8b_fp8": Published(MLM_LLAMA, ("model=llama3_8b", "cluster.nodes=1", "parallel.cp=2",
                                           "train.global_batch_size=128", *H100_FP8), 13812, "tokens"),
    "llama3_70b_fp8": Published(MLM_LLAMA, ("model=llama3_70b", "cluster.nodes=8", "parallel.tp=4",
                                            "parallel.pp=8", "parallel.vpp=5", "train.global_batch_size=128",
                                            *H100_FP8), 1621, "tokens"),
    "llama3_70b_fp8_cp2": Published(NEMO_2407, ("model=llama3_70b", "cluster.nodes=8", "parallel.tp=4",
                                                "parallel.pp=4", "parallel.cp=2", "parallel.vpp=5",
                                                "train.global_batch_size=128", *H100_FP8), 1533, "tokens"),
    "llama31_405b_fp8": Published(MLM_LLAMA, ("recipe=llama3_405b_pretrain_h100", "cluster.nodes=128",
                                              "parallel.pp=8", "parallel.cp=2", "parallel.vpp=8",
                                              "train.global_batch_size=512", *H100_FP8), 315, "tokens"),
    # NeMo 24.07 GPT-3 175B, the MLPerf Training layout (its TFLOP/s link to mlcommons.org).
    "gpt3_175b_fp8_512": Published(NEMO_2407, ("recipe=gpt3_175b_pretrain_h100", "cluster.nodes=64",
                                               "parallel.tp=4", "parallel.vpp=6", "parallel.micro_batch_size=2",
                                               "train.global_batch_size=2048", *H100_FP8), 782, "tokens"),
    "gpt3_175b_fp8_128": Published(NEMO_2407, ("recipe=gpt3_175b_pretrain_h100", "cluster.nodes=16",
                                               "parallel.tp=4", "parallel.vpp=6", "train.global_batch_size=256",
                                               *H100_FP8), 726, "tokens"),
    # NVIDIA's H100 BF16 measurements of its tuned Megatron-Core layouts (llama3.1/README.md,
    # nemo_megatron/README_175b.md of that repository): the layouts `trainctl tune` is checked against.
    "llama31_405b_bf16": Published(DGXC + ", llama3.1", ("recipe=llama3_405b_pretrain_h100", "cluster.nodes=128",
                                                        "parallel.pp=8", "parallel.cp=2", "parallel.vpp=8",
                                                        "train.global_batch_size=512", *H100_BF16), 211406 / 1024,
                                   "tokens"),
    "llama3_70b_bf16": Published(DGXC + ", llama3.1", ("model=llama3_70b", "cluster.nodes=8", "parallel.tp=4",
                                                      "parallel.pp=4", "parallel.cp=2", "parallel.vpp=5",
                                                      "train.global_batch_size=128", *H100_BF16), 71526 / 64,
                                 "tokens"),
    "llama3_8b_bf16": Published(DGXC + ", llama3.1", ("model=llama3_8b", "cluster.nodes=1", "parallel.cp=2",
                                                     "train.global_batch_size=128", *H100_BF16), 85459 / 8, "tokens"),
    "gpt3_175b_bf16": Published("NVIDIA/dgxc-benchmarking v25.01.1 (NeMo 24.09), BF16, DGX-H100, README_175b",
                                ("recipe=gpt3_175b_pretrain_h100", "cluster.nodes=16", "parallel.tp=4",
                                 "parallel.vpp=12", "train.global_batch_size=256", *H100_BF16), 58843 / 128,
                                "tokens"),
}


@pytest.mark.parametrize("name", [n for n in PUBLISHED if n.endswith("_bf16")])
def test_nvidias_bf16_layouts_fit_as_nvidia_ran_them(name):
    """NVIDIA ran these without recompute on 80 GB; with its bf16 gradient reduction the estimate agrees,
    with fp32 gradients (4 + 2 more bytes per parameter) the 405B and 8B layouts would not fit."""
    assert plan(*PUBLISHED[name].overrides)["memory_gib"]["fits"]
    if name in ("llama31_405b_bf16", "llama3_8b_bf16"):
        assert not plan(*PUBLISHED[name].overrides, "train.grad_reduce_in_fp32=true")["memory_gib"]["fits"]


def test_bf16_gradients_change_the_bytes_per_parameter_as_megatron_documents():
    """Megatron-Core's distributed optimizer guide: bf16 params with fp32 grads 6 + 12/d bytes, with 16-bit
    grads 4 + 16/d (the optimizer keeps an fp32 copy of its gradient shard); 18 and 20 without sharding."""
    from launch.estimate.memory import megatron_state_bytes

    for reduce_fp32, sharded, unsharded in ((True, (6, 12), 18), (False, (4, 16), 20)):
        flag = f"train.grad_reduce_in_fp32={str(reduce_fp32).lower()}"
        cfg, _ = composed("recipe=llama3_70b_pretrain_h100", flag)
        states = megatron_state_bytes(cfg, 1.0, 8)
        assert states.weights + states.grads == sharded[0] and states.optimizer == sharded[1] / 8
        cfg, _ = composed("recipe=llama3_70b_pretrain_h100", flag, "parallel.distributed_optimizer=false")
        assert megatron_state_bytes(cfg, 1.0, 8).total == unsharded


def predicted_and_published_tokens(case: Published) -> tuple[float, float]:
    """(our tokens/s/GPU, the publisher's figure as tokens/s/GPU)."""
    cfg, _ = composed(*case.overrides)
    predicted = plan(*case.overrides)["throughput"]["tokens_per_s_per_gpu"]
    if case.unit == "tokens":
        return predicted, case.figure
    return predicted, case.figure * 1e12 / FLOPS_CONVENTION[case.unit](cfg)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_throughput(name):
    case = PUBLISHED[name]
    predicted, published = predicted_and_published_tokens(case)
    error = predicted / published - 1
    assert abs(error) <= case.tolerance, f"{name}: {predicted:.1f} vs {published:.1f} tokens/s/GPU ({error:+.1%})"


@pytest.mark.parametrize("name", [n for n in PUBLISHED if "recipe" in n])
def test_llama3_405b_recipe_fits(name):
    assert plan(*PUBLISHED[name].overrides)["memory_gib"]["fits"]


@pytest.mark.parametrize("layers,hidden,heads,tp,figure", [(24, 2048, 16, 1, 408.8), (30, 4096, 32, 2, 465.9)])
def test_small_models_are_over_predicted(layers, hidden, heads, tp, figure):
    # A known limit: one achievable fraction for every GEMM over-predicts small models, whose
    # GEMMs (h <= 4096) run further below peak and whose attention (s = 4,096 >= h) weighs more;
    # Megatron-LM's README: "larger GEMMs have higher arithmetic intensity". 1.7B: +45%, 7.1B: +18%.
    case = Published("Megatron-LM README, weak scaling", _mlm_gpt(layers, hidden, heads, tp, 1, 192, mbs=4),
                     figure, "tflops_megatron_r08")
    predicted, published = predicted_and_published_tokens(case)
    assert 0.15 < predicted / published - 1 < 0.5


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


# ---- the entry point -----------------------------------------------------------------

def test_estimate_imports_nothing_heavy():
    code = ("import sys, launch.estimate; "
            "heavy = {'torch', 'deepspeed', 'megatron', 'numpy'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_memory_in_gib():
    p = plan("recipe=llama3_8b_pretrain_h100")
    stage = stage_memory(*composed("recipe=llama3_8b_pretrain_h100"))[0]
    assert p["memory_gib"]["per_gpu_peak"] == pytest.approx(stage.peak / GIB)
