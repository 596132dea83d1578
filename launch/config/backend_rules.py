"""Validation rules scoped to one backend: what DeepSpeed or Megatron-Core accepts, and which stages each trains.

``launch.config.validate.RULES`` lists them after the general rules in ``rules``.
"""

from __future__ import annotations

from typing import Iterator

from launch.config.derive import Derived
from launch.config.schema import Config, Offload, Precision, Recompute, RlAlgorithm, Schedule, Scheduler, StageKind
from launch.config.problem import Problem, divisors, is_megatron, split_evenly


def deepspeed_layout(cfg: Config, d: Derived) -> Iterator[Problem]:
    """The DeepSpeed backend trains Hugging Face models with ZeRO data parallelism."""
    if is_megatron(cfg):
        return
    p = cfg.parallel
    for key, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.ep", p.ep)):  # cp: deepspeed_ulysses
        if value > 1:
            yield Problem({"backend": "deepspeed", key: value},
                          f"{key.split('.')[1]} > 1 is not supported on the DeepSpeed backend (ZeRO data parallelism only)",
                          f"backend=megatron, or {key}=1")
    if p.recompute == Recompute.selective:
        yield Problem({"backend": "deepspeed", "parallel.recompute": p.recompute},
                      "Hugging Face models offer full activation checkpointing only",
                      "parallel.recompute=full (or none)")
    if p.offload_optimizer.name != "none" and p.zero_stage == 0:
        yield Problem({"parallel.offload_optimizer": p.offload_optimizer, "parallel.zero_stage": p.zero_stage},
                      "optimizer offload needs ZeRO stage 1 or higher", "parallel.zero_stage=3")
    if p.offload_params.name != "none" and p.zero_stage != 3:
        yield Problem({"parallel.offload_params": p.offload_params, "parallel.zero_stage": p.zero_stage},
                      "parameter offload needs ZeRO stage 3", "parallel.zero_stage=3")
    if cfg.train.precision == Precision.fp8:
        yield Problem({"backend": "deepspeed", "train.precision": cfg.train.precision},
                      "FP8 training goes through TransformerEngine, which the Megatron backend uses",
                      "train.precision=bf16, or backend=megatron")


def z_loss_backend(cfg: Config, d: Derived) -> Iterator[Problem]:
    """optim.z_loss is added by trainctl's DeepSpeed trainer; Megatron-Core has a z-loss for MoE routers only."""
    if cfg.optim.z_loss < 0:
        yield Problem({"optim.z_loss": cfg.optim.z_loss}, "a loss weight cannot be negative", "optim.z_loss=1e-4")
    elif cfg.optim.z_loss > 0 and is_megatron(cfg):
        yield Problem({"optim.z_loss": cfg.optim.z_loss, "backend": cfg.backend.name},
                      "Megatron-Core has no output-softmax z-loss (only the MoE router's, moe_z_loss_coeff)",
                      "optim.z_loss=0 on this backend, or backend=deepspeed")


def local_cluster_precision(cfg: Config, d: Derived) -> Iterator[Problem]:
    if cfg.cluster.scheduler == Scheduler.local and cfg.train.precision == Precision.fp8:
        yield Problem({"cluster": cfg.cluster.name, "train.precision": cfg.train.precision},
                      "FP8 needs H100-class GPUs", "train.precision=fp32 (CPU) or bf16")


def local_cluster_is_one_node(cfg: Config, d: Derived) -> Iterator[Problem]:
    """A local cluster is the machine trainctl runs on: launch.sh starts torchrun --standalone there."""
    if cfg.cluster.scheduler == Scheduler.local and cfg.cluster.nodes != 1:
        yield Problem({"cluster": cfg.cluster.name, "cluster.nodes": cfg.cluster.nodes},
                      "a local cluster is this one machine", "cluster.nodes=1, or a Slurm profile (cluster=h100) "
                      "for more nodes")


def stage_supported_by_backend(cfg: Config, d: Derived) -> Iterator[Problem]:
    """Which alignment stages each backend's translation covers (launch/backends)."""
    kind, keys = cfg.stage.kind, {"backend": cfg.backend.name, "stage": cfg.stage.kind}
    if kind == StageKind.dpo and is_megatron(cfg) and cfg.parallel.cp > 1:
        yield Problem({**keys, "parallel.cp": cfg.parallel.cp},
                      "DPO sums each sequence's log-probabilities, which context parallelism splits over cp ranks; "
                      "trainctl's Megatron-Core DPO does not add the parts up", "parallel.cp=1")
    if kind == StageKind.rlhf and cfg.stage.rl_algorithm == RlAlgorithm.ppo:
        yield Problem({**keys, "stage.rl_algorithm": cfg.stage.rl_algorithm},
                      "PPO needs a value model trained beside the policy, and TRL 1.16 (which trainctl runs RL "
                      "stages with) has no PPO trainer; GRPO and RLOO need no value model",
                      "stage.rl_algorithm=grpo (or rloo)")
    elif kind == StageKind.rlhf and is_megatron(cfg):
        yield Problem(keys, "GRPO and RLOO run on TRL's trainers, which train Hugging Face models on the DeepSpeed "
                      "backend; megatron-core ships no RL loop",
                      "run this stage with backend=deepspeed stage.init_checkpoint=/path/to/megatron_run (a Megatron-"
                      "Core run's checkpoints/final is a Hugging Face model; `python -m launch.train.megatron.export` "
                      "converts any other step)")


def learning_rate_schedule(cfg: Config, d: Derived) -> Iterator[Problem]:
    """The schedule decays from the peak LR (Derived.lr) down to optim.min_lr."""
    o = cfg.optim
    peak_key = "stage.lr" if cfg.stage.lr is not None else "optim.lr"
    if o.min_lr > d.lr:
        yield Problem({"optim.min_lr": o.min_lr, peak_key: d.lr},
                      f"min_lr {o.min_lr:g} is above the peak learning rate {d.lr:g}: the decay would raise the LR "
                      "(Megatron's scheduler refuses it)", f"optim.min_lr={d.lr / 10:g}")
    if o.warmup_steps >= d.steps > 0:
        yield Problem({"optim.warmup_steps": o.warmup_steps, "steps": d.steps},
                      "the warmup is as long as the run: the LR would never decay (Megatron's scheduler refuses it)",
                      f"optim.warmup_steps={max(d.steps // 10, 1)}")
    if not is_megatron(cfg) and o.schedule == Schedule.cosine and o.warmup_steps < 1:
        yield Problem({"optim.warmup_steps": o.warmup_steps, "backend": "deepspeed"},
                      "DeepSpeed's WarmupCosineLR needs at least one warmup step", "optim.warmup_steps=1")


def deepspeed_nvme_offload(cfg: Config, d: Derived) -> Iterator[Problem]:
    """ZeRO-Infinity's NVMe offload writes to each node's local NVMe drive."""
    if is_megatron(cfg):
        return
    for key in ("offload_optimizer", "offload_params"):
        if getattr(cfg.parallel, key) == Offload.nvme:
            yield Problem({f"parallel.{key}": Offload.nvme}, "NVMe offload needs the path of each node's local NVMe "
                          "drive, and trainctl has no key for it yet", f"parallel.{key}=cpu")


def deepspeed_ulysses(cfg: Config, d: Derived) -> Iterator[Problem]:
    """parallel.cp > 1 on DeepSpeed is Ulysses: an all-to-all trades sequence shards for attention heads."""
    p, m = cfg.parallel, cfg.model
    if is_megatron(cfg) or p.cp < 2:
        return
    yield from split_evenly("model.num_attention_heads", m.num_attention_heads, "heads", "parallel.cp", p.cp)
    kv = m.num_query_groups or m.num_attention_heads
    if kv % p.cp and p.cp % kv:
        fits = [c for c in divisors(m.num_attention_heads) if not kv % c or not c % kv]
        yield Problem({"model.num_query_groups": kv, "parallel.cp": p.cp},
                      f"Ulysses needs the {kv} KV heads to divide by cp={p.cp}, or cp by them (it replicates them)",
                      f"choose parallel.cp from {fits}")
    if cfg.stage.kind == StageKind.dpo:
        yield Problem({"backend": "deepspeed", "parallel.cp": p.cp, "stage": cfg.stage.kind},
                      "DPO sums each sequence's log-probabilities, which Ulysses splits over cp ranks; trainctl "
                      "translates Ulysses for token-level losses (pretrain, SFT) only", "parallel.cp=1")


def megatron_parallel_needs_transformer_engine(cfg: Config, d: Derived) -> Iterator[Problem]:
    """CPU runs (train.precision=fp32) build megatron-core's own layers, not TransformerEngine's."""
    p = cfg.parallel
    if not is_megatron(cfg) or cfg.train.precision != Precision.fp32:
        return
    if d.sequence_parallel:
        yield Problem({"parallel.sequence_parallel": p.sequence_parallel, "parallel.tp": p.tp,
                       "train.precision": "fp32"},
                      "sequence parallelism needs TransformerEngine's norms: megatron-core's own give slightly wrong "
                      "gradients without an error, and fp32 (CPU) runs use them",
                      "parallel.sequence_parallel=false, or train.precision=bf16 on GPUs")
    if p.cp > 1:
        yield Problem({"parallel.cp": p.cp, "train.precision": "fp32"},
                      "context parallelism needs TransformerEngine's attention, which fp32 (CPU) runs do not use",
                      "parallel.cp=1, or train.precision=bf16 on GPUs")


def megatron_sft_data(cfg: Config, d: Derived) -> Iterator[Problem]:
    """Megatron-LM's SFT dataset reads JSONL lines holding a "messages" list and trains on the replies only."""
    if not is_megatron(cfg) or cfg.stage.kind != StageKind.sft:
        return
    for name, source in cfg.data.sources.items():
        if not source.path.endswith(".jsonl") or source.text_key != "messages":
            yield Problem({f"data.sources.{name}.path": source.path, f"data.sources.{name}.text_key": source.text_key},
                          'SFT on Megatron reads .jsonl files of conversations under the key "messages"',
                          f"data=chat_sft, or data.sources.{name}.path=<chat .jsonl> "
                          f"data.sources.{name}.text_key=messages")
    if not cfg.stage.mask_prompt:
        yield Problem({"stage.mask_prompt": False, "backend": "megatron"},
                      "Megatron-LM's SFT dataset always masks the prompt tokens", "stage.mask_prompt=true")


