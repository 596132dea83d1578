"""Estimates from the typed config: pure functions, standard library only.

``estimate(cfg, d)`` returns the plan.json blocks (DESIGN.md, "plan.json"):
model, flops, memory_gib, throughput, run, scaling, plus ``memory_stages_gib``
(each pipeline stage's per-GPU peak, first to last). One module per question:

    params   parameter counts, total and per pipeline stage
    flops    model FLOPs (Megatron-LM's formula) and 6N beside it
    memory   per-GPU memory on every stage (Korthikanti et al. 2022; ZeRO)
    perf     step time, throughput and MFU (compute, communication, pipeline bubble)
    run      wall clock, GPU-hours, cost, energy, failures, checkpoint interval, jobs
    scaling  tokens per parameter and the Chinchilla loss (pretraining only)
    alignment, rollout  what a DPO or RL stage adds: frozen models, doubled sequences, generation
                        (the ``stage`` block)
"""

from __future__ import annotations

import dataclasses

from launch.config.derive import Derived
from launch.config.schema import Config
from launch.estimate.alignment import ALIGNMENT, StageCost, stage_cost
from launch.estimate.calibration import UNCALIBRATED, Calibration
from launch.estimate.memory import GIB
from launch.estimate.flops import flops_estimate
from launch.estimate.memory import memory_estimate
from launch.estimate.params import params_active, params_total
from launch.estimate.perf import mfu_peak_flops, throughput_estimate
from launch.estimate.run import run_estimate
from launch.estimate.scaling import scaling_estimate

__all__ = ["Calibration", "UNCALIBRATED", "estimate"]


def estimate(cfg: Config, d: Derived, calibration: Calibration = UNCALIBRATED) -> dict:
    """The plan.json blocks: {"model", "flops", "memory_gib", "throughput", "run", "scaling", "stage"}
    and "memory_stages_gib" (per-stage peaks, GiB, first to last).

    ``calibration``: probe runs' measured/predicted ratios (``load_calibration`` reads
    ``cluster.calibration``'s file at the verb's edge); the default is the bare model.
    For DPO and RL stages ``stage_cost`` replaces the training step's memory, FLOPs and time
    with the whole stage's; ``stage`` splits them by owner and phase.
    """
    n_total, n_active = params_total(cfg.model), params_active(cfg.model)
    flops = flops_estimate(cfg, d, n_active)
    memory, stages_gib = memory_estimate(cfg, d, calibration)
    throughput = throughput_estimate(cfg, d, flops["per_step"], calibration)
    stage = {"kind": cfg.stage.kind.name, "memory_gib": {"policy": memory["per_gpu_peak"]},
             "time_s": {"train": throughput["step_time_s"]}}
    cost = stage_cost(cfg, d, calibration)
    billed = d
    if cost is not None:
        flops, memory, stages_gib, throughput, stage = _with_stage(cfg, d, cost, flops, memory)
        billed = dataclasses.replace(d, world_size=d.world_size + cost.rollout_world)  # a vLLM server's nodes
    scaling = scaling_estimate(cfg, n_active, d.tokens)
    if cfg.stage.kind in ALIGNMENT:  # Chinchilla's law is about pretraining loss; it says nothing here
        scaling["predicted_loss"] = None
    return {
        "model": {"params_total": n_total, "params_active": n_active},
        "flops": flops,
        "memory_gib": memory,
        "throughput": throughput,
        "run": run_estimate(cfg, billed, n_total, throughput["step_time_s"]),
        "scaling": scaling,
        "stage": stage,
        "memory_stages_gib": stages_gib,
    }


def _with_stage(cfg: Config, d: Derived, cost: StageCost, flops: dict, memory: dict):
    """The flops, memory_gib, memory_stages_gib, throughput and stage blocks of a DPO or RL stage."""
    step = cost.step_s
    flops = {**flops, "per_step": cost.flops_per_step, "total": cost.flops_per_step * d.steps}
    hbm = cfg.cluster.gpu.hbm_gib
    rollout_peak = cost.rollout_gpu_peak / GIB if cost.rollout_gpu_peak is not None else None
    fits = cost.peak / GIB <= hbm and (cost.rollout is None or cost.rollout.waves > 0)
    memory = {**memory, "per_gpu_peak": cost.peak / GIB, "weights": cost.policy.states.weights / GIB,
              "grads": cost.policy.states.grads / GIB, "optimizer": cost.policy.states.optimizer / GIB,
              "activations": cost.policy.activations / GIB, "fits": fits}
    gpus = d.world_size + cost.rollout_world  # throughput and MFU per GPU the job holds
    per_gpu_flops = cost.flops_per_step / gpus / step
    throughput = {"step_time_s": step, "tokens_per_s_per_gpu": cost.trained_tokens_per_step / step / gpus,
                  "tflops_per_gpu": per_gpu_flops / 1e12, "mfu": per_gpu_flops / mfu_peak_flops(cfg)}
    stage = {"kind": cfg.stage.kind.name,
             "memory_gib": {k: v / GIB for k, v in cost.parts.items()},
             "time_s": cost.times,
             "sequences_per_step": cost.trained_tokens_per_step // cfg.model.seq_length,
             "train_gpus": cost.train_world, "rollout_gpus": cost.rollout_world}
    if cost.rollout is not None:
        r = cost.rollout
        gen = cost.times["generation"] + cost.times["weight_sync"]
        stage["generation_share"] = gen / step
        stage["rollout"] = {
            "engine": cfg.stage.rollout.engine.name, "sequences_per_engine": r.sequences_per_engine,
            "waves": r.waves, "weights_gib": r.weights_bytes / GIB, "kv_cache_needed_gib": r.kv_needed_bytes / GIB,
            "kv_cache_pool_gib": r.kv_pool_bytes / GIB, "decode_step_ms": r.decode_step_s * 1e3,
            "prefill_s": r.prefill_s, "decode_s": r.decode_s, "gpu_peak_gib": rollout_peak,
        }
    return flops, memory, [p / GIB for p in cost.peaks], throughput, stage
