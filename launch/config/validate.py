"""Validation: every rule, listed here in the order it runs, and ``validate`` that runs them.

Each rule takes the typed config and its derived numbers and yields the
problems it finds, so a user sees every problem of a layout at once, before
anything is written or queued. General rules (``rules``) hold on any backend;
backend rules (``backend_rules``) say what DeepSpeed or Megatron-Core accepts.
A rule not named in ``RULES`` does not run.
"""

from __future__ import annotations

from launch.config import backend_rules, rollout, rules
from launch.config.derive import Derived
from launch.config.problem import Problem, Rule, divisors
from launch.config.schema import Config

__all__ = ["BACKEND_RULES", "GENERAL_RULES", "RULES", "Problem", "Rule", "divisors", "validate"]

GENERAL_RULES: tuple[Rule, ...] = (
    rules.name_is_a_path_component,
    rules.tokens_or_steps,
    rules.guard_policy,
    rules.hang_timeout,
    rules.time_limit_format,
    rules.world_divisible_by_model_parallel,
    rules.expert_layout_divides_world,
    rules.experts_divisible_by_ep,
    rules.tp_within_node,
    rules.heads_divisible_by_tp,
    rules.query_groups_divisible_by_tp,
    rules.head_dim_is_whole,
    rules.vpp_needs_pp,
    rules.pipeline_split,
    rules.context_parallel_sequence,
    rules.sequence_fits_positions,
    rules.batch_divisible,
    rules.batch_rampup,
    rules.sequence_parallel_setting,
    rules.sequence_parallel_splits_sequence,
    rules.moe_settings,
    rules.interleaved_schedule_microbatches,
    rules.no_secrets_in_files,
    rules.env_names,
    rules.mixture_weights,
    rules.data_split,
    rules.stage_needs_init,
    rollout.rollout_settings,
    rules.rl_stage,
    rules.estimate_settings,
)
"""Rules that hold on any backend."""

BACKEND_RULES: tuple[Rule, ...] = (
    backend_rules.deepspeed_layout,
    backend_rules.z_loss_backend,
    backend_rules.local_cluster_precision,
    backend_rules.local_cluster_is_one_node,
    backend_rules.stage_supported_by_backend,
    backend_rules.learning_rate_schedule,
    backend_rules.deepspeed_nvme_offload,
    backend_rules.deepspeed_ulysses,
    backend_rules.megatron_parallel_needs_transformer_engine,
    backend_rules.megatron_sft_data,
)
"""Rules scoped to one backend (each returns nothing for the other)."""

RANGES: Rule = rules.values_within_bounds
"""Runs first: when a value is out of its range, the other rules (which divide by such values and take
their divisors) are not run, and the user fixes the ranges first."""
RULES: tuple[Rule, ...] = (RANGES,) + GENERAL_RULES + BACKEND_RULES


def validate(cfg: Config, d: Derived) -> list[Problem]:
    return list(RANGES(cfg, d)) or [problem for check in RULES[1:] for problem in check(cfg, d)]
