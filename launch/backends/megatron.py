"""Megatron-Core: the typed config and its derived numbers -> ``RUN_DIR/megatron.yaml``.

One mapping per megatron-core object, holding the keyword arguments its
constructor takes as they are (targets megatron-core 0.16; tests build each
object from every megatron recipe with the real package on CPU):

====================  ===========================================================
model_parallel        ``parallel_state.initialize_model_parallel(**model_parallel)``
transformer_config    ``TransformerConfig(**...)``; MoE models use the same class
                      (0.16 has no separate MoE config: ``num_moe_experts`` etc.)
gpt_model             ``GPTModel(config, transformer_layer_spec, **gpt_model)``
ddp_config            ``DistributedDataParallelConfig(**...)``
optimizer_config      ``OptimizerConfig(**...)`` (``get_megatron_optimizer``)
scheduler             ``OptimizerParamScheduler(optimizer, **scheduler)``; steps are
                      iterations: call ``step(increment=1)`` once per optimizer step
dataset_config        ``GPTDatasetConfig(**...)``: the mixture as a blend
training              plain numbers for the loop and ``forward_backward_func``
stage                 what the stage changes: init checkpoint, loss masking, data format
objects               fields that need Python objects, by mapping: built by ``resolve``
====================  ===========================================================

``resolve(doc, "transformer_config")`` returns the finished keyword arguments
(plain values plus the built objects); it is the only place that imports torch
or megatron, lazily, so the login node can render this file without them.

Traps of megatron-core 0.16 this file avoids (DESIGN.md, "What is real here"):
interleaved pipelines send with ``batch_p2p_comm=False`` (gloo pairs batched
sends wrongly; Megatron-LM sets the same with ``overlap_p2p_comm``); sequence and
context parallelism need TransformerEngine layers (the ``transformer_engine``
layer spec; validation refuses them on CPU runs, which use the ``local`` spec);
uneven pipelines are the ``num_layers_in_first/last_pipeline_stage`` and
``account_for_embedding/loss_in_pipeline_split`` fields as the user set them.
"""

from __future__ import annotations

from typing import Any

import yaml  # PyYAML, which omegaconf already requires on the login node

from launch.backends.common import FP8, MOE, blend, reads_raw_chat, split_string, tokenizer_dir, wsd_decay_steps
from launch.config.derive import Derived
from launch.estimate.params import model_vocab_size
from launch.config.schema import Activation, Config, Precision, Recompute, Schedule

MEGATRON_CORE_VERSION = "0.16"

_COMMENTS = {
    "model_parallel": "parallel_state.initialize_model_parallel(**model_parallel)",
    "transformer_config": "TransformerConfig(**transformer_config, **objects.transformer_config)",
    "gpt_model": "GPTModel(config, **gpt_model, **objects.gpt_model)",
    "ddp_config": "DistributedDataParallelConfig(**ddp_config)",
    "optimizer_config": "OptimizerConfig(**optimizer_config, **objects.optimizer_config)",
    "scheduler": "OptimizerParamScheduler(optimizer, **scheduler): one step(increment=1) per iteration",
    "dataset_config": "GPTDatasetConfig(**dataset_config, **objects.dataset_config)",
    "training": "the training loop; forward_backward_func(num_microbatches=..., seq_length=..., micro_batch_size=...)",
    "stage": "what the alignment stage changes (the trainer reads it)",
    "objects": "fields that need Python objects: launch.backends.megatron.resolve(doc, name) builds them",
}


def uses_transformer_engine(cfg: Config) -> bool:
    """GPU runs (bf16, fp8) use TransformerEngine layers; fp32 marks a CPU run, which uses megatron-core's own."""
    return cfg.train.precision != Precision.fp32


def to_megatron(cfg: Config, d: Derived) -> dict:
    """The megatron.yaml document: one mapping of constructor arguments per megatron-core object."""
    return {
        "model_parallel": _model_parallel(cfg, d),
        "transformer_config": _transformer_config(cfg, d),
        "gpt_model": _gpt_model(cfg),
        "ddp_config": _ddp_config(cfg),
        "optimizer_config": _optimizer_config(cfg, d),
        "scheduler": _scheduler(cfg, d),
        "dataset_config": _dataset_config(cfg, d),
        "training": _training(cfg, d),
        "stage": _stage(cfg),
        "objects": _objects(cfg),
    }


def to_megatron_yaml(cfg: Config, d: Derived) -> str:
    """``to_megatron`` as YAML text, each mapping under a comment naming the call that takes it."""
    doc = to_megatron(cfg, d)
    head = [
        f"# Megatron-Core {MEGATRON_CORE_VERSION} arguments for run {cfg.name}, written by trainctl render.",
        f"# world {d.world_size} = tp {cfg.parallel.tp} x pp {cfg.parallel.pp} x cp {cfg.parallel.cp} x dp {d.dp}; "
        f"global batch {cfg.train.global_batch_size} = micro {cfg.parallel.micro_batch_size} x "
        f"{d.grad_accum_steps} micro-batches x dp {d.dp}",
        f"# layers per pipeline rank: {list(d.stage_layers)}; {d.steps} steps of {d.tokens_per_step} tokens",
    ]
    parts = ["\n".join(head) + "\n"]
    for name, section in doc.items():
        body = yaml.safe_dump({name: section}, sort_keys=False, default_flow_style=False, width=1000)
        parts.append(f"\n# {_COMMENTS[name]}\n{body}")
    return "".join(parts)


def _model_parallel(cfg: Config, d: Derived) -> dict:
    p = cfg.parallel
    return {
        "tensor_model_parallel_size": p.tp,
        "pipeline_model_parallel_size": p.pp,
        "virtual_pipeline_model_parallel_size": p.vpp if p.vpp > 1 else None,
        "context_parallel_size": p.cp,
        "expert_model_parallel_size": p.ep,
        "expert_tensor_parallel_size": d.etp,
    }


def _transformer_config(cfg: Config, d: Derived) -> dict:
    m, p = cfg.model, cfg.parallel
    te = uses_transformer_engine(cfg)
    interleaved = p.vpp > 1
    tc: dict[str, Any] = {
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "ffn_hidden_size": m.ffn_hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "num_query_groups": m.num_query_groups,
        "kv_channels": m.kv_channels,
        "normalization": m.normalization.value,
        "layernorm_epsilon": m.norm_epsilon,
        "gated_linear_unit": m.activation == Activation.swiglu,
        "add_bias_linear": m.add_bias_linear,
        "init_method_std": m.init_method_std,
        "hidden_dropout": 0.0,  # Llama 3 and NeMo's recipes train without dropout (megatron-core: 0.1)
        "attention_dropout": 0.0,  # likewise (megatron-core: 0.1)
        **_model_parallel(cfg, d),
        "sequence_parallel": d.sequence_parallel,
        "num_layers_in_first_pipeline_stage": p.num_layers_in_first_pipeline_stage,
        "num_layers_in_last_pipeline_stage": p.num_layers_in_last_pipeline_stage,
        "account_for_embedding_in_pipeline_split": p.account_for_embedding_in_pipeline_split,
        "account_for_loss_in_pipeline_split": p.account_for_loss_in_pipeline_split,
        # Interleaved 1F1B: overlap the p2p sends and do not batch them (DESIGN trap; Megatron-LM's choice too).
        "overlap_p2p_comm": interleaved,
        "batch_p2p_comm": not interleaved,
        "bf16": cfg.train.precision in (Precision.bf16, Precision.fp8),
        # Megatron-LM's defaults on GPUs: fused bias+activation and wgrad accumulation into main_grad.
        "bias_activation_fusion": te,
        "gradient_accumulation_fusion": te,
        **_recompute(cfg),
    }
    if cfg.train.precision == Precision.fp8:
        tc.update(
            fp8=FP8.format,
            fp8_recipe=FP8.recipe,
            fp8_amax_history_len=FP8.amax_history_len,
            fp8_amax_compute_algo=FP8.amax_compute_algo,
        )
    if m.num_experts:
        tc.update(
            num_moe_experts=m.num_experts,
            moe_ffn_hidden_size=m.ffn_hidden_size,  # model.ffn_hidden_size is one expert's size
            moe_router_topk=m.moe_router_topk,
            moe_router_load_balancing_type=MOE.load_balancing,
            moe_aux_loss_coeff=MOE.aux_loss_coeff,
            moe_token_dispatcher_type=MOE.token_dispatcher,
            moe_grouped_gemm=te,  # one grouped GEMM over the local experts (TransformerEngine)
        )
    return tc


def _recompute(cfg: Config) -> dict:
    r = cfg.parallel.recompute
    if r == Recompute.selective:  # attention core only (Korthikanti et al. 2022)
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if r == Recompute.full:  # every layer: keep each layer's input, recompute the rest
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return {"recompute_granularity": None}


def _gpt_model(cfg: Config) -> dict:
    m = cfg.model
    return {
        "vocab_size": model_vocab_size(cfg),  # padded to 128 * tp, as Megatron-LM pads it
        "max_sequence_length": m.max_position_embeddings or m.seq_length,
        "position_embedding_type": m.position_embedding_type.value,
        "rotary_base": m.rotary_base,
        "share_embeddings_and_output_weights": not m.untie_embeddings_and_output_weights,
    }


def _ddp_config(cfg: Config) -> dict:
    p = cfg.parallel
    gpu = uses_transformer_engine(cfg)
    return {
        # Accumulate and reduce gradients in FP32 under bf16 (Llama 3, sec. 3.3.4), unless the config says not.
        "grad_reduce_in_fp32": cfg.train.precision != Precision.fp32 and cfg.train.grad_reduce_in_fp32,
        "use_distributed_optimizer": p.distributed_optimizer,
        # Hide the data-parallel reduce-scatter (and the distributed optimizer's all-gather) behind
        # compute on GPUs; CPU runs (gloo) keep the plain path.
        "overlap_grad_reduce": gpu,
        "overlap_param_gather": gpu and p.distributed_optimizer,
        "align_param_gather": gpu and p.distributed_optimizer and p.vpp > 1,  # Megatron-LM's choice with interleaving
        # No: launch/train/guard.py decides on the agreed loss and grad norm (a NaN skips the step;
        # megatron-core would raise on the first rank that sees one, before any agreement).
        "check_for_nan_in_grad": False,
        "bucket_size": None,
    }


def _optimizer_config(cfg: Config, d: Derived) -> dict:
    o = cfg.optim
    return {
        "optimizer": "adam",  # with weight_decay and decoupled_weight_decay (the default): AdamW
        "lr": d.lr,
        "min_lr": o.min_lr,
        "weight_decay": o.weight_decay,
        "adam_beta1": o.beta1,
        "adam_beta2": o.beta2,
        "adam_eps": o.eps,
        "clip_grad": o.clip_grad,
        "bf16": cfg.train.precision in (Precision.bf16, Precision.fp8),
        "use_distributed_optimizer": cfg.parallel.distributed_optimizer,
    }


def _scheduler(cfg: Config, d: Derived) -> dict:
    o = cfg.optim
    s = {
        "init_lr": 0.0,
        "max_lr": d.lr,
        "min_lr": o.min_lr,
        "lr_warmup_steps": o.warmup_steps,
        "lr_decay_steps": d.steps,
        "lr_decay_style": "cosine" if o.schedule == Schedule.cosine else "WSD",
        "start_wd": o.weight_decay,
        "end_wd": o.weight_decay,
        "wd_incr_steps": d.steps,
        "wd_incr_style": "constant",
    }
    if o.schedule == Schedule.wsd:
        s.update(wsd_decay_steps=wsd_decay_steps(cfg, d.steps), lr_wsd_decay_style="linear")
    return s


def _dataset_config(cfg: Config, d: Derived) -> dict:
    p = cfg.parallel
    paths, weights = blend(cfg)
    return {
        "random_seed": cfg.train.seed,
        "sequence_length": cfg.model.seq_length,
        "blend": [paths, weights],
        "split": split_string(cfg),
        "reset_position_ids": False,
        "reset_attention_mask": False,
        "eod_mask_loss": False,
        # Causal TransformerEngine attention builds its own mask; an 8K-token mask costs 64 MiB a sequence.
        "create_attention_mask": not uses_transformer_engine(cfg),
        "data_parallel_size": d.dp,
        "context_parallel_size": p.cp,
        "sequence_parallel_size": p.tp if d.sequence_parallel else 0,
    }


def _training(cfg: Config, d: Derived) -> dict:
    t = cfg.train
    return {
        "micro_batch_size": cfg.parallel.micro_batch_size,
        "global_batch_size": t.global_batch_size,
        "rampup_batch_size": list(t.rampup_batch_size) if t.rampup_batch_size else None,
        "num_microbatches": d.grad_accum_steps,
        "data_parallel_size": d.dp,
        "seq_length": cfg.model.seq_length,
        "train_iters": d.steps,
        "seed": t.seed,
        "log_interval": t.log_interval,
        "eval_interval": t.eval_interval,
        "eval_iters": t.eval_iters,
    }


def _stage(cfg: Config) -> dict:
    """init_checkpoint gives weights only (fresh optimizer, iteration 0), until the run has saved its own."""
    s = cfg.stage
    return {
        "kind": s.kind.value,
        "init_checkpoint": s.init_checkpoint,
        "mask_prompt": s.mask_prompt,
        "data_format": "chat_jsonl" if reads_raw_chat(cfg) else "indexed",
    }


def _objects(cfg: Config) -> dict:
    dtype = "float32" if cfg.train.precision == Precision.fp32 else "bfloat16"
    transformer = {"params_dtype": dtype}
    if cfg.parallel.pp > 1:
        transformer["pipeline_dtype"] = dtype  # required with pipeline parallelism
    transformer["activation_func"] = "silu" if cfg.model.activation == Activation.swiglu else "gelu"
    return {
        "transformer_config": transformer,
        "optimizer_config": {"params_dtype": dtype},
        "gpt_model": {"transformer_layer_spec": "transformer_engine" if uses_transformer_engine(cfg) else "local"},
        "dataset_config": {"tokenizer": _tokenizer(cfg)},
    }


def _tokenizer(cfg: Config) -> dict:
    """``MegatronTokenizer.from_pretrained`` arguments: data.tokenizer's directory, loaded by Hugging Face.

    megatron-core 0.16 has no chat (SFT) tokenizer library; for SFT the trainer's
    dataset applies the tokenizer's chat template and masks the prompt.
    """
    return {"library": "huggingface", "path": tokenizer_dir(cfg)}


# --- the trainer's side: build the objects ------------------------------------

def resolve(doc: dict, name: str, **given: Any) -> dict:
    """Keyword arguments for the megatron-core object ``name``: ``doc[name]`` plus its built objects.

    ``given`` supplies objects the caller builds itself (a tokenizer already
    loaded) and replaces the ones named in ``doc["objects"][name]``. Imports
    torch and megatron.core here, never at module import.
    """
    kwargs = dict(doc[name])
    for field, spec in doc.get("objects", {}).get(name, {}).items():
        if field not in given:
            kwargs[field] = _build(field, spec, doc)
    kwargs.update(given)
    return kwargs


def _build(field: str, spec: Any, doc: dict) -> Any:
    if field.endswith("_dtype"):
        import torch

        return getattr(torch, spec)
    if field == "activation_func":
        import torch.nn.functional as F

        return getattr(F, spec)
    if field == "transformer_layer_spec":
        return _layer_spec(spec, doc["transformer_config"])
    if field == "tokenizer":
        from megatron.core.tokenizers import MegatronTokenizer

        extra = {k: v for k, v in spec.items() if k not in ("library", "path")}
        return MegatronTokenizer.from_pretrained(tokenizer_path=spec["path"],
                                                 metadata_path={"library": spec["library"]}, **extra)
    raise ValueError(f"megatron.yaml objects: no builder for {field}={spec!r}")


def _layer_spec(kind: str, tc: dict) -> Any:
    from megatron.core.models.gpt import gpt_layer_specs

    experts, grouped = tc.get("num_moe_experts"), tc.get("moe_grouped_gemm", False)
    if kind == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=grouped)
    if kind == "local":
        return gpt_layer_specs.get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=grouped,
                                                        normalization=tc["normalization"])
    raise ValueError(f"megatron.yaml objects: unknown transformer_layer_spec {kind!r}")
