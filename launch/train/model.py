"""The model: a Hugging Face ``transformers`` causal LM built from ``model.*``, never downloaded.

Dense presets become a ``LlamaConfig``, ``model.num_experts > 1`` a ``MixtralConfig``
(names mapped from Megatron-Core's: ffn_hidden_size -> intermediate_size,
num_query_groups -> num_key_value_heads, rotary_base -> rope_theta, ...).

- Pretraining (or ``stage.from_scratch``): random init. Under ZeRO-3 the model is
  built inside ``deepspeed.zero.Init`` so no rank ever holds it whole; Hugging
  Face's weight init runs in ``post_init`` after the parameters are already
  partitioned (it would leave PyTorch's default init: embeddings with std 1), so it
  is re-run module by module on gathered parameters (rank 0 writes, DeepSpeed
  broadcasts), as ``transformers`` does for ZeRO-3 itself.
- Later stages: ``from_pretrained`` of the Hugging Face model ``stage.init_checkpoint`` leads to
  (``launch.train.preflight.resolve_init``: a run directory, its checkpoints or ``final/``, whichever
  backend trained it, or a model directory), ``local_files_only``.
  transformers' own ZeRO-3-aware loading needs ``accelerate`` (not a dependency);
  here every rank loads the weights on the CPU and ``deepspeed.initialize``
  partitions them.
- ``parallel.recompute=full``: ``build`` turns on the model's per-layer activation
  checkpointing, so the model it returns is the one the trainer trains (tests/test_reach.py).
"""

from __future__ import annotations

from launch.compat import TRANSFORMERS_INIT_WEIGHTS, require
from launch.config.schema import Activation, BackendName, Normalization, PositionEmbedding, Recompute
from launch.train.preflight import ENGINES, resolve_init


class ModelError(Exception):
    """The model preset cannot be expressed as a Hugging Face model."""


def hf_config(cfg, *, eod: int | None = None):
    """The ``transformers`` config of ``cfg.model`` (``eod``: the tokenizer's end-of-document id, its BOS/EOS)."""
    m = cfg.model
    if m.position_embedding_type != PositionEmbedding.rope:
        raise ModelError("model.position_embedding_type must be rope for the DeepSpeed trainer (Llama/Mixtral)")
    if m.normalization != Normalization.RMSNorm:
        raise ModelError("model.normalization must be RMSNorm for the DeepSpeed trainer (Llama/Mixtral)")
    if m.activation != Activation.swiglu:
        raise ModelError("model.activation must be swiglu for the DeepSpeed trainer (Llama/Mixtral)")
    common = dict(
        vocab_size=int(m.vocab_size),
        hidden_size=int(m.hidden_size),
        intermediate_size=int(m.ffn_hidden_size),
        num_hidden_layers=int(m.num_layers),
        num_attention_heads=int(m.num_attention_heads),
        num_key_value_heads=int(m.num_query_groups or m.num_attention_heads),
        head_dim=int(m.kv_channels or m.hidden_size // m.num_attention_heads),
        max_position_embeddings=int(m.max_position_embeddings or m.seq_length),
        rope_theta=float(m.rotary_base),
        rms_norm_eps=float(m.norm_epsilon),
        hidden_act="silu",
        initializer_range=float(m.init_method_std),
        tie_word_embeddings=not bool(m.untie_embeddings_and_output_weights),
        use_cache=False,
        attention_dropout=0.0,
        bos_token_id=eod, eos_token_id=eod, pad_token_id=None,
    )
    if m.num_experts and int(m.num_experts) > 1:
        from transformers import MixtralConfig

        if m.add_bias_linear:
            raise ModelError("model.add_bias_linear=true: Mixtral has no linear biases")
        return MixtralConfig(**common, num_local_experts=int(m.num_experts),
                             num_experts_per_tok=int(m.moe_router_topk), output_router_logits=False)
    from transformers import LlamaConfig

    return LlamaConfig(**common, attention_bias=bool(m.add_bias_linear), mlp_bias=bool(m.add_bias_linear))


def build(cfg, ds_config: dict, *, eod: int | None = None):
    """The model to hand to ``deepspeed.initialize`` (partitioned already under ZeRO-3 for a random init),
    with ``parallel.recompute`` applied (``recompute``)."""
    return recompute(_build(cfg, ds_config, eod=eod), cfg)


def recompute(model, cfg):
    """``parallel.recompute=full``: Hugging Face's per-layer activation checkpointing (each layer keeps its
    input and recomputes the rest in backward). Here, in the function that builds the trainer's model, so
    tests/test_reach.py sees what the trainer trains; Hugging Face models have no selective recompute
    (validation refuses it on this backend)."""
    if cfg.parallel.recompute is Recompute.full:  # an enum: the run record gives typed configs only
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _build(cfg, ds_config: dict, *, eod: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    init = resolve_init(cfg, ENGINES[BackendName.deepspeed])  # what preflight checked: a Hugging Face model
    if init:
        model = AutoModelForCausalLM.from_pretrained(init.path, local_files_only=True, dtype=torch.float32)
        model.config.use_cache = False
        return model
    config = hf_config(cfg, eod=eod)
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    if not zero3:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    import deepspeed
    import torch._dynamo  # noqa: F401 - see below
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    # transformers imports torch._dynamo lazily, on the first model built; inside zero.Init, which replaces
    # torch.Tensor.__new__, that import fails (dynamo checks the signature of Tensor.__new__). So: before.
    # The model's classes too: a class created inside zero.Init gets its __init__ restored on exit to the one
    # before any class decorator (kernels' use_kernelized_func on LlamaAttention), so every model built later
    # in the process (DPO's reference) fails in forward ('LlamaAttention' object has no attribute '_kernel_funcs').
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imports modeling_llama / modeling_mixtral now
    with deepspeed.zero.Init(config_dict_or_path=ds_config):  # its dtype follows the config (bf16 or fp32)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_partitioned(model)
    return model


def _reinit_partitioned(model) -> None:
    """Run the model's own ``_init_weights`` on every module, its parameters gathered (ZeRO-3)."""
    import deepspeed
    import torch

    require(TRANSFORMERS_INIT_WEIGHTS)
    with torch.no_grad():
        for module in model.modules():
            params = list(module.parameters(recurse=False))
            if not params:
                continue
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                model._init_weights(module)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(tokenizer: str, directory) -> None:
    """``data.tokenizer``'s files (a ``tokenizer.json`` path or its directory) into an exported model's directory."""
    import shutil
    from pathlib import Path

    tok = Path(tokenizer)
    for name in TOKENIZER_FILES:
        src = tok if name == "tokenizer.json" and tok.is_file() else (tok if tok.is_dir() else tok.parent) / name
        if src.is_file():
            shutil.copy(src, Path(directory) / name)


def n_params(model) -> int:
    """Parameters of the model, counting ZeRO-3 partitioned ones at their full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
