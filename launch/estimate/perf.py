"""A first step-time model: compute at a fixed fraction of peak, the pipeline
bubble, recomputation, and the communication that is not hidden behind compute.

    step = compute * (1 + bubble) + exposed DP comm
    compute = (model + recompute FLOPs per GPU) / (peak * ACHIEVABLE_FRACTION)
              + exposed TP comm + exposed EP comm          (per micro-batch work)
    bubble  = (pp - 1) / (m * vpp)                          (Narayanan et al. 2021, sec. 2.2)

Every fraction below is a named, provisional constant; a later issue calibrates
them against measured runs. Not modelled yet: pipeline point-to-point traffic,
context-parallel ring exchange (overlapped with attention), load imbalance
between stages and MoE experts, stragglers, data loading, checkpoint stalls.
"""

from __future__ import annotations

from launch.config.derive import Derived
from launch.config.schema import BackendName, Config, Precision, Recompute
from launch.estimate.flops import recompute_flops_per_token
from launch.estimate.memory import bytes_per_param
from launch.estimate.params import StageParams, is_moe

ACHIEVABLE_FRACTION_DENSE = 0.55
"""Share of the tensor-core peak a dense transformer's GEMMs and fused attention
sustain under Megatron-Core on H100 before communication (provisional)."""
ACHIEVABLE_FRACTION_MOE = 0.45
"""The same for MoE layers: grouped GEMMs, token permutation and routing (provisional)."""
DP_COMM_EXPOSED_FRACTION = 0.2
"""Share of the data-parallel gradient reduce-scatter / parameter all-gather not
overlapped with backward/forward (overlap_grad_reduce, overlap_param_gather)."""
TP_COMM_EXPOSED_FRACTION = 0.3
"""Share of tensor-parallel all-gathers / reduce-scatters not overlapped (TE comm overlap)."""
EP_COMM_EXPOSED_FRACTION = 0.5
"""Share of MoE token all-to-all (dispatch and combine) not overlapped."""
GB = 1e9


def peak_tflops(cfg: Config) -> float:
    """Peak used for compute time: FP8 matmuls run at the FP8 peak, the rest at BF16's.

    fp32 runs (CPU) use peak_bf16_tflops as the profile gives it (cluster=local sets it
    to the host's figure).
    """
    gpu = cfg.cluster.gpu
    return gpu.peak_fp8_tflops if cfg.train.precision == Precision.fp8 else gpu.peak_bf16_tflops


def achievable_fraction(cfg: Config) -> float:
    return ACHIEVABLE_FRACTION_MOE if is_moe(cfg.model) else ACHIEVABLE_FRACTION_DENSE


def _link_gbps(cfg: Config, group_span: int) -> float:
    """NVLink when a communication group's consecutive ranks stay inside a node, else InfiniBand."""
    c = cfg.cluster
    return c.gpu.nvlink_gbps if group_span <= c.gpus_per_node else c.gpu.ib_gbps


def compute_seconds(cfg: Config, d: Derived, model_flops_per_step: float) -> float:
    """Model plus recomputation FLOPs per GPU per step at the achievable fraction of peak."""
    flops = model_flops_per_step + recompute_flops_per_token(cfg) * d.tokens_per_step
    return flops / d.world_size / (peak_tflops(cfg) * 1e12 * achievable_fraction(cfg))


def bubble_fraction(cfg: Config, d: Derived) -> float:
    """Pipeline bubble as a share of ideal time: (pp-1)/(m*vpp) (Narayanan et al. 2021, eq. 1 ff.)."""
    p = cfg.parallel
    return (p.pp - 1) / (d.grad_accum_steps * max(p.vpp, 1))


def _layer_passes(cfg: Config) -> float:
    """Passes over a layer that communicate: forward and backward, one more forward under full recompute."""
    return 3.0 if cfg.parallel.recompute == Recompute.full else 2.0


def tp_comm_seconds(cfg: Config, d: Derived, layers: int) -> float:
    """Tensor-parallel traffic per step: per layer and pass, two all-gathers and two
    reduce-scatters (or two all-reduces without SP) of the s*b*h bf16 activations,
    each moving (tp-1)/tp of the message per GPU (Korthikanti et al. 2022, sec. 4.2.2)."""
    p, m = cfg.parallel, cfg.model
    if p.tp <= 1:
        return 0.0
    message = 2 * m.seq_length / max(p.cp, 1) * p.micro_batch_size * m.hidden_size
    per_pass = 4 * message * (p.tp - 1) / p.tp
    volume = per_pass * _layer_passes(cfg) * layers * d.grad_accum_steps
    return volume / (_link_gbps(cfg, p.tp) * GB)


def ep_comm_seconds(cfg: Config, d: Derived, layers: int) -> float:
    """MoE all-to-all per step: per layer and pass, dispatch and combine of topk bf16
    copies of each local token, (ep-1)/ep of them leaving the GPU."""
    p, m = cfg.parallel, cfg.model
    if not is_moe(m) or p.ep <= 1:
        return 0.0
    tokens = m.seq_length / max(p.cp, 1) * p.micro_batch_size
    per_pass = 2 * tokens * m.moe_router_topk * m.hidden_size * 2 * (p.ep - 1) / p.ep
    volume = per_pass * _layer_passes(cfg) * layers * d.grad_accum_steps
    return volume / (_link_gbps(cfg, p.ep * d.etp) * GB)


def _ring_seconds(bytes_per_gpu: float, ranks: int, gbps: float) -> float:
    """A ring reduce-scatter or all-gather moves (n-1)/n of the buffer per GPU."""
    if ranks <= 1:
        return 0.0
    return bytes_per_gpu * (ranks - 1) / ranks / (gbps * GB)


def dp_comm_seconds(cfg: Config, d: Derived, stage: StageParams) -> float:
    """Data-parallel traffic per step for the GPU's parameters, over InfiniBand across nodes.

    Megatron: reduce-scatter of the fp32 gradients and all-gather of the bf16
    weights with the distributed optimizer, else an all-reduce (two rings).
    DeepSpeed: ZeRO 0-2 reduce the bf16 gradients and gather the updated
    weights once per step; ZeRO-3 gathers the weights for forward and for
    backward and reduce-scatters the gradients in every micro-batch.
    """
    b = bytes_per_param(cfg)
    gbps = _link_gbps(cfg, d.world_size)
    if cfg.backend.name == BackendName.deepspeed:
        if cfg.parallel.zero_stage >= 3:
            per_param = (2 * b.weights + b.grads) * d.grad_accum_steps
        else:
            per_param = b.weights + b.grads
        return _ring_seconds(stage.total * per_param, d.dp, gbps)
    if cfg.parallel.distributed_optimizer:
        per_param = b.grads + b.weights
    else:
        per_param = 2 * b.grads
    dense = _ring_seconds(stage.dense * per_param, d.dp * max(cfg.parallel.cp, 1), gbps)
    return dense + _ring_seconds(stage.expert * per_param, d.expert_dp, gbps)


def step_seconds(cfg: Config, d: Derived, model_flops_per_step: float, stage: StageParams) -> float:
    """Step time (module docstring): compute is the mean over all GPUs; TP and EP
    traffic and the DP volume are those of ``stage``, the stage with the most layers."""
    work = (compute_seconds(cfg, d, model_flops_per_step)
            + TP_COMM_EXPOSED_FRACTION * tp_comm_seconds(cfg, d, stage.layers)
            + EP_COMM_EXPOSED_FRACTION * ep_comm_seconds(cfg, d, stage.layers))
    return work * (1 + bubble_fraction(cfg, d)) + DP_COMM_EXPOSED_FRACTION * dp_comm_seconds(cfg, d, stage)


def throughput_estimate(cfg: Config, d: Derived, model_flops_per_step: float, stage: StageParams) -> dict:
    """The plan's ``throughput`` block. MFU is against the BF16 peak (Chowdhery et al. 2022)."""
    step = step_seconds(cfg, d, model_flops_per_step, stage)
    per_gpu_flops = model_flops_per_step / d.world_size / step
    return {
        "step_time_s": step,
        "tokens_per_s_per_gpu": d.tokens_per_step / step / d.world_size,
        "tflops_per_gpu": per_gpu_flops / 1e12,
        "mfu": per_gpu_flops / (cfg.cluster.gpu.peak_bf16_tflops * 1e12),
    }
