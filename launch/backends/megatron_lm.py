"""Megatron-LM: the typed config and its derived numbers -> ``RUN_DIR/megatron_args.txt``.

For users who run upstream Megatron-LM's ``pretrain_gpt.py`` (inside NVIDIA's
PyTorch/NeMo containers) rather than trainctl's trainer. One flag per line,
each value ``shlex``-quoted, so the file reads back with
``eval "args=($(< megatron_args.txt))"`` or ``xargs -a megatron_args.txt``::

    torchrun ... pretrain_gpt.py $(< RUN_DIR/megatron_args.txt)   # when no value has spaces

Targets Megatron-LM at commit d98e8a64 (2026-08), the parser listed in
``reference/megatron_lm_arguments.json``; every flag here exists there with a
value its type and choices accept (tests/test_backends.py checks each line).
Older containers lack some flags (the first Megatron-LM release that has each;
NVIDIA's containers ship the Megatron-LM of their month). With an older one, drop or replace:

- ``--exit-signal`` (core_v0.16.0, Nov 2025): before it ``--exit-signal-handler``
  catches SIGTERM only, so forward SIGTERM instead of SIGUSR1;
- ``--dist-ckpt-optim-fully-reshardable`` (core_v0.15.0, Sep 2025): before it the
  distributed optimizer saves ``dp_reshardable`` only (a restart cannot change tp);
- ``--sft``, ``--sft-tokenizer-prompt-format``, ``--tokenizer-type SFTTokenizer`` and
  ``--recompute-modules`` (core_v0.13.0, Jun 2025): no SFT path in ``pretrain_gpt.py``;
  selective recompute is ``--recompute-activations`` there;
- ``--num-virtual-stages-per-pipeline-rank`` and ``--account-for-embedding/loss-in-pipeline-split``
  (core_v0.11.0, Feb 2025): use ``--num-layers-per-virtual-pipeline-stage``;
- ``--decoder-first/last-pipeline-num-layers`` (core_v0.9.0, Sep 2024).

Iterations, not samples, count the schedule (``--train-iters``, ``--lr-*-iters``).
"""

from __future__ import annotations

import shlex

from launch.backends.common import (
    FP8, MOE, blend, checkpoint_dir, in_run_dir, num, split_string, tokenizer_dir,
    wsd_decay_steps,
)
from launch.config.derive import Derived
from launch.config.schema import (Activation, Config, PositionEmbedding, Precision, Recompute, Schedule, StageKind,
                                   WandbMode)

EXIT_SIGNAL = "SIGUSR1"
"""The signal the sbatch script forwards before the time limit; Megatron-LM then saves and exits."""


def to_megatron_lm_args(cfg: Config, d: Derived, *, run_dir: str | None = None,
                        save_interval: int | None = None) -> list[str]:
    """Megatron-LM ``pretrain_gpt.py`` flags, one per line (a flag and its shell-quoted values).

    ``run_dir`` roots the default checkpoint, TensorBoard and wandb paths (None: relative to the
    job's working directory). ``save_interval`` is in iterations; None means
    ``train.checkpoint_interval``, and with neither Megatron-LM saves only on exit and at the end.
    """
    lines: list[str] = []

    def flag(name: str, *values: object) -> None:
        lines.append(" ".join([name, *(shlex.quote(v if isinstance(v, str) else num(v)) for v in values)]))

    _model(cfg, flag)
    _parallel(cfg, d, flag)
    _batch_and_schedule(cfg, d, flag)
    _data(cfg, flag, run_dir)
    _checkpoints(cfg, flag, run_dir, save_interval if save_interval is not None else cfg.train.checkpoint_interval)
    _logging(cfg, flag, run_dir)
    flag("--exit-signal-handler")  # save a checkpoint and exit when the signal arrives
    flag("--exit-signal", EXIT_SIGNAL)
    return lines


def _model(cfg: Config, flag) -> None:
    m = cfg.model
    flag("--num-layers", m.num_layers)
    flag("--hidden-size", m.hidden_size)
    flag("--ffn-hidden-size", m.ffn_hidden_size)
    flag("--num-attention-heads", m.num_attention_heads)
    if m.num_query_groups:
        flag("--group-query-attention")
        flag("--num-query-groups", m.num_query_groups)
    if m.kv_channels:
        flag("--kv-channels", m.kv_channels)
    flag("--seq-length", m.seq_length)
    flag("--max-position-embeddings", m.max_position_embeddings or m.seq_length)
    flag("--position-embedding-type", m.position_embedding_type.value)
    if m.position_embedding_type == PositionEmbedding.rope:
        flag("--rotary-base", m.rotary_base)
    flag("--normalization", m.normalization.value)
    flag("--norm-epsilon", m.norm_epsilon)
    if m.activation == Activation.swiglu:
        flag("--swiglu")
    if not m.add_bias_linear:
        flag("--disable-bias-linear")
    if m.untie_embeddings_and_output_weights:
        flag("--untie-embeddings-and-output-weights")
    flag("--init-method-std", m.init_method_std)
    flag("--attention-dropout", 0.0)  # Llama 3 and NeMo's recipes train without dropout (Megatron-LM: 0.1)
    flag("--hidden-dropout", 0.0)
    if m.num_experts:
        flag("--num-experts", m.num_experts)
        flag("--moe-ffn-hidden-size", m.ffn_hidden_size)  # model.ffn_hidden_size is one expert's size
        flag("--moe-router-topk", m.moe_router_topk)
        flag("--moe-router-load-balancing-type", MOE.load_balancing)
        flag("--moe-aux-loss-coeff", MOE.aux_loss_coeff)
        flag("--moe-token-dispatcher-type", MOE.token_dispatcher)
        flag("--moe-grouped-gemm")
    if cfg.train.precision == Precision.fp8:
        flag("--bf16")
        flag("--fp8-format", FP8.format)
        flag("--fp8-recipe", FP8.recipe)
        flag("--fp8-amax-history-len", FP8.amax_history_len)
        flag("--fp8-amax-compute-algo", FP8.amax_compute_algo)
    elif cfg.train.precision == Precision.bf16:
        flag("--bf16")
    if cfg.train.precision != Precision.fp32 and cfg.train.grad_reduce_in_fp32:
        flag("--accumulate-allreduce-grads-in-fp32")  # Megatron-LM's default is the bf16 buffer


def _parallel(cfg: Config, d: Derived, flag) -> None:
    p = cfg.parallel
    flag("--tensor-model-parallel-size", p.tp)
    flag("--pipeline-model-parallel-size", p.pp)
    if p.vpp > 1:
        flag("--num-virtual-stages-per-pipeline-rank", p.vpp)
    flag("--context-parallel-size", p.cp)
    if cfg.model.num_experts:
        flag("--expert-model-parallel-size", p.ep)
        flag("--expert-tensor-parallel-size", d.etp)
    if p.num_layers_in_first_pipeline_stage is not None:
        flag("--decoder-first-pipeline-num-layers", p.num_layers_in_first_pipeline_stage)
    if p.num_layers_in_last_pipeline_stage is not None:
        flag("--decoder-last-pipeline-num-layers", p.num_layers_in_last_pipeline_stage)
    if p.account_for_embedding_in_pipeline_split:
        flag("--account-for-embedding-in-pipeline-split")
    if p.account_for_loss_in_pipeline_split:
        flag("--account-for-loss-in-pipeline-split")
    if d.sequence_parallel:
        flag("--sequence-parallel")
    flag("--overlap-grad-reduce")  # hide the data-parallel gradient reduction behind backward
    if p.distributed_optimizer:
        flag("--use-distributed-optimizer")
        flag("--overlap-param-gather")  # hide the parameter all-gather behind forward
    if p.recompute == Recompute.selective:
        flag("--recompute-granularity", "selective")
        flag("--recompute-modules", "core_attn")
    elif p.recompute == Recompute.full:
        flag("--recompute-granularity", "full")
        flag("--recompute-method", "uniform")
        flag("--recompute-num-layers", 1)


def _batch_and_schedule(cfg: Config, d: Derived, flag) -> None:
    o = cfg.optim
    flag("--micro-batch-size", cfg.parallel.micro_batch_size)
    flag("--global-batch-size", cfg.train.global_batch_size)
    if cfg.train.rampup_batch_size:
        flag("--rampup-batch-size", *cfg.train.rampup_batch_size)
    flag("--train-iters", d.steps)
    flag("--lr", d.lr)
    flag("--min-lr", o.min_lr)
    flag("--lr-warmup-iters", o.warmup_steps)
    flag("--lr-decay-iters", d.steps)
    if o.schedule == Schedule.cosine:
        flag("--lr-decay-style", "cosine")
    else:
        flag("--lr-decay-style", "WSD")
        flag("--lr-wsd-decay-style", "linear")
        flag("--lr-wsd-decay-iters", wsd_decay_steps(cfg, d.steps))
    flag("--weight-decay", o.weight_decay)
    flag("--adam-beta1", o.beta1)
    flag("--adam-beta2", o.beta2)
    flag("--adam-eps", o.eps)
    flag("--clip-grad", o.clip_grad)
    flag("--seed", cfg.train.seed)


def _data(cfg: Config, flag, run_dir: str | None) -> None:
    paths, weights = blend(cfg)
    pairs = [x for w, path in zip(weights, paths) for x in (w, path)]
    flag("--data-path", *pairs)
    # The dataset index cache (shuffle and sample indices) in the run directory, where our own trainer keeps
    # it (launch/train/data.py): without the flag Megatron-LM writes it beside the data, which fails on a
    # read-only data directory and mixes runs that share the data.
    flag("--data-cache-path", in_run_dir(run_dir, "data_cache"))
    flag("--split", split_string(cfg))
    if cfg.stage.kind == StageKind.sft:
        # The chat JSONL files themselves ("messages" lists); the tokenizer's own chat template; prompt masked.
        flag("--sft")
        flag("--tokenizer-type", "SFTTokenizer")
        flag("--sft-tokenizer-prompt-format", "default")
    else:
        flag("--tokenizer-type", "HuggingFaceTokenizer")
    flag("--tokenizer-model", tokenizer_dir(cfg))


def _checkpoints(cfg: Config, flag, run_dir: str | None, save_interval: int | None) -> None:
    ckpt = checkpoint_dir(cfg, run_dir)
    flag("--save", ckpt)
    flag("--load", ckpt)  # resume from the run's own latest checkpoint after a requeue
    if save_interval:
        flag("--save-interval", save_interval)
    flag("--ckpt-format", "torch_dist")
    if cfg.parallel.distributed_optimizer:
        flag("--dist-ckpt-optim-fully-reshardable")  # a restart may change tp/pp/dp (DESIGN: dp_reshardable cannot)
    if cfg.stage.init_checkpoint:
        # Weights only (fresh optimizer, iteration 0) until the run has a checkpoint of its own.
        flag("--pretrained-checkpoint", cfg.stage.init_checkpoint)


def _logging(cfg: Config, flag, run_dir: str | None) -> None:
    t = cfg.train
    flag("--log-interval", t.log_interval)
    flag("--eval-interval", t.eval_interval)
    flag("--eval-iters", t.eval_iters)
    flag("--log-throughput")  # tokens/s and TFLOP/s per GPU in the log, to compare with plan.json
    flag("--tensorboard-dir", in_run_dir(run_dir, "tensorboard"))  # Megatron-LM logs to wandb only beside TensorBoard
    if cfg.wandb.mode != WandbMode.disabled:
        flag("--wandb-project", cfg.wandb.project)
        flag("--wandb-exp-name", cfg.name)
        flag("--wandb-save-dir", in_run_dir(run_dir, "wandb"))
