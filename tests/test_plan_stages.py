"""`plan` for alignment stages: DPO's reference model and doubled sequences, GRPO's rollout engine.

Every expected number below is worked out by hand from the model's shape and the H100 profile
(conf/cluster/h100.yaml: 989 TFLOP/s bf16, 3.35 TB/s HBM, 79.6 GiB, NVLink 450 GB/s, IB 50 GB/s)
with the estimator's stated assumptions (achievable_fraction_dense 0.55, achievable_fraction_hbm
0.7), not copied from the code's output. Llama 3 8B: L = 32 layers, h = 4096, f = 14336,
32 query heads and 8 KV heads of 128, V = 128,256; N = 8,030,261,248 parameters; the largest
module is the embedding, 128,256 x 4096 = 525,336,576 parameters.
"""

from __future__ import annotations

import json

import pytest

from launch.estimate import estimate
from tests.conftest import run_trainctl, typed

GIB = 2**30
N = 8_030_261_248
EMBEDDING = 128_256 * 4096
DENSE_RATE = 989e12 * 0.55
"""Sustained bf16 FLOP/s of one H100 in the step-time model."""
HBM_RATE = 3.35e12 * 0.7
"""Sustained HBM bytes/s of one H100 in a decode step."""


def plan(*overrides: str) -> dict:
    return estimate(*typed(*overrides))


@pytest.fixture(scope="module")
def dpo() -> dict:
    return plan("recipe=llama3_8b_dpo_h100")


@pytest.fixture(scope="module")
def grpo() -> dict:
    return plan("recipe=llama3_8b_grpo_h100")


def test_dpo_reference_model_memory(dpo):
    """DPO 8B on 2 x 8 H100, ZeRO-3 (dp 16), 64 pairs of 4096 tokens, micro-batch 1 pair.

    Reference weights, sharded as the policy (TRL's prepare_deepspeed gives it the ZeRO-3 config):
        2 B x N / 16 + 2 B x 525,336,576 (the embedding, gathered whole)
        = 1,003,782,656 + 1,050,673,152 B                                   = 1.9133 GiB
    Its forward runs while the policy's activations are held, on the micro-batch of 2 sequences
    (chosen + rejected) = 8192 tokens: the fp32 logits 4 x 8192 x (4096 + 128,256) = 4.0391 GiB and one
    layer's working set (Korthikanti's terms, flash attention, SwiGLU, GQA):
        (10 + 4 x (4096 + 1024)/4096 + 4 x 32/4096 + 6 x 14336/4096) x 8192 x 4096 B
        = 36.03125 x 33,554,432 B                                           = 1.1260 GiB
    Reference in all                                                        = 7.0784 GiB
    """
    assert dpo["stage"]["kind"] == "dpo"
    assert dpo["stage"]["memory_gib"]["reference"] == pytest.approx(1.9133 + 4.0391 + 1.1260, abs=2e-3)
    assert dpo["stage"]["sequences_per_step"] == 128  # 64 pairs, chosen and rejected


def test_dpo_doubles_the_sequences_and_adds_the_reference_forward(dpo):
    """FLOPs per token of training (Megatron's formula, s = 4096):
        6 x [32 x (4096 x 6144 + 4096^2 + 4096 x 4096 + 3 x 4096 x 14336) + 4096 x 128,256]
        = 6 x 8,041,529,344 = 48,249,176,064
    Tokens trained a step: 64 pairs x 2 x 4096 = 524,288; the reference forward adds 1/3:
        per step = 48,249,176,064 x 524,288 x 4/3 = 3.3729e16 FLOPs.
    Reference forward time: 4 micro-batches (64 / 16 dp) of 8192 tokens, each 1/3 of training:
        4 x 48,249,176,064 / 3 x 8192 / (989e12 x 0.55) = 4 x 0.24222 s = 0.9689 s
    (its ZeRO-3 all-gather, 16.06 GB x 7/8 / 450 GB/s + 16.06 GB / 8 x 1/2 / 50 GB/s = 0.051 s, hides
    under it). Policy activations double with the doubled micro-batch.
    """
    assert dpo["flops"]["per_step"] == pytest.approx(48_249_176_064 * 524_288 * 4 / 3, rel=1e-9)
    assert dpo["stage"]["time_s"]["reference"] == pytest.approx(4 * 48_249_176_064 / 3 * 8192 / DENSE_RATE, rel=1e-6)
    single = plan("recipe=llama3_8b_sft_h100", "model.seq_length=4096", "train.global_batch_size=64", "cluster.nodes=2")
    assert dpo["memory_gib"]["activations"] == pytest.approx(2 * single["memory_gib"]["activations"], rel=0.05)
    step = dpo["throughput"]["step_time_s"]
    assert step == pytest.approx(sum(dpo["stage"]["time_s"].values()))
    assert dpo["scaling"]["predicted_loss"] is None  # a pretraining law says nothing about a DPO loss


def test_grpo_rollout_memory_and_decode_time(grpo):
    """GRPO 8B on 4 x 8 H100 (dp 32), 512 completions (16 prompts x 32) of <= 1024 tokens after a
    prompt of <= 1536 - 1024 = 512 tokens; vLLM colocated, tp 1, 0.3 of each GPU.

    KV cache per token: 2 x 32 layers x 8 heads x 128 x 2 B = 131,072 B (vLLM paper, sec. 3).
    Per GPU: 512 / 32 = 16 sequences; at full length 16 x 1536 x 131,072 B = 3.0 GiB.
    vLLM's share: 0.3 x 79.6 = 23.88 GiB; its bf16 weights 2 x N = 14.9575 GiB; KV pool 8.9225 GiB
    (47 full-length sequences): one wave.
    Decode step (memory-bound): weights + KV of 16 sequences at the mean context 512 + 512 tokens,
        (16,060,522,496 + 16 x 1024 x 131,072) B / (3.35e12 x 0.7) B/s = 7.7646 ms
    (compute 2 x N x 16 / 544 TFLOP/s = 0.47 ms is less). 1024 steps: 7.951 s. Prefill (compute-bound):
        2 x N x 512 x 16 / (989e12 x 0.55) = 0.2419 s.  Generation = 8.193 s.
    """
    s = grpo["stage"]
    r = s["rollout"]
    assert r["engine"] == "vllm_colocate" and r["waves"] == 1 and r["sequences_per_engine"] == 16
    assert r["kv_cache_needed_gib"] == pytest.approx(3.0)
    assert s["memory_gib"]["rollout_weights"] == pytest.approx(2 * N / GIB)
    assert s["memory_gib"]["kv_cache"] == pytest.approx(0.3 * 79.6 - 2 * N / GIB)
    step_ms = (2 * N + 16 * 1024 * 131_072) / HBM_RATE * 1e3
    assert r["decode_step_ms"] == pytest.approx(step_ms, rel=1e-9)
    prefill = 2 * N * 512 * 16 / DENSE_RATE
    assert s["time_s"]["generation"] == pytest.approx(1024 * step_ms / 1e3 + prefill, rel=1e-9)
    assert s["time_s"]["generation"] == pytest.approx(8.193, abs=2e-3)


def test_grpo_memory_and_step_add_up(grpo):
    """The colocated engine's 23.88 GiB sits beside the policy (ZeRO-3 over 32) and the reference model
    (kl_coef 0.01: 2 B x N / 32 + 2 B x 525,336,576 = 1.4351 GiB of weights); the step is generation,
    weight sync, the reference forward and the training step one after another, and the plan says
    which share is spent generating."""
    s, mem = grpo["stage"], grpo["memory_gib"]
    assert s["memory_gib"]["reference"] > (2 * N / 32 + 2 * EMBEDDING) / GIB
    assert mem["per_gpu_peak"] > 0.3 * 79.6 + s["memory_gib"]["policy"] + (2 * N / 32 + 2 * EMBEDDING) / GIB
    assert mem["fits"] and mem["per_gpu_peak"] <= 79.6
    step = grpo["throughput"]["step_time_s"]
    assert step == pytest.approx(sum(s["time_s"].values()))
    assert set(s["time_s"]) == {"generation", "weight_sync", "reference", "train"}
    assert s["generation_share"] == pytest.approx((s["time_s"]["generation"] + s["time_s"]["weight_sync"]) / step)
    assert 0.4 < s["generation_share"] < 0.9  # decode-bound: most of an RL step is generation
    assert grpo["scaling"]["predicted_loss"] is None


def test_grpo_vllm_server_adds_its_node_and_its_cost():
    """stage.rollout.engine=vllm_server, 1 node: added to the 4 that train (launch/config/rollout.py).
    32 GPUs train, 8 generate with TRL's vllm-serve share 0.9 x 79.6 = 71.64 GiB each, 512 / 8 = 64
    completions per engine; the training GPUs hold no rollout weights or cache, and the run pays for
    40 GPUs. A reward model (stage.reward_model) adds its weights, sharded as the reference, and a
    forward pass."""
    n = plan("recipe=llama3_8b_grpo_h100", "stage.rollout.engine=vllm_server", "stage.rollout.nodes=1")
    s = n["stage"]
    assert (s["train_gpus"], s["rollout_gpus"]) == (32, 8)
    assert s["memory_gib"]["rollout_weights"] == 0 and s["memory_gib"]["kv_cache"] == 0
    assert s["rollout"]["gpu_peak_gib"] == pytest.approx(0.9 * 79.6)
    assert s["rollout"]["sequences_per_engine"] == 64
    run = n["run"]
    assert run["gpu_hours"] == pytest.approx(run["wall_clock_days"] * 24 * 40)
    with_rm = plan("recipe=llama3_8b_grpo_h100", "stage.reward_model=/models/rm")["stage"]
    assert with_rm["memory_gib"]["reward_model"] > 0 and with_rm["time_s"]["reward_model"] > 0


def test_plan_prints_the_stage_and_refuses_one_that_does_not_fit(tmp_path):
    """The CLI shows the reference model's and the rollout's memory and time; an RL stage whose HF
    generation cache cannot fit (1024 completions x 8192 tokens on 16 GPUs: 64 x 8192 x 128 KiB =
    64 GiB of cache per GPU next to 15 GiB of gathered weights) is refused with exit 2, the key, the
    value, and single changes that fit."""
    out = run_trainctl("plan", "recipe=llama3_8b_dpo_h100", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "reference model" in out.stdout and "reference forward" in out.stdout
    assert "predicted loss" not in out.stdout.replace("no predicted loss", "")
    out = run_trainctl("plan", "recipe=llama3_8b_grpo_h100", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "rollout weights" in out.stdout and "KV cache" in out.stdout and "generating" in out.stdout
    written = json.loads((tmp_path / "runs" / "llama3_8b_grpo_h100" / "plan.json").read_text())
    assert written["stage"]["rollout"]["engine"] == "vllm_colocate"

    out = run_trainctl("plan", "recipe=llama3_8b_grpo_h100", "stage.rollout.engine=hf", "cluster.nodes=2",
                       "model.seq_length=8192", "stage.max_completion_length=4096", "train.global_batch_size=1024",
                       cwd=tmp_path)
    assert out.returncode == 2, out.stdout
    assert "Traceback" not in out.stderr
    assert "memory_gib.per_gpu_peak=" in out.stderr and "kv cache 64.0" in out.stderr
    assert "stage.rollout.engine=vllm_server stage.rollout.nodes=1" in out.stderr
    assert "stage.num_generations=16 train.global_batch_size=512" in out.stderr


def test_reference_model_is_sharded_as_the_policy():
    """The frozen reference holds 2 B per parameter of what the policy's GPU holds.

    ZeRO-3 over dp 16 (above): 2 x N / 16 + 2 x the embedding = 1.9133 GiB. ZeRO-2: TRL runs the
    reference with ZeRO disabled, whole on every GPU: 2 x N = 14.9575 GiB. Megatron-Core tp 2 x pp 2:
    a stage holds 16 layers of (41,943,040 attention + 176,160,768 MLP) / 2 + 8,192 norm parameters
    = 16 x 109,060,096 = 1,744,961,536, plus half the 128,256 x 4096 embedding (262,668,288) on the
    first stage: 2,007,629,824 parameters, 2 B each = 3.7395 GiB.
    """
    from launch.estimate.alignment import frozen_weights_bytes
    from launch.estimate.params import stage_params

    cfg, d = typed("recipe=llama3_8b_dpo_h100", "parallel.zero_stage=2")
    assert frozen_weights_bytes(cfg, d, stage_params(cfg, d)[0]) / GIB == pytest.approx(2 * N / GIB)
    cfg, d = typed("recipe=llama3_8b_dpo_h100", "backend=megatron", "parallel.tp=2", "parallel.pp=2")
    first = frozen_weights_bytes(cfg, d, stage_params(cfg, d)[0])
    assert first == pytest.approx(2 * (16 * ((218_112_000 - 8192) / 2 + 8192) + 128_256 * 4096 / 2))
    assert first / GIB == pytest.approx(3.7395, abs=1e-4)
