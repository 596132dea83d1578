"""DeepSpeed: the typed config and its derived numbers -> ``RUN_DIR/ds_config.json``.

The DeepSpeed backend trains Hugging Face models with ZeRO data parallelism,
and with Ulysses sequence parallelism when ``parallel.cp > 1`` (DeepSpeed's
``UlyssesSPAttentionHF``, ALST). Targets DeepSpeed 0.19 (``DeepSpeedConfig``
of 0.19.8 accepts every file this writes; tests/test_backends.py checks it).

The batch arithmetic is written out, never "auto"::

    train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * dp

with the accumulation steps read from ``Derived`` (its dp is world / (tp*pp*cp),
on DeepSpeed world / cp, since tp = pp = 1: DeepSpeed divides its world size by
``sequence_parallel_size``). DeepSpeed
asserts the same equation with the world size it finds at start-up, so a job
started on the wrong number of GPUs fails before its first step.

Defaults follow DeepSpeed's guidance for large models (docs: "config-json",
"ZeRO" tutorial) and, where DeepSpeed leaves a size to the user, the formulas
Hugging Face's integration uses for its "auto" values. Values that differ from
DeepSpeed's own defaults carry a one-line reason.

What the trainer does with this file (``launch/train``), and what it keeps:

- ``deepspeed.initialize(model=..., model_parameters=<param groups: no weight
  decay on norms and biases>, config=<this dict>, lr_scheduler=...)`` builds
  AdamW from here. The ``scheduler`` section (``WarmupCosineLR``) is for anyone
  who runs this file with their own DeepSpeed script; trainctl's trainer passes
  a client schedule instead (``launch/train/schedule.py``: the same warmup and
  cosine to ``min_lr``, but the first update already moves, where DeepSpeed's
  runs its first two at a rate of 0).
- ``optim.schedule=wsd`` has no DeepSpeed scheduler: the file then has no
  ``scheduler`` section and the trainer builds the warmup-stable-decay schedule
  from ``optim.*`` in config.yaml (hand-off; ``common.wsd_decay_steps`` gives
  the decay length every backend uses).
- No ``wandb`` section: the trainer logs to wandb itself (offline by default),
  so DeepSpeed's monitor would add a second, empty run per job.
- ``parallel.recompute=full``: the trainer turns on the Hugging Face model's
  per-layer gradient checkpointing; the ``activation_checkpointing`` section
  configures DeepSpeed's own, for DeepSpeed scripts that use it. Hugging Face
  models have no selective recompute (validation refuses it).
- ``parallel.cp > 1``: ``UlyssesSPAttentionHF.register_with_transformers(model,
  core_attn_implementation="flash_attention_2" or "sdpa", sequence_parallel_size=cp,
  micro_batch_size=..., seq_length=...)`` returns the mpu given to ``initialize``
  (not wired into trainctl's trainer yet: it refuses cp > 1).
- Stages: the loss, prompt masking, data format and init checkpoint come from
  ``stage.*`` and ``data.*`` in config.yaml; the LR here is ``Derived.lr``. DPO's
  frozen reference policy gets its own engine from ``to_deepspeed_reference``.
"""

from __future__ import annotations

from launch.config.derive import Derived
from launch.config.schema import Config, Offload, Precision, Recompute, Schedule

_E9 = 1_000_000_000


def to_deepspeed(cfg: Config, d: Derived) -> dict:
    """The DeepSpeed config of the trained model (the policy, for DPO)."""
    o = cfg.optim
    config = {
        **_batch(cfg, d),
        "gradient_clipping": o.clip_grad,
        **_precision(cfg),
        "zero_optimization": _zero(cfg, offload_optimizer=True),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": d.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # FusedAdam is a CUDA kernel; CPU processes (train.precision=fp32) use torch's AdamW.
                **({"torch_adam": True} if cfg.train.precision == Precision.fp32 else {}),
            },
        },
        **_scheduler(cfg, d),
        **_activation_checkpointing(cfg),
        **_sequence_parallel(cfg),
        "steps_per_print": cfg.train.log_interval,  # DeepSpeed's own progress lines at train.log_interval (default 10)
        "wall_clock_breakdown": False,
    }
    return config


def to_deepspeed_reference(cfg: Config, d: Derived) -> dict:
    """DPO's frozen reference policy: no optimizer, sharded like the policy under ZeRO-3.

    As TRL prepares it: with ZeRO-3 the reference model's parameters are
    partitioned (and offloaded) like the policy's; under stages 0-2 it fits
    whole on every GPU and runs without ZeRO. DeepSpeed checks the batch fields
    for an inference-only engine too, so they match the policy's.
    """
    zero = _zero(cfg, offload_optimizer=False) if cfg.parallel.zero_stage == 3 else {"stage": 0}
    return {
        **_batch(cfg, d),
        **_precision(cfg),
        "zero_optimization": zero,
        **_sequence_parallel(cfg),
        "steps_per_print": cfg.train.log_interval,
        "wall_clock_breakdown": False,
    }


def _batch(cfg: Config, d: Derived) -> dict:
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.parallel.micro_batch_size,
        "gradient_accumulation_steps": d.grad_accum_steps,
    }


def _precision(cfg: Config) -> dict:
    if cfg.train.precision == Precision.fp32:
        return {"bf16": {"enabled": False}}
    return {
        "bf16": {"enabled": True},
        # Reduce-scatter gradients in FP32, as Llama 3 does (sec. 3.3.4) and Megatron does under bf16,
        # unless train.grad_reduce_in_fp32=false.
        "communication_data_type": "fp32" if cfg.train.grad_reduce_in_fp32 else "bf16",
    }


def _zero(cfg: Config, *, offload_optimizer: bool) -> dict:
    p, h = cfg.parallel, cfg.model.hidden_size
    if p.zero_stage == 0:
        return {"stage": 0}
    zero: dict = {
        "stage": p.zero_stage,
        "overlap_comm": True,  # hide gradient reduction behind backward (DeepSpeed's default at stage 3 only)
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": h * h,  # HF's "auto": one hidden x hidden matrix per bucket (DeepSpeed: 5e8 elements)
    }
    if p.zero_stage < 3:
        zero.update(allgather_partitions=True, allgather_bucket_size=5 * 10**8)
    else:
        zero.update({
            # HF's "auto": fetch about the next layer's matrices ahead (DeepSpeed: 5e7).
            "stage3_prefetch_bucket_size": int(0.9 * h * h),
            # HF's "auto": keep norms and biases whole on every GPU, shard every matrix (DeepSpeed: 1e5).
            "stage3_param_persistence_threshold": 10 * h,
            "stage3_max_live_parameters": _E9,
            "stage3_max_reuse_distance": _E9,
            "sub_group_size": _E9,
            # save_16bit_model() writes one bf16 state dict the next stage (SFT -> DPO) loads without zero_to_fp32.
            "stage3_gather_16bit_weights_on_model_save": True,
        })
        if p.offload_params == Offload.cpu:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if offload_optimizer and p.offload_optimizer == Offload.cpu:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    for key in ("offload_optimizer", "offload_params"):
        if getattr(p, key) == Offload.nvme:  # validation refuses it first (deepspeed_nvme_offload)
            raise ValueError(f"parallel.{key}=nvme: no NVMe path is configured")
    return zero


def _scheduler(cfg: Config, d: Derived) -> dict:
    o = cfg.optim
    if o.schedule != Schedule.cosine:
        return {}  # WSD: the trainer builds the schedule from optim.* (module docstring)
    return {
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": d.steps,
                "warmup_num_steps": o.warmup_steps,
                "warmup_min_ratio": 0.0,
                "warmup_type": "linear",  # the linear warmup optim.schedule=cosine promises (DeepSpeed: log)
                # Decay to optim.min_lr (DeepSpeed: 1e-4 of the peak); 12 digits, so 1e-6/1e-5 reads 0.1.
                "cos_min_ratio": float(f"{o.min_lr / d.lr:.12g}"),
            },
        },
    }


def _activation_checkpointing(cfg: Config) -> dict:
    if cfg.parallel.recompute != Recompute.full:
        return {}
    return {
        "activation_checkpointing": {
            # Partitioning and CPU checkpointing split activations over model-parallel ranks;
            # this backend has none, so every option stays at DeepSpeed's default (off).
            "partition_activations": False,
            "cpu_checkpointing": False,
            "contiguous_memory_optimization": False,
            "number_checkpoints": None,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        },
    }


def _sequence_parallel(cfg: Config) -> dict:
    cp = cfg.parallel.cp
    # Ulysses: DeepSpeed's data-parallel world is world / sequence_parallel_size.
    return {"sequence_parallel_size": cp} if cp > 1 else {}
