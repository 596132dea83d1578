"""The training objective: next-token cross-entropy over the unmasked tokens, plus an optional z-loss.

z-loss (PaLM, Chowdhery et al. 2022, sec. 5) adds ``z * log(Z)^2`` per token,
where ``log Z = logsumexp(logits)`` is the softmax's log-normaliser: it pulls
log Z towards 0, which keeps the output logits from drifting in long bf16 runs.
"""

from __future__ import annotations


def lm_loss(logits, labels, mask, z_loss: float = 0.0):
    """(objective, cross-entropy): both the mean over tokens where ``mask`` is 1."""
    import torch
    import torch.nn.functional as F

    flat = logits.float().reshape(-1, logits.size(-1))
    weights = mask.reshape(-1).float()
    count = weights.sum().clamp(min=1.0)
    ce = (F.cross_entropy(flat, labels.reshape(-1), reduction="none") * weights).sum() / count
    if not z_loss:
        return ce, ce
    log_z = torch.logsumexp(flat, dim=-1)
    return ce + z_loss * (log_z.square() * weights).sum() / count, ce
