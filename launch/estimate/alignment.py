"""What an alignment stage costs beyond a plain training step: memory per GPU and time per step.

**DPO** (Rafailov et al. 2023). ``train.global_batch_size`` and ``parallel.micro_batch_size``
count preference pairs; each pair is two sequences (chosen and rejected) that run through the
policy in one forward (TRL's ``concatenated_forward``), so a micro-batch of b pairs is a
micro-batch of 2b sequences in activations, FLOPs and communication (``doubled``). The frozen
reference model adds its weights (``frozen_weights_bytes``: no gradients, no optimizer state,
sharded as the policy) and one forward pass over the same sequences per micro-batch, after
the policy's forward and while its activations are held (trl/trainer/dpo_trainer.py,
``_compute_loss``): a forward pass is 1/3 of forward + backward (``forward_pass_seconds``).

**RLHF** (GRPO, Shao et al. 2024; RLOO, Ahmadian et al. 2024; TRL's trainers).
``train.global_batch_size`` counts completions (TRL's ``per_device_train_batch_size`` x
processes x gradient accumulation, one generation batch per optimizer step). A step is:
generate the completions (``launch.estimate.rollout``), push the new weights to the rollout
engine, score them (reward functions: free; a reward model: a forward pass), the reference
model's forward when ``stage.kl_coef > 0``, then the policy's training step on the
prompt + completion sequences. The phases run one after another (TRL's trainers are
synchronous), so their times add; ``time_s`` keeps each, and the plan shows generation's share.
With ``stage.rollout.engine=vllm_server`` the server's ``stage.rollout.nodes`` are added to the
allocation after the ``cluster.nodes`` that train (``launch.config.rollout.server_nodes``): their
GPUs generate, wait while the policy trains, and count in the run's GPU-hours and cost.
A reward model is assumed to have the policy's architecture (reward models are usually
trained from the SFT checkpoint; its config is not read at plan time).

Not modelled: reference log-probabilities precomputed before training (TRL's
``precompute_ref_log_probs``; trainctl has no key for it yet, so the reference model is always
held); vLLM sleep mode (``vllm_enable_sleep_mode``), which would free the colocated pool during
training; LoRA. ``estimate.mfu`` replaces the training step's model only; the frozen forwards and
the generation keep theirs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from launch.config.derive import Derived, derive
from launch.config.rollout import server_nodes
from launch.config.schema import BackendName, Config, Offload, Precision, Recompute, RolloutEngine, StageKind
from launch.estimate.calibration import UNCALIBRATED, Calibration
from launch.estimate.flops import FWD_BWD_FACTOR, flops_per_token
from launch.estimate.memory import (
    GIB, StageMemory, layer_activation_bytes, logits_activation_bytes, stage_memory,
)
from launch.estimate.params import StageParams, largest_module_params, params_active, params_total, stage_params
from launch.estimate.perf import (
    GB, TERA, _ranks_per_node, bubble_fraction, collective_seconds, compute_seconds, rates, step_seconds,
)
from launch.estimate.rollout import (
    SERVER_GPU_MEMORY_UTILIZATION, WEIGHT_BYTES, RolloutEngineSpec, RolloutEstimate, generation_flops,
    prompt_tokens, rollout_estimate,
)

ALIGNMENT = frozenset({StageKind.sft, StageKind.dpo, StageKind.rlhf})
"""Stages that start from a trained model: a pretraining scaling law says nothing about their loss."""


# ---- frozen models (reference, reward) ------------------------------------------------------

def frozen_weight_bytes_per_param(cfg: Config) -> float:
    """A frozen copy keeps its weights only, in the training dtype: 2 B (bf16/fp8 runs load bf16), 4 B fp32."""
    return 4 if cfg.train.precision == Precision.fp32 else 2


def frozen_weights_bytes(cfg: Config, d: Derived, stage: StageParams) -> float:
    """Bytes on one GPU of a frozen model (reference or reward model) sharded as the policy.

    DeepSpeed: TRL's ``prepare_deepspeed`` (trl/models/utils.py) gives it the policy's ZeRO-3
    config minus the optimizer: ``w x N / dp`` plus the largest module gathered whole, or none of
    it on the GPU with ``offload_params``; under ZeRO 0-2 it runs with ZeRO disabled: ``w x N``
    whole on every GPU. Megatron-Core: the policy's tp x pp (x ep) split, replicated over dp:
    ``w x`` the stage's parameters. w = ``frozen_weight_bytes_per_param``.
    """
    w = frozen_weight_bytes_per_param(cfg)
    if cfg.backend.name == BackendName.megatron:
        return w * stage.total
    if cfg.parallel.zero_stage < 3:
        return w * stage.total
    sharded = 0.0 if cfg.parallel.offload_params != Offload.none else w * stage.total / d.dp
    return sharded + w * largest_module_params(cfg.model)


def forward_transient_bytes(cfg: Config, d: Derived, last_stage: bool, logits: bool = True) -> float:
    """What a forward pass without gradients holds at its peak on one GPU: one layer's working set
    (``layer_activation_bytes``: nothing is kept for a backward) and, on the last pipeline stage, the
    fp32 logits of the micro-batch (4 x s x b x (h + V) / tp, as for training; a reward model's
    one-score head has none)."""
    total = layer_activation_bytes(cfg, d, keep_scores=not cfg.estimate.flash_attention)
    if last_stage and logits:
        total += logits_activation_bytes(cfg)
    return total


def forward_pass_seconds(cfg: Config, d: Derived, calibration: Calibration = UNCALIBRATED) -> float:
    """A frozen model's forward over one step's micro-batches, on the slowest pipeline rank.

        t = m x max(t_train / 3, t_gather) x (1 + bubble) x calibration

    t_train: one micro-batch's forward + backward compute without recomputation (``perf.compute_seconds``);
    a forward is one of the three GEMMs of each training matmul (Narayanan et al. 2021, appendix:
    forward + backward = 3 forwards), so 1/3 of it. t_gather: under ZeRO-3 the frozen model's weights
    are all-gathered once per micro-batch (forward only), prefetched under the compute.
    """
    plain = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, recompute=Recompute.none))
    stages = stage_params(plain, d)
    last = len(stages) - 1
    forward = max(compute_seconds(plain, s.layers, i == last) for i, s in enumerate(stages)) / FWD_BWD_FACTOR
    gather = 0.0
    if cfg.backend.name == BackendName.deepspeed and cfg.parallel.zero_stage >= 3:
        nbytes = frozen_weight_bytes_per_param(cfg) * max(s.total for s in stages)
        gather = collective_seconds(cfg, nbytes, d.dp, _ranks_per_node(cfg, 1, d.dp))
    return (d.grad_accum_steps * max(forward, gather) * (1 + bubble_fraction(cfg, d))
            * calibration.step_time_ratio)


# ---- DPO ------------------------------------------------------------------------------------------

def doubled(cfg: Config) -> Config:
    """The DPO config as the engine runs it: every micro-batch of b pairs is 2b sequences (chosen and
    rejected concatenated), so the per-sequence estimates apply with the micro and global batch doubled."""
    p, t = cfg.parallel, cfg.train
    return dataclasses.replace(
        cfg, parallel=dataclasses.replace(p, micro_batch_size=2 * p.micro_batch_size),
        train=dataclasses.replace(t, global_batch_size=2 * t.global_batch_size, rampup_batch_size=None))


# ---- the result ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageCost:
    """One step of a stage on the training GPUs (and the rollout GPUs of a vLLM server)."""

    policy: StageMemory
    """The trained model's memory on the heaviest pipeline stage (weights, grads, optimizer, activations)."""
    peaks: list[float]
    """Bytes per training GPU on each pipeline stage, first to last, everything included."""
    parts: dict[str, float]
    """Bytes on the heaviest stage by owner: policy (states + activations), reference, reward_model,
    rollout_weights, kv_cache; before fragmentation and the fixed buffers."""
    times: dict[str, float]
    """Seconds per step by phase: train, reference, reward_model, generation, weight_sync."""
    flops_per_step: float
    """Model FLOPs of the step: training, plus every forward pass (frozen models, generation)."""
    trained_tokens_per_step: int
    train_world: int
    rollout_world: int = 0
    """GPUs the vLLM server's nodes add (they generate only)."""
    rollout: RolloutEstimate | None = None
    rollout_gpu_peak: float | None = None
    """vllm_server: bytes per GPU on the rollout nodes."""

    @property
    def step_s(self) -> float:
        return sum(self.times.values())

    @property
    def peak(self) -> float:
        return max(self.peaks)


def _peaks(policy: list[StageMemory], extra: list[float], fixed_extra: float) -> list[float]:
    """Each pipeline stage's peak: (policy tensors + extra tensors) x calibration x (1 + fragmentation)
    + the CUDA context and NCCL buffers + what a colocated engine reserves outright."""
    return [(m.states.total + m.activations + x) * m.measured * (1 + m.fragmentation) + m.fixed + fixed_extra
            for m, x in zip(policy, extra)]


def dpo_cost(cfg: Config, d: Derived, calibration: Calibration = UNCALIBRATED) -> StageCost:
    """DPO: the policy on doubled micro-batches, plus the reference model's weights and forward pass."""
    c2 = doubled(cfg)
    d2 = derive(c2)
    policy = stage_memory(c2, d2, calibration)
    params = stage_params(cfg, d)
    last = len(params) - 1
    reference = [frozen_weights_bytes(cfg, d, s) + forward_transient_bytes(c2, d2, i == last)
                 for i, s in enumerate(params)]
    peaks = _peaks(policy, reference, 0.0)
    worst = max(range(len(peaks)), key=peaks.__getitem__)
    trained = d2.tokens_per_step
    train_flops = flops_per_token(cfg) * trained
    train_s = step_seconds(c2, d2, train_flops, calibration)
    times = {"train": train_s, "reference": forward_pass_seconds(c2, d2, calibration)}
    return StageCost(
        policy=policy[worst], peaks=peaks,
        parts={"policy": policy[worst].states.total + policy[worst].activations, "reference": reference[worst]},
        times=times, flops_per_step=train_flops * (1 + 1 / FWD_BWD_FACTOR),
        trained_tokens_per_step=trained, train_world=d.world_size)


# ---- RLHF -----------------------------------------------------------------------------------------

def rollout_gpus(cfg: Config) -> int:
    """GPUs the vLLM server's nodes add to the job (0 unless stage.rollout.engine=vllm_server)."""
    return server_nodes(cfg) * cfg.cluster.gpus_per_node


def rollout_spec(cfg: Config, train_world: int) -> RolloutEngineSpec:
    """Where and how wide the engines are (module docstring of launch.estimate.rollout)."""
    s, r, gpu = cfg.stage, cfg.stage.rollout, cfg.cluster.gpu
    hbm = gpu.hbm_gib * GIB
    if r.engine == RolloutEngine.hf:
        engines, tp, pool = train_world, 1, None
    elif r.engine == RolloutEngine.vllm_colocate:
        tp = max(r.tensor_parallel, 1)
        engines, pool = max(train_world // tp, 1), r.gpu_memory_utilization * hbm
    else:
        tp = max(r.tensor_parallel, 1)
        engines = max(rollout_gpus(cfg) // tp, 1)
        pool = SERVER_GPU_MEMORY_UTILIZATION * hbm
    return RolloutEngineSpec(
        engine=r.engine, completions=cfg.train.global_batch_size,
        prompt_tokens=prompt_tokens(cfg.model.seq_length, s.max_completion_length),
        completion_tokens=s.max_completion_length, engines=engines, tensor_parallel=tp, pool_bytes=pool,
        params=params_total(cfg.model), active_params=params_active(cfg.model),
        hbm_bytes_per_s=gpu.hbm_bandwidth_tbps * TERA * cfg.estimate.achievable_fraction_hbm,
        flops_per_s=rates(cfg).linear)


def weight_sync_seconds(cfg: Config, d: Derived, engine: RolloutEngine) -> float:
    """Seconds per step to hand the updated policy to the rollout engine.

    ZeRO-3 gathers the full bf16 weights first (an all-gather of 2 B x N over dp: TRL's
    ``unwrap_model_for_generation`` / ``_move_model_to_vllm``); a vLLM server then receives them
    over the network (TRL's ``VLLMClient.update_named_param``, NCCL): 2 B x N at the InfiniBand rate.
    """
    nbytes = WEIGHT_BYTES * params_total(cfg.model)
    total = 0.0
    if cfg.backend.name == BackendName.deepspeed and cfg.parallel.zero_stage >= 3:
        total += collective_seconds(cfg, nbytes, d.dp, _ranks_per_node(cfg, 1, d.dp))
    if engine == RolloutEngine.vllm_server:
        total += nbytes / (cfg.cluster.gpu.ib_gbps * GB)
    return total


def rlhf_cost(cfg: Config, d: Derived, calibration: Calibration = UNCALIBRATED) -> StageCost:
    """GRPO/RLOO: generation, weight sync, frozen models' forwards, then the policy's training step."""
    s = cfg.stage
    tc, td = cfg, d
    engine = s.rollout.engine
    policy = stage_memory(tc, td, calibration)
    params = stage_params(tc, td)
    last = len(params) - 1
    rollout = rollout_estimate(rollout_spec(cfg, td.world_size), cfg.model)

    # Phases, one after another (TRL's _generate_and_score_completions, then the training step): the
    # generation's working set (hf: the gathered weights and the growing cache), the frozen models'
    # forwards on the completions, and the training step's activations are never held at once. What
    # stays all step: the policy's states and the frozen models' weights; a vLLM engine colocated in
    # the rank keeps its whole reservation for the run.
    n = len(params)
    reference_w = reward_w = [0.0] * n
    reference_t = reward_t = [0.0] * n
    times = {}
    if s.kl_coef > 0:
        reference_w = [frozen_weights_bytes(tc, td, p) for p in params]
        reference_t = [forward_transient_bytes(tc, td, i == last) for i in range(n)]
        times["reference"] = forward_pass_seconds(tc, td, calibration)
    if s.reward_model:
        reward_w = [frozen_weights_bytes(tc, td, p) for p in params]
        reward_t = [forward_transient_bytes(tc, td, i == last, logits=False) for i in range(n)]
        times["reward_model"] = forward_pass_seconds(tc, td, calibration)
    generation_phase, reserved, rollout_weights, kv = 0.0, 0.0, 0.0, 0.0
    if engine == RolloutEngine.hf:
        gathered = tc.backend.name == BackendName.deepspeed and tc.parallel.zero_stage >= 3
        rollout_weights = rollout.weights_bytes if gathered else 0.0
        kv = rollout.kv_needed_bytes
        generation_phase = rollout_weights + kv
    elif engine == RolloutEngine.vllm_colocate:
        rollout_weights, kv = rollout.weights_bytes, rollout.kv_pool_bytes
        reserved = s.rollout.gpu_memory_utilization * cfg.cluster.gpu.hbm_gib * GIB
    # vllm_server: nothing on the training GPUs; the rollout block holds its GPUs' numbers
    # the policy's activations are in StageMemory; the extra is what the other phases need beyond them
    extras = [reference_w[i] + reward_w[i]
              + max(generation_phase, reference_t[i], reward_t[i], m.activations) - m.activations
              for i, m in enumerate(policy)]
    peaks = _peaks(policy, extras, reserved)
    worst = max(range(n), key=peaks.__getitem__)

    trained = td.tokens_per_step
    train_flops = flops_per_token(tc) * trained
    times = {"generation": rollout.generation_s, "weight_sync": weight_sync_seconds(tc, td, engine),
             **times, "train": step_seconds(tc, td, train_flops, calibration)}
    frozen_models = (s.kl_coef > 0) + bool(s.reward_model)
    flops = (train_flops * (1 + frozen_models / FWD_BWD_FACTOR)
             + generation_flops(params_active(cfg.model), cfg.train.global_batch_size,
                                prompt_tokens(cfg.model.seq_length, s.max_completion_length),
                                s.max_completion_length))
    server_peak = None
    if engine == RolloutEngine.vllm_server:
        server_peak = SERVER_GPU_MEMORY_UTILIZATION * cfg.cluster.gpu.hbm_gib * GIB
    parts = {"policy": policy[worst].states.total + policy[worst].activations,
             "reference": reference_w[worst] + reference_t[worst],
             "reward_model": reward_w[worst] + reward_t[worst],
             "rollout_weights": rollout_weights, "kv_cache": kv}
    return StageCost(policy=policy[worst], peaks=peaks, parts=parts, times=times, flops_per_step=flops,
                     trained_tokens_per_step=trained, train_world=td.world_size,
                     rollout_world=rollout_gpus(cfg), rollout=rollout,
                     rollout_gpu_peak=server_peak)


def stage_cost(cfg: Config, d: Derived, calibration: Calibration = UNCALIBRATED) -> StageCost | None:
    """The stage's cost, or None for pretraining and SFT (a plain training step: the base estimate)."""
    if cfg.stage.kind == StageKind.dpo:
        return dpo_cost(cfg, d, calibration)
    if cfg.stage.kind == StageKind.rlhf:
        return rlhf_cost(cfg, d, calibration)
    return None
