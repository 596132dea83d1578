"""Generation in an RL stage (GRPO, RLOO): the rollout engine's memory and time per step.

Every step samples ``train.global_batch_size`` completions (``stage.num_generations`` per
prompt, TRL's ``generation_batch_size``: one generation batch per optimizer step) of at most
``stage.max_completion_length`` tokens after a prompt of at most ``model.seq_length -
max_completion_length`` tokens, so a trained sequence is at most ``model.seq_length`` long.
Where they are generated (``stage.rollout.engine``):

- ``hf``: ``generate()`` of transformers in every training rank, on its share of the
  completions; under ZeRO-3 TRL first gathers the whole policy onto each GPU
  (``GRPOConfig.ds3_gather_for_generation``, default True), so each GPU holds the full bf16
  weights while it generates, and a cache that grows to every token of its sequences;
- ``vllm_colocate``: a vLLM engine inside the training ranks (TRL ``vllm_mode="colocate"``),
  ``stage.rollout.tensor_parallel`` GPUs per engine, reserving
  ``stage.rollout.gpu_memory_utilization`` of each GPU for its weights and KV-cache pool for
  the whole run (TRL's default 0.3);
- ``vllm_server``: vLLM on ``stage.rollout.nodes`` nodes of the allocation (TRL's
  ``trl vllm-serve``, whose ``gpu_memory_utilization`` defaults to 0.9), the rest train.

Both TRL modes are synchronous: the trainer waits for the completions, then trains on them,
so generation adds to the step time. Each decode step reads every weight and the KV cache of
the running sequences from HBM once; at RL batch sizes that is memory-bound (the roofline:
time = max(bytes / bandwidth, FLOPs / peak); Williams, Waterman and Patterson 2009,
"Roofline: an insightful visual performance model", CACM 52(4)). The KV cache per token is
2 (key and value) x layers x kv_heads x head_dim x 2 bytes (Kwon et al. 2023, "Efficient
Memory Management for Large Language Model Serving with PagedAttention", sec. 3: 800 KB per
token for OPT-13B = 2 x 5120 x 40 x 2 B). When the pool holds fewer sequences than an engine
must generate, vLLM runs them in waves. Every completion is assumed to run to
``max_completion_length`` (an upper bound: GSM8K answers stop well before 1,024 tokens).

Not modelled: tensor-parallel all-reduces inside a vLLM engine, CUDA graph capture and
engine start-up, HF ``generate``'s Python overhead (far from the roofline: ``hf`` is for CPU
tests), prefix caching of the shared prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from launch.config.schema import ModelConfig, RolloutEngine
from launch.estimate.params import kv_size

GIB = 2**30
KV_BYTES = 2
"""vLLM and transformers keep the cache in the model's dtype: bf16."""
WEIGHT_BYTES = 2
"""The rollout engine's copy of the policy, bf16."""
SERVER_GPU_MEMORY_UTILIZATION = 0.9
"""``trl vllm-serve --gpu_memory_utilization``'s default (trl/scripts/vllm_serve.py): the share of each
rollout GPU a vLLM server takes on a dedicated node."""


def kv_bytes_per_token(m: ModelConfig) -> float:
    """KV cache of one token: 2 (K and V) x layers x kv_heads x head_dim x 2 B (Kwon et al. 2023, sec. 3).

    Llama 3 8B: 2 x 32 x 8 x 128 x 2 = 131,072 B = 128 KiB per token.
    """
    return 2 * m.num_layers * kv_size(m) * KV_BYTES


def prompt_tokens(seq_length: int, completion_tokens: int) -> int:
    """The prompt's budget: a trained sequence is prompt + completion <= model.seq_length."""
    return max(seq_length - completion_tokens, 0)


def decode_step_seconds(weight_bytes: float, kv_bytes: float, flops: float,
                        hbm_bytes_per_s: float, flops_per_s: float) -> float:
    """One decode step of an engine's running batch on one of its GPUs: the roofline's max of
    (weights + KV cache read once) / HBM bandwidth and the step's FLOPs / sustained FLOP/s
    (Williams et al. 2009). At RL batch sizes the first term wins: decode is memory-bound."""
    return max((weight_bytes + kv_bytes) / hbm_bytes_per_s, flops / flops_per_s)


def waves(sequences: float, capacity: float) -> int:
    """Rounds an engine needs when its KV pool holds ``capacity`` full-length sequences at once
    (vLLM schedules what fits and queues the rest); 0 when not even one fits."""
    if capacity < 1:
        return 0
    return max(1, math.ceil(sequences / math.floor(capacity)))


@dataclass(frozen=True, kw_only=True)
class RolloutEngineSpec:
    """What the rollout estimate needs to know, read from the config by ``launch.estimate.alignment``."""

    engine: RolloutEngine
    completions: int
    """Completions per step, all engines together (train.global_batch_size)."""
    prompt_tokens: int
    completion_tokens: int
    engines: int
    """Engines generating at once: training ranks (hf), world / tensor_parallel (colocate), rollout GPUs /
    tensor_parallel (server)."""
    tensor_parallel: int
    """GPUs per engine (each holds 1/tp of the weights and KV heads)."""
    pool_bytes: float | None
    """Bytes per GPU the engine reserves for weights + KV (vLLM: utilization x HBM); None: grows as needed (hf)."""
    params: float
    """Parameters of the policy (all of them: the engine holds every expert)."""
    active_params: float
    hbm_bytes_per_s: float
    flops_per_s: float
    """Sustained dense FLOP/s of one GPU (peak x estimate.achievable_fraction_dense)."""


@dataclass(frozen=True)
class RolloutEstimate:
    """One step's generation on one engine (every engine does the same share), per GPU."""

    weights_bytes: float
    """The engine's copy of the weights on one of its GPUs: 2 B x params / tensor_parallel."""
    kv_needed_bytes: float
    """KV cache on one GPU for all the engine's sequences at full length at once."""
    kv_pool_bytes: float
    """KV cache the engine holds: vLLM's pool (utilization x HBM - weights), or what hf needs."""
    sequences_per_engine: float
    waves: int
    """Rounds of generation (0: not one sequence fits in the pool)."""
    prefill_s: float
    decode_s: float
    decode_step_s: float
    """One decode step of a full wave, at its mean context length."""

    @property
    def generation_s(self) -> float:
        return self.prefill_s + self.decode_s


def rollout_estimate(spec: RolloutEngineSpec, m: ModelConfig) -> RolloutEstimate:
    """Memory and time of one step's generation on one engine.

    per GPU of an engine, with b = completions / engines, P prompt and C completion tokens:
        weights   = 2 B x N / tp
        KV needed = b x (P + C) x kv_bytes_per_token / tp
        pool      = utilization x HBM - weights (vLLM), or KV needed (hf)
        waves     = ceil(b / floor(pool / per-sequence KV))
        prefill   = 2 x N_active x P x b / tp / FLOP/s      (compute-bound)
        decode    = waves x C x decode_step(weights, KV of b/waves sequences at P + C/2 tokens,
                                            2 x N_active x b/waves / tp FLOPs)
    """
    tp = max(spec.tensor_parallel, 1)
    b = spec.completions / max(spec.engines, 1)
    per_sequence_kv = (spec.prompt_tokens + spec.completion_tokens) * kv_bytes_per_token(m) / tp
    weights = WEIGHT_BYTES * spec.params / tp
    kv_needed = b * per_sequence_kv
    if spec.pool_bytes is None:  # hf: the cache grows to what the engine's sequences need, in one round
        pool, rounds = kv_needed, 1
    else:
        pool = max(spec.pool_bytes - weights, 0.0)
        rounds = waves(b, pool / per_sequence_kv) if per_sequence_kv else 1
    prefill = 2 * spec.active_params * spec.prompt_tokens * b / tp / spec.flops_per_s
    batch = b / max(rounds, 1)
    mean_context = spec.prompt_tokens + spec.completion_tokens / 2
    step = decode_step_seconds(weights, batch * mean_context * kv_bytes_per_token(m) / tp,
                               2 * spec.active_params * batch / tp, spec.hbm_bytes_per_s, spec.flops_per_s)
    decode = max(rounds, 1) * spec.completion_tokens * step
    return RolloutEstimate(weights, kv_needed, pool, b, rounds, prefill, decode, step)


def generation_flops(active_params: float, completions: int, prompt_tokens: int, completion_tokens: int) -> float:
    """Model FLOPs of one step's generation: a forward pass, 2 x N per token (Kaplan et al. 2020,
    sec. 2.1), over every prompt and completion token."""
    return 2 * active_params * completions * (prompt_tokens + completion_tokens)
