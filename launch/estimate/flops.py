"""Model FLOPs of training (forward + backward), per token, per step and in total.

The reported number is Megatron-LM's ``num_floating_point_operations``
(megatron/training/training.py, ``transformer_flops``), the count behind the
MFU that Megatron logs. Per token, for L layers of hidden size h, FFN size f,
query width q = heads*d, key/value width k = groups*d, sequence length s and
(padded) vocabulary V:

    3 * 2 * [ L * ( h*(q + 2k) + q*h          # QKV and output projections
                   + q*s/2 * 2                 # QK^T and (QK^T)V, causal: half the matrix
                   + e * h*f * topk )          # MLP; e = 3 for SwiGLU, 2 for GELU
             + h*V ]                           # logits

3 = forward + two backward GEMMs (wgrad, dgrad), 2 = FLOPs per multiply-add
(Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters", appendix). Norms, biases, softmax and the router are not counted,
and neither is recomputation: these are *model* FLOPs (Chowdhery et al. 2022,
appendix B). The ``6*N`` rule (Kaplan et al. 2020) is given next to it as
``per_token_6nd``; it leaves out attention over the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch.config.derive import Derived
from launch.config.schema import Config, ModelConfig, Recompute
from launch.estimate.params import is_moe, kv_size, mlp_matrices, model_vocab_size, query_size

FMA_FLOPS = 2
"""FLOPs per multiply-add."""
FWD_BWD_FACTOR = 3
"""Each GEMM runs three times in training: forward, backward data, backward weight."""


def attention_projection_macs(m: ModelConfig) -> float:
    """Multiply-adds per token per layer of the Q, K, V and output projections: h*(q+2k) + q*h."""
    h, q, k = m.hidden_size, query_size(m), kv_size(m)
    return h * (q + 2 * k) + q * h


def attention_core_macs(m: ModelConfig, seq_length: int) -> float:
    """Multiply-adds per token per layer of QK^T and (QK^T)V under a causal mask: q*s/2 * 2."""
    return query_size(m) * seq_length / 2 * 2


def mlp_macs(m: ModelConfig) -> float:
    """Multiply-adds per token per layer of the MLP: e*h*f, times topk experts for MoE."""
    routed = m.moe_router_topk if is_moe(m) else 1
    return mlp_matrices(m) * m.hidden_size * m.ffn_hidden_size * routed


def layer_macs(m: ModelConfig, seq_length: int) -> float:
    """Multiply-adds per token of one transformer layer (attention + MLP)."""
    return attention_projection_macs(m) + attention_core_macs(m, seq_length) + mlp_macs(m)


def logits_macs(m: ModelConfig, vocab: int) -> float:
    """Multiply-adds per token of the output layer: h*V."""
    return m.hidden_size * vocab


def training_flops(macs: float) -> float:
    """Training FLOPs of a forward pass of ``macs`` multiply-adds: 3 * 2 * macs."""
    return FWD_BWD_FACTOR * FMA_FLOPS * macs


def forward_flops(macs: float) -> float:
    """FLOPs of one forward pass of ``macs`` multiply-adds: 2 * macs."""
    return FMA_FLOPS * macs


def megatron_flops_per_token(m: ModelConfig, vocab: int) -> float:
    """Megatron-LM's training FLOPs per token (num_floating_point_operations / (B*s))."""
    macs = m.num_layers * layer_macs(m, m.seq_length) + logits_macs(m, vocab)
    return training_flops(macs)


def flops_6nd_per_token(n_params: float) -> float:
    """Kaplan et al. 2020 (eq. 2.1 ff.): C = 6*N per token, N the (active) parameters."""
    return 6.0 * n_params


def flops_per_token(cfg: Config) -> float:
    """Reported training FLOPs per token: Megatron's formula at the backend's vocabulary."""
    return megatron_flops_per_token(cfg.model, model_vocab_size(cfg))


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs per token of one transformer layer, split by the kind of kernel that runs them
    (the step-time model gives each kind its own rate)."""

    projections: float
    """Q, K, V and output projection GEMMs."""
    attention: float
    """QK^T and (QK^T)V: the fused attention kernel."""
    mlp: float
    """The MLP GEMMs; for MoE, the topk routed experts' (grouped GEMMs)."""

    @property
    def total(self) -> float:
        return self.projections + self.attention + self.mlp


def layer_training_flops(m: ModelConfig, seq_length: int) -> LayerFlops:
    """Training (forward + backward) FLOPs per token of one layer, by kernel kind: 3 * 2 * macs."""
    return LayerFlops(
        projections=training_flops(attention_projection_macs(m)),
        attention=training_flops(attention_core_macs(m, seq_length)),
        mlp=training_flops(mlp_macs(m)),
    )


def layer_recompute_flops(m: ModelConfig, seq_length: int, mode: Recompute) -> LayerFlops:
    """Extra (hardware, not model) FLOPs per token of one layer that activation recomputation costs.

    full: one more forward of the whole layer (Korthikanti et al. 2022, sec. 5:
    ~33% more compute); selective: one more forward of the attention core only
    (QK^T, softmax, (QK^T)V; Megatron-Core's default ``recompute_modules=[core_attn]``);
    none: nothing.
    """
    if mode == Recompute.full:
        return LayerFlops(projections=forward_flops(attention_projection_macs(m)),
                          attention=forward_flops(attention_core_macs(m, seq_length)),
                          mlp=forward_flops(mlp_macs(m)))
    if mode == Recompute.selective:
        return LayerFlops(projections=0.0, attention=forward_flops(attention_core_macs(m, seq_length)), mlp=0.0)
    return LayerFlops(projections=0.0, attention=0.0, mlp=0.0)


def logits_training_flops(m: ModelConfig, vocab: int) -> float:
    """Training FLOPs per token of the output layer: 3 * 2 * h*V."""
    return training_flops(logits_macs(m, vocab))


def flops_estimate(cfg: Config, d: Derived, n_active: float) -> dict:
    """The plan's ``flops`` block: per_token, per_step, total, and per_token_6nd beside them."""
    per_token = flops_per_token(cfg)
    return {
        "per_token": per_token,
        "per_step": per_token * d.tokens_per_step,
        "total": per_token * d.tokens,
        "per_token_6nd": flops_6nd_per_token(n_active),
    }
