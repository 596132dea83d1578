"""Scaling-law view of a run: tokens per parameter and the loss the Chinchilla fit predicts.

Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", eq. 10
(approach 3, parametric fit of the final loss):

    L(N, D) = E + A / N**alpha + B / D**beta

with E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28 (their MassiveText
data and tokenizer: the absolute loss does not transfer to other data, the
trend does). Compute-optimal training is near 20 tokens per parameter.

For MoE models N is the *active* parameter count: the fit was made on dense
models and has no term for total parameters, so this is a rough proxy.
"""

from __future__ import annotations

CHINCHILLA_E = 1.69
CHINCHILLA_A = 406.4
CHINCHILLA_B = 410.7
CHINCHILLA_ALPHA = 0.34
CHINCHILLA_BETA = 0.28


def chinchilla_loss(n_params: float, tokens: float) -> float:
    """Predicted final loss, Hoffmann et al. 2022 eq. 10 (N = 70e9, D = 1.4e12 gives 1.94)."""
    return (CHINCHILLA_E + CHINCHILLA_A / n_params**CHINCHILLA_ALPHA
            + CHINCHILLA_B / tokens**CHINCHILLA_BETA)


def scaling_estimate(n_params: float, tokens: float) -> dict:
    """The plan's ``scaling`` block for N parameters (active ones for MoE) and D tokens."""
    return {
        "tokens_per_param": tokens / n_params,
        "predicted_loss": chinchilla_loss(n_params, tokens) if tokens > 0 else None,
    }
