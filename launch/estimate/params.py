"""Exact parameter counts of a decoder-only transformer, and their share per GPU.

The counts follow the tensors Megatron-Core builds for a GPT model (and that
Hugging Face's Llama/Mixtral/GPT-3-style models have), matrix by matrix:

- word embedding ``V*h``; a separate output layer ``V*h`` when
  ``untie_embeddings_and_output_weights``; learned positions ``P*h``;
- attention with grouped-query heads: ``q`` and ``o`` are ``h x (heads*d)``,
  ``k`` and ``v`` are ``h x (groups*d)`` with ``d = kv_channels``;
- MLP: SwiGLU has three ``h x f`` matrices, GELU two; an MoE layer has
  ``num_experts`` such MLPs plus a router ``h x num_experts``;
- biases on every linear layer when ``add_bias_linear``;
- norms: RMSNorm has ``h`` weights, LayerNorm ``2h``; two per layer plus the final one.

Megatron's own count is ``compute_weight_and_optimizer_memory`` in
megatron/training/theoretical_memory_usage.py (it omits the linear biases and
uses the padded vocabulary); the published model sizes use the real vocabulary,
so these counts do too.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch.config.derive import Derived
from launch.config.schema import (
    Activation, BackendName, Config, ModelConfig, Normalization, PositionEmbedding,
)

MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128
"""Megatron-LM's --make-vocab-size-divisible-by default."""


def head_dim(m: ModelConfig) -> int:
    """kv_channels, or hidden_size / num_attention_heads (Megatron's default)."""
    return m.kv_channels if m.kv_channels is not None else m.hidden_size // m.num_attention_heads


def query_groups(m: ModelConfig) -> int:
    """KV heads: num_query_groups, or one per attention head (MHA) when None."""
    return m.num_query_groups if m.num_query_groups is not None else m.num_attention_heads


def query_size(m: ModelConfig) -> int:
    """Width of the query (and attention output) projection: heads * head_dim."""
    return m.num_attention_heads * head_dim(m)


def kv_size(m: ModelConfig) -> int:
    """Width of the key projection, and of the value projection: groups * head_dim."""
    return query_groups(m) * head_dim(m)


def is_moe(m: ModelConfig) -> bool:
    return bool(m.num_experts)


def attention_params(m: ModelConfig) -> int:
    """q: h*q, k and v: h*kv each, o: q*h; biases q + 2*kv (+ h for o)."""
    h, q, kv = m.hidden_size, query_size(m), kv_size(m)
    weights = h * q + 2 * h * kv + q * h
    biases = (q + 2 * kv + h) if m.add_bias_linear else 0
    return weights + biases


def mlp_matrices(m: ModelConfig) -> int:
    """h x f matrices in one MLP: SwiGLU 3 (gate, up, down), GELU 2 (up, down)."""
    return 3 if m.activation == Activation.swiglu else 2


def mlp_params(m: ModelConfig) -> int:
    """One MLP (one expert of an MoE layer): matrices * h * f, plus biases.

    Biases: the first linear has one per output (2f for SwiGLU's fused gate+up,
    f for GELU), the second h.
    """
    h, f = m.hidden_size, m.ffn_hidden_size
    weights = mlp_matrices(m) * h * f
    biases = ((mlp_matrices(m) - 1) * f + h) if m.add_bias_linear else 0
    return weights + biases


def router_params(m: ModelConfig) -> int:
    """The MoE router: one h x num_experts matrix per layer (Megatron's TopKRouter)."""
    return m.hidden_size * m.num_experts if is_moe(m) else 0


def norm_params(m: ModelConfig) -> int:
    """One norm: RMSNorm has a scale (h), LayerNorm a scale and a bias (2h)."""
    return m.hidden_size * (2 if m.normalization == Normalization.LayerNorm else 1)


def layer_dense_params(m: ModelConfig) -> int:
    """The parameters of one layer outside its experts: attention, router, two norms.

    For a dense model the MLP is included here too.
    """
    dense_mlp = 0 if is_moe(m) else mlp_params(m)
    return attention_params(m) + dense_mlp + router_params(m) + 2 * norm_params(m)


def layer_expert_params(m: ModelConfig, experts: int | None = None) -> int:
    """The expert MLPs of one MoE layer; ``experts`` defaults to all of them."""
    if not is_moe(m):
        return 0
    return (m.num_experts if experts is None else experts) * mlp_params(m)


def word_embedding_params(m: ModelConfig, vocab: int | None = None) -> int:
    """The input embedding table, V*h (also the output layer's size)."""
    return (vocab or m.vocab_size) * m.hidden_size


def position_embedding_params(m: ModelConfig) -> int:
    """Learned absolute positions: max_position_embeddings * h; RoPE has none."""
    if m.position_embedding_type != PositionEmbedding.learned_absolute:
        return 0
    return (m.max_position_embeddings or m.seq_length) * m.hidden_size


def output_layer_params(m: ModelConfig, vocab: int | None = None) -> int:
    """A separate output layer V*h when untied; tied models reuse the embedding."""
    return word_embedding_params(m, vocab) if m.untie_embeddings_and_output_weights else 0


def _params(m: ModelConfig, experts: int | None) -> int:
    layers = m.num_layers * (layer_dense_params(m) + layer_expert_params(m, experts))
    return (word_embedding_params(m) + position_embedding_params(m) + layers
            + norm_params(m) + output_layer_params(m))


def params_total(m: ModelConfig) -> int:
    """Every parameter of the model (all experts), embeddings included."""
    return _params(m, None)


def params_active(m: ModelConfig) -> int:
    """Parameters a token passes through: moe_router_topk experts per MoE layer.

    Equal to params_total for a dense model (Mixtral 8x7B: 12.9B of 46.7B).
    """
    return _params(m, m.moe_router_topk if is_moe(m) else None)


def largest_module_params(m: ModelConfig) -> int:
    """The largest single module's parameters: the embedding or one linear layer.

    DeepSpeed's ZeRO-3 estimator sizes its gathered working set by this
    (``model_to_params`` in deepspeed/runtime/zero/stage3.py takes the largest
    module's own parameters, as Hugging Face models split them).
    """
    h = m.hidden_size
    return max(word_embedding_params(m), h * m.ffn_hidden_size, h * query_size(m))


def padded_vocab_size(vocab: int, tp: int, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """Megatron pads the vocabulary to a multiple of divisible_by * tp.

    megatron/training/tokenizer: ``_vocab_size_with_padding``.
    """
    multiple = divisible_by * max(tp, 1)
    return -(-vocab // multiple) * multiple


def model_vocab_size(cfg: Config) -> int:
    """The vocabulary the backend builds: padded on Megatron, as is on DeepSpeed (HF)."""
    if cfg.backend.name == BackendName.megatron:
        return padded_vocab_size(cfg.model.vocab_size, cfg.parallel.tp)
    return cfg.model.vocab_size


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one GPU of a pipeline stage.

    ``dense`` is sharded by data parallelism over dp*cp ranks (Megatron's
    data-parallel group with context parallelism); ``expert`` over the expert
    data-parallel ranks world / (ep*etp*pp).
    """

    dense: float
    expert: float
    layers: int

    @property
    def total(self) -> float:
        return self.dense + self.expert


def _replicated_layer_params(m: ModelConfig) -> int:
    """Per-layer parameters every tensor-parallel rank holds whole: norms and router."""
    return 2 * norm_params(m) + router_params(m)


def _layer_params_per_gpu(m: ModelConfig, tp: int) -> float:
    """One layer's non-expert parameters on one tensor-parallel rank.

    Approximation: all linear weights and biases are split over tp (Megatron
    replicates the row-parallel biases, a few thousand parameters).
    """
    replicated = _replicated_layer_params(m)
    return replicated + (layer_dense_params(m) - replicated) / tp


def stage_params(cfg: Config, d: Derived) -> list[StageParams]:
    """Parameters per GPU on each pipeline stage, first to last.

    The first stage holds the word embedding (split over tp, VocabParallelEmbedding)
    and the learned positions (replicated); the last the final norm and the
    output layer (split over tp); with tied embeddings and pp > 1 the last stage
    keeps its own copy of the embedding for the output layer, as Megatron does.
    Experts are split over ep * etp. Vocabulary: as the backend pads it.
    """
    m, p = cfg.model, cfg.parallel
    vocab = model_vocab_size(cfg)
    tp, pp = max(p.tp, 1), len(d.stage_layers)
    per_layer = _layer_params_per_gpu(m, tp)
    per_layer_experts = layer_expert_params(m) / max(p.ep * d.etp, 1)
    stages = []
    for i, layers in enumerate(d.stage_layers):
        dense = layers * per_layer
        if i == 0:
            dense += word_embedding_params(m, vocab) / tp + position_embedding_params(m)
        if i == pp - 1:
            dense += norm_params(m) + output_layer_params(m, vocab) / tp
            if pp > 1 and not m.untie_embeddings_and_output_weights:
                dense += word_embedding_params(m, vocab) / tp
        stages.append(StageParams(dense=dense, expert=layers * per_layer_experts, layers=layers))
    return stages
