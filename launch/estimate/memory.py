"""Memory per GPU on every pipeline stage: model states, activations, overheads.

Model states (weights, gradients, optimizer) follow the backend's bookkeeping:

- Megatron (mixed precision): bf16 weights 2 B, fp32 gradient buffer 4 B
  (``main_grad``; Megatron-LM accumulates and reduces gradients in fp32 under
  bf16), fp32 master weights + Adam m + v 12 B: 18 B per parameter, or
  ``6 + 12/dp`` with the distributed optimizer, which shards the 12 B over the
  data-parallel ranks (megatron/training/theoretical_memory_usage.py,
  ``compute_weight_and_optimizer_memory``). With ``train.grad_reduce_in_fp32=false``
  the gradient buffer is bf16 (2 B) and the optimizer keeps an fp32 copy of its
  gradients (4 B more): 20 B, or ``4 + 16/dp`` (Megatron-Core's
  docs/source/api-guide/dist_optimizer.md, the table of bytes per parameter).
- DeepSpeed (mixed precision): 2 + 2 + 12 = 16 B per parameter; ZeRO stage 1
  shards the optimizer over dp, stage 2 also the gradients, stage 3 also the
  weights (Rajbhandari et al. 2020, "ZeRO", sec. 5 and fig. 1:
  ``(2+2+K)Ψ``, ``4Ψ + KΨ/N``, ``2Ψ + (2+K)Ψ/N``, ``(4+K)Ψ/N`` with K = 12).
  ZeRO-3 also holds the largest module gathered (bf16 weights and gradients,
  ``4 * largest_layer_params`` in DeepSpeed's ``estimate_zero3_model_states_mem_needs``).
  ``offload_optimizer`` moves the optimizer state and the gradient partitions
  to the host (the estimator's ``cpu_offload``); ``offload_params`` (ZeRO-3)
  moves the weights.
- fp32 training (CPU runs): 4 B weights (they are the master copy), 4 B
  gradients, 8 B Adam m + v.

Activations per layer and micro-batch follow Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models", sec. 4, table 2):
``s*b*h*(34 + 5*a*s/h)`` bytes for a GPT layer without parallelism, written out
term by term below so that GQA, SwiGLU, FFN width and MoE change the right terms.
How many micro-batches a pipeline rank holds at once follows Megatron-Core's
schedules step by step (``peak_in_flight_bytes``).

Overheads come from ``cfg.estimate``: the CUDA context (``cuda_context_gib``),
NCCL buffers (``nccl_buffers_gib``), the caching allocator's fragmentation
(``allocator_fragmentation``) and whether attention is fused (``flash_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate

from launch.config.derive import Derived
from launch.estimate.calibration import UNCALIBRATED, Calibration
from launch.config.schema import Activation, BackendName, Config, Offload, Precision, Recompute
from launch.estimate.params import (
    StageParams, is_moe, kv_size, largest_module_params, model_vocab_size, query_size, stage_params,
)

GIB = 2**30

FP32_GRAD_PARTITION_BYTES = 4
"""DeepSpeed's fp32 copy of the gradient partition under mixed precision (see deepspeed_state_bytes)."""

ACTIVATION_BYTES_BF16 = 2
"""Korthikanti's coefficients assume 16-bit activations (and 1-byte dropout masks)."""


# ---- model states -------------------------------------------------------------------

@dataclass(frozen=True)
class StateBytes:
    """Bytes of weights, gradients and optimizer state (per parameter, or per GPU)."""

    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer

    def __add__(self, other: "StateBytes") -> "StateBytes":
        return StateBytes(self.weights + other.weights, self.grads + other.grads,
                          self.optimizer + other.optimizer)

    def scaled(self, n: float) -> "StateBytes":
        return StateBytes(self.weights * n, self.grads * n, self.optimizer * n)


def bytes_per_param(cfg: Config) -> StateBytes:
    """Unsharded bytes per parameter for the backend and precision (module docstring)."""
    if cfg.train.precision == Precision.fp32:
        return StateBytes(weights=4, grads=4, optimizer=8)
    if cfg.backend.name == BackendName.megatron:
        if cfg.train.grad_reduce_in_fp32:
            return StateBytes(weights=2, grads=4, optimizer=12)
        return StateBytes(weights=2, grads=2, optimizer=16)
    return StateBytes(weights=2, grads=2, optimizer=12)


def _on_gpu(where: Offload) -> bool:
    return where == Offload.none


def megatron_state_bytes(cfg: Config, params: float, dp: int) -> StateBytes:
    """Megatron: 2 + 4 + 12 B (2 + 2 + 16 with bf16 gradients), the optimizer's part divided by dp with
    the distributed optimizer."""
    b = bytes_per_param(cfg)
    shard = dp if cfg.parallel.distributed_optimizer else 1
    return StateBytes(b.weights, b.grads, b.optimizer / shard).scaled(params)


def deepspeed_state_bytes(cfg: Config, params: float, dp: int, largest_module: float = 0) -> StateBytes:
    """DeepSpeed ZeRO stage 0-3 with optional CPU offload, as DeepSpeed itself counts it.

    Under mixed precision DeepSpeed keeps an fp32 partition of the gradients for
    the optimizer step besides the 16-bit ones: 2 (16-bit grads) + 4 (fp32
    grads) + 4 (fp32 params) + 8 (Adam) = 18 B per sharded parameter under ZeRO-2
    (the comment in ``estimate_zero2_model_states_mem_needs``,
    deepspeed/runtime/zero/stage_1_and_2.py); under ZeRO-3 the 16-bit gradients
    reduce straight into the fp32 partition and the 16-bit weights are sharded
    too: 2 + 4 + 12 = 18 B (``estimate_zero3_model_states_mem_needs``). Offloading
    the optimizer moves the fp32 gradients and the optimizer state to the host.
    ``largest_module``: parameters of the largest module, gathered whole under ZeRO-3.
    """
    p, b = cfg.parallel, bytes_per_param(cfg)
    stage = p.zero_stage
    fp32_grads = FP32_GRAD_PARTITION_BYTES if cfg.train.precision != Precision.fp32 else 0
    weights = b.weights * params / (dp if stage >= 3 else 1)
    if stage >= 3:
        grads = (fp32_grads or b.grads) * params / dp
    else:
        grads = b.grads * params / (dp if stage >= 2 else 1) + fp32_grads * params / (dp if stage >= 1 else 1)
    optimizer = b.optimizer * params / (dp if stage >= 1 else 1)
    if not _on_gpu(p.offload_optimizer):
        optimizer = 0.0
        grads = 0.0 if stage >= 2 else b.grads * params
    if stage >= 3 and not _on_gpu(p.offload_params):
        weights = 0.0
    if stage >= 3:  # the gathered module: its weights and their gradients
        weights += b.weights * largest_module
        grads += b.grads * largest_module
    return StateBytes(weights, grads, optimizer)


def stage_state_bytes(cfg: Config, d: Derived, stage: StageParams) -> StateBytes:
    """Model states on one GPU of a stage: dense parameters sharded over dp*cp, experts over expert_dp."""
    if cfg.backend.name == BackendName.deepspeed:
        return deepspeed_state_bytes(cfg, stage.total, d.dp, largest_module_params(cfg.model))
    dense = megatron_state_bytes(cfg, stage.dense, d.dense_dp)
    return dense + megatron_state_bytes(cfg, stage.expert, d.expert_dp)


# ---- activations ---------------------------------------------------------------------

@dataclass(frozen=True)
class LayerActivations:
    """Bytes per (local token x hidden) element of one layer for one micro-batch,
    grouped by what divides them (Korthikanti et al. 2022, sec. 4.1 and 4.2).

    sequence: replicated over tp, divided by tp only under sequence parallelism:
        two norm inputs 2*2, QKV input 2, the MLP input 2, two dropout masks 1+1 (= 10).
    tensor: divided by tp: Q 2q/h, K 2k/h, V 2k/h, output-projection input 2q/h
        (= 8 for MHA), the softmax statistics of flash attention (fp32, 4a/h), and the
        dense MLP: GELU input 2f/h + second linear input 2f/h (= 16 for f = 4h);
        SwiGLU keeps its gate and up outputs 4f/h + the second linear input 2f/h.
    expert: divided by etp: per routed copy of a token (topk) its permuted input 2 and
        the expert MLP terms as above; the router's fp32 logits 4E/h.
    scores: divided by tp: softmax output 2as/h, its dropout mask as/h and the dropout
        output 2as/h (= 5as/h); 0 when the attention core is fused (estimate.flash_attention:
        FlashAttention / cuDNN fused attention, the default of Megatron-Core with
        TransformerEngine and of Hugging Face's sdpa on H100, never stores the s x s scores).
    For a GPT layer (MHA, GELU, f = 4h, no flash): 10 + 24 + 5as/h = 34 + 5as/h.
    """

    sequence: float
    tensor: float
    expert: float
    scores: float


def _mlp_internal_coefficient(cfg: Config) -> float:
    """MLP activations inside the tensor-parallel region, per (s*b*h): 4f/h GELU, 6f/h SwiGLU."""
    m = cfg.model
    ratio = m.ffn_hidden_size / m.hidden_size
    return (6 if m.activation == Activation.swiglu else 4) * ratio


def layer_activations(cfg: Config) -> LayerActivations:
    """Korthikanti's per-layer coefficients for this model (see LayerActivations)."""
    flash_attention = cfg.estimate.flash_attention
    m = cfg.model
    h, a, s = m.hidden_size, m.num_attention_heads, m.seq_length
    attention = 4 * (query_size(m) + kv_size(m)) / h
    if flash_attention:
        attention += 4 * a / h
    mlp = _mlp_internal_coefficient(cfg)
    expert = 0.0
    if is_moe(m):
        expert = m.moe_router_topk * (2 + mlp) + 4 * m.num_experts / h
        mlp = 0.0
    scores = 0.0 if flash_attention else 5 * a * s / h
    return LayerActivations(sequence=10, tensor=attention + mlp, expert=expert, scores=scores)


def local_tokens(cfg: Config) -> float:
    """Tokens of one micro-batch on one GPU, s*b/cp: context parallelism splits the
    sequence; tensor parallelism splits the work on each token, not the tokens."""
    m, p = cfg.model, cfg.parallel
    return m.seq_length / max(p.cp, 1) * p.micro_batch_size


def _tokens_hidden(cfg: Config) -> float:
    """s*b*h of one micro-batch on one GPU."""
    return local_tokens(cfg) * cfg.model.hidden_size


def _precision_scale(cfg: Config) -> float:
    """Activations in fp32 take twice Korthikanti's 16-bit bytes."""
    return 2.0 if cfg.train.precision == Precision.fp32 else 1.0


def _sequence_divisor(cfg: Config, d: Derived) -> int:
    return max(cfg.parallel.tp, 1) if d.sequence_parallel else 1


def layer_activation_bytes(cfg: Config, d: Derived, keep_scores: bool) -> float:
    """All activations of one layer for one micro-batch on one GPU (no recomputation).

    ``keep_scores``: store the attention scores (recompute=none without flash attention).
    """
    c = layer_activations(cfg)
    tp = max(cfg.parallel.tp, 1)
    per_element = (c.sequence / _sequence_divisor(cfg, d) + c.tensor / tp
                   + c.expert / max(d.etp, 1) + (c.scores / tp if keep_scores else 0.0))
    return _tokens_hidden(cfg) * per_element * _precision_scale(cfg)


def layer_input_bytes(cfg: Config, d: Derived) -> float:
    """Full recomputation keeps only each layer's input: 2*s*b*h (divided by tp under SP)."""
    return (_tokens_hidden(cfg) * ACTIVATION_BYTES_BF16 / _sequence_divisor(cfg, d)
            * _precision_scale(cfg))


def stored_bytes_per_layer(cfg: Config, d: Derived) -> float:
    """What one layer keeps per micro-batch in flight, by recompute mode.

    none: everything (scores too unless flash attention); selective: everything
    but the attention scores (Korthikanti sec. 5, "selective activation
    recomputation"); full: the layer input only.
    """
    mode = cfg.parallel.recompute
    if mode == Recompute.full:
        return layer_input_bytes(cfg, d)
    return layer_activation_bytes(cfg, d, keep_scores=mode == Recompute.none)


# ---- the pipeline schedule ----------------------------------------------------------

def chunk_layers(cfg: Config, d: Derived, rank: int) -> list[int]:
    """Transformer layers in each model chunk (virtual stage) of pipeline rank ``rank``.

    As Megatron-Core builds them: the rank's layers split evenly over vpp chunks;
    with ``account_for_embedding/loss_in_pipeline_split`` the embedding and the
    loss each take one layer's slot, in the first chunk of the first rank and the
    last chunk of the last rank (Llama 3 405B, 126 + 2 = 128 slots on pp 16 x vpp 8:
    the first chunk holds only the embedding, the last only the output layer and
    the loss; Llama Team 2024, sec. 3.3.2).
    """
    p = cfg.parallel
    vpp, pp, layers = max(p.vpp, 1), len(d.stage_layers), d.stage_layers[rank]
    embedding = int(p.account_for_embedding_in_pipeline_split and rank == 0 and pp > 1)
    loss = int(p.account_for_loss_in_pipeline_split and rank == pp - 1 and pp > 1)
    base, extra = divmod(layers + embedding + loss, vpp)
    chunks = [base + (1 if v < extra else 0) for v in range(vpp)]
    chunks[0] -= embedding
    chunks[-1] -= loss
    return [max(c, 0) for c in chunks]


def _schedule_chunks(microbatches: int, vpp: int, group: int) -> list[int]:
    """The model chunk of each forward, in order: Megatron-Core's ``get_schedule_table``
    (groups of ``group`` micro-batches run chunk 0, then chunk 1, ... for the group)."""
    order = []
    for start in range(0, microbatches, group):
        size = group if start + group < microbatches else microbatches - start
        order.extend(chunk for chunk in range(vpp) for _ in range(size))
    return order


def warmup_forwards(pp: int, rank: int, vpp: int, microbatches: int) -> int:
    """Forwards a rank runs before its first backward (``get_pp_rank_microbatches``).

    1F1B: pp - rank - 1. Interleaved: (pp - rank - 1) * 2 + (vpp - 1) * group, with
    group = ``microbatch_group_size_per_vp_stage`` = pp (its default). At most all of them.
    """
    total = microbatches * vpp
    if vpp <= 1:
        return min(pp - rank - 1, total)
    return min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)


def peak_in_flight_bytes(chunk_bytes: list[float], pp: int, rank: int, microbatches: int) -> float:
    """The most activation bytes rank ``rank`` holds at once during a step, given what
    one micro-batch leaves in each of its model chunks until its backward.

    Megatron-Core's schedules (megatron/core/pipeline_parallel/schedules.py): the
    warm-up forwards (``warmup_forwards``), then one forward and one backward at a
    time, forwards in ``get_schedule_table`` order and backwards in the same order
    with the chunks reversed (``get_model_chunk_id(..., forward=False)``), then the
    cool-down backwards. Played step by step, so chunks of unequal size (the
    embedding-only first chunk) count exactly. 1F1B with equal chunks gives
    min(pp - rank, m) micro-batches (Narayanan et al. 2021, sec. 2.2.1); interleaved,
    the first rank holds pp * (1 + (pp-1)/(pp*vpp)) stages' worth, Megatron's
    "interleaving penalty" (theoretical_memory_usage.py).
    """
    vpp = len(chunk_bytes)
    if pp <= 1:
        return sum(chunk_bytes)  # one micro-batch at a time, forward then backward
    if len(set(chunk_bytes)) == 1:  # equal chunks (every middle rank): the same play in units of one chunk
        return chunk_bytes[0] * _equal_chunks_in_flight(pp, rank, vpp, microbatches)
    return _play_schedule(chunk_bytes, pp, rank, microbatches)


@lru_cache(maxsize=4096)
def _equal_chunks_in_flight(pp: int, rank: int, vpp: int, microbatches: int) -> float:
    """``peak_in_flight_bytes`` for vpp chunks of one byte each (cached: ``trainctl tune`` asks often)."""
    return _play_schedule([1.0] * vpp, pp, rank, microbatches)


def _play_schedule(chunk_bytes: list[float], pp: int, rank: int, microbatches: int) -> float:
    """The step-by-step play of ``peak_in_flight_bytes``."""
    vpp = len(chunk_bytes)
    m = microbatches
    if vpp > 1 and m % pp == 0 and m > 3 * pp:
        m = 3 * pp  # the steady state repeats every pp * vpp steps: three groups reach its peak
    order = _schedule_chunks(m, vpp, pp)
    warmup = warmup_forwards(pp, rank, vpp, m)
    stored = list(accumulate((chunk_bytes[c] for c in order), initial=0.0))  # after k forwards
    freed = list(accumulate((chunk_bytes[vpp - 1 - c] for c in order), initial=0.0))  # after k backwards
    # Warm-up: forwards only. Then step k runs forward warmup+k before backward k.
    during_warmup = stored[warmup]
    steady = max((stored[warmup + k + 1] - freed[k] for k in range(len(order) - warmup)), default=0.0)
    return max(during_warmup, steady)


def microbatches_in_flight(stage: int, pp: int, vpp: int, microbatches: int) -> float:
    """Micro-batches a rank holds at its peak, in units of its whole stage (equal chunks)."""
    return peak_in_flight_bytes([1.0] * max(vpp, 1), pp, stage, microbatches) / max(vpp, 1)


def embedding_activation_bytes(cfg: Config, d: Derived) -> float:
    """First stage, per micro-batch in flight: int64 token ids 8*s*b and the embedding
    dropout mask s*b*h (theoretical_memory_usage.py, ``compute_activation_memory``)."""
    tokens = _tokens_hidden(cfg) / cfg.model.hidden_size
    return 8 * tokens + _tokens_hidden(cfg) / _sequence_divisor(cfg, d)


def logits_activation_bytes(cfg: Config) -> float:
    """Last stage, one micro-batch: the output layer's input and the fp32 logits for
    the loss, 4*s*b*(h + V) / tp (theoretical_memory_usage.py). The loss runs in
    the last chunk's forward and its backward follows at once, so one micro-batch."""
    tokens = _tokens_hidden(cfg) / cfg.model.hidden_size
    h, vocab = cfg.model.hidden_size, model_vocab_size(cfg)
    return 4 * tokens * (h + vocab) / max(cfg.parallel.tp, 1) * _precision_scale(cfg)


def stage_activation_bytes(cfg: Config, d: Derived, stage: int) -> float:
    """Activations on one GPU of pipeline stage ``stage`` at its peak.

    The in-flight peak of what each chunk keeps (layers x stored bytes per layer,
    plus the embedding's on the first chunk of the first stage); plus, under full
    recomputation, one layer's whole working set (the layer being recomputed); plus
    the logits on the last stage.
    """
    p = cfg.parallel
    pp = len(d.stage_layers)
    per_layer = stored_bytes_per_layer(cfg, d)
    chunk_bytes = [layers * per_layer for layers in chunk_layers(cfg, d, stage)]
    if stage == 0:
        chunk_bytes[0] += embedding_activation_bytes(cfg, d)
    total = peak_in_flight_bytes(chunk_bytes, pp, stage, d.grad_accum_steps)
    if p.recompute == Recompute.full:
        total += layer_activation_bytes(cfg, d, keep_scores=not cfg.estimate.flash_attention)
    if stage == pp - 1:
        total += logits_activation_bytes(cfg)
    return total


# ---- per stage -----------------------------------------------------------------------

@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of a pipeline stage."""

    states: StateBytes
    activations: float
    fragmentation: float
    """Allocator overhead as a share of the tensors (estimate.allocator_fragmentation)."""
    fixed: float
    """CUDA context and NCCL buffers, bytes (estimate.cuda_context_gib + nccl_buffers_gib)."""
    measured: float = 1.0
    """Measured/predicted tensor bytes from cluster.calibration (launch/estimate/calibration.py)."""

    @property
    def peak(self) -> float:
        """Tensors (as calibrated) plus allocator fragmentation, plus the CUDA context and NCCL buffers."""
        return (self.states.total + self.activations) * self.measured * (1 + self.fragmentation) + self.fixed

    def breakdown_gib(self) -> dict[str, float]:
        """GiB by kind (the parts of plan.png's bars); ``overhead`` is fragmentation plus the fixed buffers."""
        tensors = self.states.total + self.activations
        parts = {"weights": self.states.weights, "grads": self.states.grads, "optimizer": self.states.optimizer,
                 "activations": self.activations, "overhead": self.peak - tensors}
        return {name: value / GIB for name, value in parts.items()}


def stage_memory(cfg: Config, d: Derived, calibration: Calibration = UNCALIBRATED) -> list[StageMemory]:
    """Memory per GPU on each pipeline stage, first to last; tensors scaled by ``calibration``."""
    e = cfg.estimate
    fixed = (e.cuda_context_gib + e.nccl_buffers_gib) * GIB
    measured = calibration.memory_ratio  # 1.0 unless cluster.calibration says otherwise
    return [
        StageMemory(stage_state_bytes(cfg, d, params), stage_activation_bytes(cfg, d, i),
                    e.allocator_fragmentation, fixed, measured)
        for i, params in enumerate(stage_params(cfg, d))
    ]


def memory_estimate(cfg: Config, d: Derived,
                    calibration: Calibration = UNCALIBRATED) -> tuple[dict, list[float]]:
    """The plan's ``memory_gib`` block for the heaviest stage, and every stage's peak (GiB)."""
    stages = stage_memory(cfg, d, calibration)
    worst = max(stages, key=lambda s: s.peak)
    hbm = cfg.cluster.gpu.hbm_gib
    block = {
        "per_gpu_peak": worst.peak / GIB,
        "weights": worst.states.weights / GIB,
        "grads": worst.states.grads / GIB,
        "optimizer": worst.states.optimizer / GIB,
        "activations": worst.activations / GIB,
        "hbm": hbm,
        "fits": worst.peak / GIB <= hbm,
    }
    return block, [s.peak / GIB for s in stages]
