"""Step time, throughput and MFU: one optimizer step on the slowest pipeline rank.

    step  = m * t_mb * (1 + bubble) + exposed DP comm
    t_mb  = compute + exposed TP/SP, CP, EP and pipeline comm
    bubble = (pp - 1) / (m * vpp)

m is the number of micro-batches per step (grad-accum steps); t_mb is one
micro-batch forward and backward through every model chunk of one pipeline rank,
the slowest one (its layers, and the output layer on the last rank). Each term
is a function below, with its formula and source:

- compute: model FLOPs plus recomputation, at ``estimate.achievable_fraction_*``
  of the tensor-core peak (FP8 GEMMs at the FP8 peak under train.precision=fp8);
- TP/SP: per layer, all-gathers and reduce-scatters of the activations over
  NVLink (Korthikanti et al. 2022, sec. 4.2.2), ``estimate.tp_comm_exposed_fraction``
  of them not hidden;
- CP: ring attention passes K/V around the context-parallel group, hidden behind
  the attention kernel while the kernel is the longer of the two;
- EP: the MoE all-to-all (dispatch and combine), ``ep_comm_exposed_fraction`` exposed;
- PP: each model chunk's activation sent on and its gradient sent back, once
  per chunk and micro-batch, ``pp_comm_exposed_fraction`` exposed (what makes
  many one-layer virtual stages cost more than the bubble they save);
- DP: gradient reduce-scatter and parameter all-gather over InfiniBand across
  nodes, overlapped with one micro-batch's compute, at least
  ``dp_comm_exposed_fraction`` exposed;
- bubble: interleaved 1F1B (Narayanan et al. 2021, sec. 2.2.2).

``cluster.calibration`` (probe runs' measured/predicted ratio, launch/estimate/calibration.py)
scales the modelled step. ``estimate.mfu``, when set, replaces the model: step = model FLOPs per step /
(world * peak * mfu), the peak being ``estimate.mfu_basis``'s.

Not modelled: the optimizer step, kernel launch gaps, load imbalance
between MoE experts, stragglers, data loading, checkpoint stalls, CPU offload
traffic; the step-to-step variance real runs show.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch.config.derive import Derived, mfu_peak_tflops
from launch.config.schema import BackendName, Config, Precision, Recompute
from launch.estimate.calibration import UNCALIBRATED, Calibration
from launch.estimate.flops import LayerFlops, layer_recompute_flops, layer_training_flops, logits_training_flops
from launch.estimate.memory import ACTIVATION_BYTES_BF16, bytes_per_param, local_tokens
from launch.estimate.params import StageParams, is_moe, kv_size, model_vocab_size, stage_params

GB = 1e9
TERA = 1e12
ACTIVATION_BYTES = ACTIVATION_BYTES_BF16
"""Activations, K/V and routed tokens travel in bf16."""


# ---- rates -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Rates:
    """Sustained FLOP/s of one GPU for each kind of kernel."""

    linear: float
    """Dense GEMMs: projections, dense MLP."""
    expert: float
    """MoE expert GEMMs (grouped GEMMs, with token permutation and routing)."""
    attention: float
    """The fused attention kernel (QK^T, softmax, (QK^T)V)."""
    logits: float
    """The output layer."""


def rates(cfg: Config) -> Rates:
    """Peak x achievable fraction (``cfg.estimate``) for each kernel kind.

    BF16: dense GEMMs and attention at peak_bf16 * achievable_fraction_dense, expert
    GEMMs at peak_bf16 * achievable_fraction_moe. FP8 (TransformerEngine): the GEMMs
    of the transformer layers at peak_fp8 * achievable_fraction_fp8, while attention
    and the output layer stay BF16 (TE's DotProductAttention computes in BF16 unless
    fp8_dpa is set; Megatron-Core's output layer is not an FP8 module). fp32 runs
    (CPU) use peak_bf16_tflops as the profile gives it.
    """
    e, gpu = cfg.estimate, cfg.cluster.gpu
    bf16 = gpu.peak_bf16_tflops * TERA
    dense, expert = bf16 * e.achievable_fraction_dense, bf16 * e.achievable_fraction_moe
    if cfg.train.precision == Precision.fp8:
        fp8 = gpu.peak_fp8_tflops * TERA * e.achievable_fraction_fp8
        return Rates(linear=fp8, expert=fp8, attention=dense, logits=dense)
    return Rates(linear=dense, expert=expert, attention=dense, logits=dense)


def mfu_peak_flops(cfg: Config) -> float:
    """The peak MFU is quoted against, in FLOP/s (``derive.mfu_peak_tflops``, which the trainer reads too)."""
    return mfu_peak_tflops(cfg) * TERA


# ---- where a group's ranks sit ------------------------------------------------------------

def _ranks_per_node(cfg: Config, stride: int, size: int) -> int:
    """Ranks of a group of ``size`` ranks ``stride`` apart that share one node.

    Megatron-Core orders ranks tp, cp, dp, pp, fastest first (``RankGenerator``,
    order "tp-cp-ep-dp-pp"): the dense gradients' dp*cp group is tp apart, an EP
    group etp apart, a DeepSpeed data-parallel group adjacent.
    """
    return max(1, min(size, cfg.cluster.gpus_per_node // max(stride, 1)))


def collective_seconds(cfg: Config, nbytes: float, size: int, per_node: int) -> float:
    """One reduce-scatter or all-gather of ``nbytes`` per GPU over ``size`` ranks,
    ``per_node`` of them in each node, done hierarchically (as NCCL's rings use every
    NIC of a node): (k-1)/k of the buffer over NVLink inside the node, then
    (N-1)/N of each GPU's 1/k share over its own InfiniBand NIC across the N nodes.
    A ring moves (n-1)/n of the buffer per GPU (Thakur, Rabenseifner and Gropp 2005,
    "Optimization of Collective Communication Operations in MPICH").
    """
    if size <= 1:
        return 0.0
    gpu = cfg.cluster.gpu
    k = min(per_node, size)
    nodes = size / k
    inside = nbytes * (k - 1) / k / (gpu.nvlink_gbps * GB)
    across = nbytes / k * (nodes - 1) / nodes / (gpu.ib_gbps * GB)
    return inside + across


def _ring_gbps(cfg: Config, span: int) -> float:
    """A ring of point-to-point sends runs at its slowest hop: NVLink when the ranks it
    spans (``span`` consecutive GPUs) fit in a node, else InfiniBand."""
    c = cfg.cluster
    return c.gpu.nvlink_gbps if span <= c.gpus_per_node else c.gpu.ib_gbps


# ---- compute ------------------------------------------------------------------------------

def layer_seconds(cfg: Config, flops: LayerFlops, r: Rates) -> float:
    """Seconds for ``flops`` (per token of one layer) on one micro-batch on one GPU.

    The work of the s*b/cp local tokens is split over tp; MoE experts are split over
    ep*etp GPUs that also serve the other replicas' tokens, so on average a GPU does
    1/tp of its replica's expert work too.
    """
    mlp_rate = r.expert if is_moe(cfg.model) else r.linear
    per_token = flops.projections / r.linear + flops.attention / r.attention + flops.mlp / mlp_rate
    return per_token * local_tokens(cfg) / max(cfg.parallel.tp, 1)


def compute_seconds(cfg: Config, layers: int, last_stage: bool) -> float:
    """One micro-batch, forward and backward, through ``layers`` layers on one GPU:
    model FLOPs (flops.py) plus what recomputation adds (``layer_recompute_flops``),
    plus the output layer (3 * 2 * h*V per token) on the last stage."""
    m, r = cfg.model, rates(cfg)
    per_layer = (layer_seconds(cfg, layer_training_flops(m, m.seq_length), r)
                 + layer_seconds(cfg, layer_recompute_flops(m, m.seq_length, cfg.parallel.recompute), r))
    total = layers * per_layer
    if last_stage:
        logits = logits_training_flops(m, model_vocab_size(cfg)) / r.logits
        total += logits * local_tokens(cfg) / max(cfg.parallel.tp, 1)
    return total


def attention_seconds(cfg: Config, layers: int) -> float:
    """The fused attention kernel's share of compute_seconds (what hides the CP ring)."""
    m, r = cfg.model, rates(cfg)
    core = (layer_training_flops(m, m.seq_length).attention
            + layer_recompute_flops(m, m.seq_length, cfg.parallel.recompute).attention)
    return layers * core / r.attention * local_tokens(cfg) / max(cfg.parallel.tp, 1)


def _layer_passes(cfg: Config) -> int:
    """Passes over a layer that communicate: forward and backward, one more forward under full recompute."""
    return 3 if cfg.parallel.recompute == Recompute.full else 2


# ---- communication inside a micro-batch ------------------------------------------------------

def tp_comm_seconds(cfg: Config, layers: int) -> float:
    """Tensor-parallel traffic of one micro-batch on one GPU.

    Per layer and pass, two all-gathers and two reduce-scatters of the s*b*h bf16
    activations with sequence parallelism, or two all-reduces (the same volume)
    without (Korthikanti et al. 2022, sec. 4.2.2); each moves (tp-1)/tp of the
    message per GPU over NVLink.
    """
    p = cfg.parallel
    if p.tp <= 1:
        return 0.0
    message = ACTIVATION_BYTES * local_tokens(cfg) * cfg.model.hidden_size
    per_layer = 4 * collective_seconds(cfg, message, p.tp, _ranks_per_node(cfg, 1, p.tp))
    return per_layer * _layer_passes(cfg) * layers


def cp_comm_seconds(cfg: Config, layers: int) -> float:
    """Context-parallel ring attention traffic of one micro-batch on one GPU.

    Per layer, the forward passes every K and V chunk around the cp group: each
    GPU receives (cp-1)/cp of the sequence's K and V, 2 * s*b * kv/tp * 2 bytes;
    the backward passes K, V and their gradients (twice that); a recompute of the
    attention (selective or full) passes them again. NVLink when tp*cp <= GPUs per
    node, else InfiniBand (Megatron-Core / TransformerEngine ``AttnFuncWithCP``, p2p ring).
    """
    p, m = cfg.parallel, cfg.model
    if p.cp <= 1:
        return 0.0
    kv_sequence = 2 * m.seq_length * p.micro_batch_size * kv_size(m) / max(p.tp, 1) * ACTIVATION_BYTES
    forward = kv_sequence * (p.cp - 1) / p.cp
    passes = 3 + (1 if p.recompute != Recompute.none else 0)
    return forward * passes * layers / (_ring_gbps(cfg, p.tp * p.cp) * GB)


def cp_exposed_seconds(cfg: Config, layers: int) -> float:
    """Ring attention overlaps each K/V transfer with the attention of the block before:
    only the traffic longer than the attention kernel shows."""
    return max(0.0, cp_comm_seconds(cfg, layers) - attention_seconds(cfg, layers))


def ep_comm_seconds(cfg: Config, d: Derived, layers: int) -> float:
    """MoE all-to-all of one micro-batch on one GPU.

    Per layer and pass, dispatch and combine of topk bf16 copies of each local token
    (s*b/cp, divided by tp under sequence parallelism); (ep-1)/ep of them leave the
    GPU, to EP ranks in the node over NVLink and the rest over InfiniBand at the
    same time (the longer of the two counts).
    """
    p, m = cfg.parallel, cfg.model
    if not is_moe(m) or p.ep <= 1:
        return 0.0
    tokens = local_tokens(cfg) / (p.tp if d.sequence_parallel else 1)
    volume = 2 * tokens * m.moe_router_topk * m.hidden_size * ACTIVATION_BYTES
    k = _ranks_per_node(cfg, d.etp, p.ep)
    gpu = cfg.cluster.gpu
    inside = volume * (k - 1) / p.ep / (gpu.nvlink_gbps * GB)
    across = volume * (p.ep - k) / p.ep / (gpu.ib_gbps * GB)
    return max(inside, across) * _layer_passes(cfg) * layers


# ---- data parallelism -------------------------------------------------------------------------

def pp_comm_seconds(cfg: Config, d: Derived) -> float:
    """Pipeline point-to-point traffic of one micro-batch on one GPU.

    Each of a rank's vpp model chunks receives its input and sends its output in
    the forward, and the matching gradients in the backward (Megatron-Core's
    ``p2p_communication``): 2 * vpp transfers of one micro-batch's activation,
    s/cp * b * h bf16 values, of which each GPU sends its 1/tp share under
    sequence parallelism. Sends and receives run at once on a full-duplex link.
    Megatron-Core puts pp outermost in the rank order, so neighbours are world/pp
    ranks apart and some pair crosses a node boundary unless the whole job fits in
    one node: NVLink then, else InfiniBand.
    """
    p = cfg.parallel
    if p.pp <= 1:
        return 0.0
    message = ACTIVATION_BYTES * local_tokens(cfg) * cfg.model.hidden_size / (p.tp if d.sequence_parallel else 1)
    return 2 * max(p.vpp, 1) * message / (_ring_gbps(cfg, d.world_size) * GB)


def dp_comm_seconds(cfg: Config, d: Derived, stage: StageParams) -> float:
    """Data-parallel traffic of one GPU's parameters for one step, over InfiniBand across nodes.

    Megatron: reduce-scatter of the gradients (fp32, or bf16 with
    train.grad_reduce_in_fp32=false) and all-gather of the bf16 weights with the
    distributed optimizer, else an all-reduce of the gradients (two rings); dense parameters over dp*cp ranks tp*cp apart, experts
    over expert_dp ranks ep*etp apart. DeepSpeed: ZeRO-0 all-reduces the gradients,
    ZeRO-1/2 reduce-scatter them and all-gather the updated weights, once per step;
    ZeRO-3 gathers the weights for the forward and again for the backward and
    reduce-scatters the gradients in every micro-batch (Rajbhandari et al. 2020, sec. 7).
    """
    b, p = bytes_per_param(cfg), cfg.parallel
    if cfg.backend.name == BackendName.deepspeed:
        grads = 4 if cfg.train.grad_reduce_in_fp32 else b.weights  # communication_data_type
        if p.zero_stage >= 3:
            per_param = (2 * b.weights + grads) * d.grad_accum_steps
        elif p.zero_stage >= 1:
            per_param = grads + b.weights
        else:
            per_param = 2 * grads
        return collective_seconds(cfg, stage.total * per_param, d.dp, _ranks_per_node(cfg, 1, d.dp))
    per_param = b.grads + b.weights if p.distributed_optimizer else 2 * b.grads
    dense_ranks = d.dense_dp
    dense = collective_seconds(cfg, stage.dense * per_param, dense_ranks, _ranks_per_node(cfg, p.tp, dense_ranks))
    experts = collective_seconds(cfg, stage.expert * per_param, d.expert_dp,
                                 _ranks_per_node(cfg, p.ep * d.etp, d.expert_dp))
    return dense + experts


def dp_exposed_seconds(cfg: Config, d: Derived, stage: StageParams, microbatch_s: float) -> float:
    """The data-parallel traffic the step waits for: what one micro-batch's compute
    cannot hide, and never less than ``estimate.dp_comm_exposed_fraction`` of it
    (the last bucket's reduce-scatter, the first bucket's gather).

    Megatron (overlap_grad_reduce, overlap_param_gather): a model chunk's gradients
    are final after its last micro-batch's backward, and its reduce-scatter runs
    under the backwards that follow; its weights are gathered under the forwards
    before its first one. With vpp chunks the pipeline's cool-down and warm-up hide
    all but the last chunk's share, 1/vpp of the traffic, which only its own
    micro-batch can hide: exposed = (traffic - micro-batch) / vpp. DeepSpeed ZeRO-3
    gathers and reduces in every micro-batch, each hidden behind that micro-batch;
    ZeRO-0/1/2 reduce once, behind the last micro-batch.
    """
    total = dp_comm_seconds(cfg, d, stage)
    floor = cfg.estimate.dp_comm_exposed_fraction * total
    if cfg.backend.name == BackendName.deepspeed:
        windows = d.grad_accum_steps if cfg.parallel.zero_stage >= 3 else 1
        return max(floor, total - microbatch_s * windows)
    return max(floor, (total - microbatch_s) / max(cfg.parallel.vpp, 1))


# ---- the pipeline ------------------------------------------------------------------------------

def bubble_fraction(cfg: Config, d: Derived) -> float:
    """Pipeline bubble as a share of the ideal time: (pp-1)/(m*vpp) (Narayanan et al. 2021, sec. 2.2.2;
    Llama Team 2024, sec. 3.3.2)."""
    p = cfg.parallel
    return (p.pp - 1) / (d.grad_accum_steps * max(p.vpp, 1))


@dataclass(frozen=True)
class StepTerms:
    """The terms of one step, on the pipeline rank whose micro-batch takes longest."""

    compute_s: float
    """One micro-batch's compute, recomputation included."""
    tp_s: float
    """Exposed tensor/sequence-parallel communication, one micro-batch."""
    cp_s: float
    """Exposed context-parallel communication, one micro-batch."""
    ep_s: float
    """Exposed expert-parallel communication, one micro-batch."""
    pp_s: float
    """Exposed pipeline point-to-point communication, one micro-batch."""
    microbatches: int
    bubble: float
    dp_s: float
    """Exposed data-parallel communication, one step."""

    @property
    def microbatch_s(self) -> float:
        return self.compute_s + self.tp_s + self.cp_s + self.ep_s + self.pp_s

    @property
    def step_s(self) -> float:
        return self.microbatches * self.microbatch_s * (1 + self.bubble) + self.dp_s


def step_terms(cfg: Config, d: Derived) -> StepTerms:
    """Every term of the step (module docstring), for the rank that takes longest."""
    e = cfg.estimate
    stages = stage_params(cfg, d)
    last = len(stages) - 1
    per_rank: dict[tuple, StepTerms] = {}  # ranks with the same layers and parameters take the same time
    for i, stage in enumerate(stages):
        key = (stage, i == last)
        if key in per_rank:
            continue
        compute = compute_seconds(cfg, stage.layers, i == last)
        tp = e.tp_comm_exposed_fraction * tp_comm_seconds(cfg, stage.layers)
        cp = cp_exposed_seconds(cfg, stage.layers)
        ep = e.ep_comm_exposed_fraction * ep_comm_seconds(cfg, d, stage.layers)
        pp = e.pp_comm_exposed_fraction * pp_comm_seconds(cfg, d)
        dp = dp_exposed_seconds(cfg, d, stage, compute)
        per_rank[key] = StepTerms(compute, tp, cp, ep, pp, d.grad_accum_steps, bubble_fraction(cfg, d), dp)
    return max(per_rank.values(), key=lambda t: t.step_s)


def step_seconds(cfg: Config, d: Derived, model_flops_per_step: float,
                 calibration: Calibration = UNCALIBRATED) -> float:
    """Seconds per optimizer step: model FLOPs / (world * peak * estimate.mfu) when
    estimate.mfu is set, else the step-time model scaled by ``calibration``."""
    if cfg.estimate.mfu is not None:
        return model_flops_per_step / (d.world_size * mfu_peak_flops(cfg) * cfg.estimate.mfu)
    return step_terms(cfg, d).step_s * calibration.step_time_ratio  # x1 unless cluster.calibration says otherwise


def throughput_estimate(cfg: Config, d: Derived, model_flops_per_step: float,
                        calibration: Calibration = UNCALIBRATED) -> dict:
    """The plan's ``throughput`` block: MFU = model FLOPs per second per GPU / peak
    (Chowdhery et al. 2022, appendix B), against ``mfu_peak_flops``."""
    step = step_seconds(cfg, d, model_flops_per_step, calibration)
    per_gpu_flops = model_flops_per_step / d.world_size / step
    return {
        "step_time_s": step,
        "tokens_per_s_per_gpu": d.tokens_per_step / step / d.world_size,
        "tflops_per_gpu": per_gpu_flops / TERA,
        "mfu": per_gpu_flops / mfu_peak_flops(cfg),
    }
