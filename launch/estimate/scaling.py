"""Scaling laws: the loss a run should reach, and how to split a compute budget.

The parametric law of Hoffmann et al. 2022, "Training Compute-Optimal Large
Language Models" (arXiv:2203.15556), eq. 2 (approach 3):

    L(N, D) = E + A / N**alpha + B / D**beta

for N parameters trained on D tokens, with two published fits
(``estimate.scaling_law`` / ``trainctl size scaling_law=...``):

    chinchilla  Hoffmann et al. 2022, appendix D.2, eq. 10, as printed:
                E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28
    besiroglu   Besiroglu et al. 2024, "Chinchilla Scaling: A replication
                attempt" (arXiv:2404.10102), the same data re-fitted:
                E = 1.8172, A = 482.01, B = 2085.43, alpha = 0.3478, beta = 0.3658

The two fits predict similar losses near Chinchilla itself but split a budget
differently: minimised under C = 6ND, the printed fit puts Chinchilla's budget
(5.76e23 FLOPs) into a 32B model on 3.0T tokens (~90 tokens per parameter),
the re-fit into 72B on 1.3T (~18), which agrees with Hoffmann et al.'s own
approaches 1 and 2 and with the 70B / 1.4T Chinchilla they trained. Absolute
losses belong to their MassiveText data and tokenizer; trends transfer, levels do not.

For MoE models N is the *active* parameter count: the fits were made on dense
models and have no term for total parameters, so this is a rough proxy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from launch.config.schema import Config, ScalingLaw

PF_DAY_FLOPS = 1e15 * 86400
"""One petaflop/s-day, Kaplan et al.'s unit of compute."""


@dataclass(frozen=True)
class LossFit:
    """L(N, D) = E + A / N**alpha + B / D**beta (Hoffmann et al. 2022, eq. 2)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n_params: float, tokens: float) -> float:
        return self.E + self.A / n_params**self.alpha + self.B / tokens**self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L under C = 6ND (Hoffmann et al. 2022, eq. 4):

        N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, G = (alpha A / (beta B))^(1/(alpha+beta)),
        a = beta / (alpha+beta), b = alpha / (alpha+beta).
        """
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        return g * (flops / 6) ** (self.beta / s), (flops / 6) ** (self.alpha / s) / g

    def params_floor(self, loss: float) -> float:
        """The N below which ``loss`` is out of reach however long one trains (D -> infinity)."""
        excess = loss - self.E
        return (self.A / excess) ** (1 / self.alpha) if excess > 0 else math.inf

    def tokens_to_reach(self, n_params: float, loss: float) -> float:
        """The D at which N parameters reach ``loss`` (infinity at or below the floor)."""
        left = loss - self.E - self.A / n_params**self.alpha
        return (self.B / left) ** (1 / self.beta) if left > 0 else math.inf

    def params_for_loss(self, loss: float) -> float:
        """N of the compute-optimal model that reaches ``loss``.

        Minimising 6ND on the curve L = loss gives alpha A/N^alpha = beta B/D^beta
        (the same stationarity condition as eq. 4), so the model term is
        beta/(alpha+beta) of the reducible loss.
        """
        excess = loss - self.E
        if excess <= 0:
            return math.inf
        return (self.A * (self.alpha + self.beta) / (self.beta * excess)) ** (1 / self.alpha)


FITS: dict[ScalingLaw, LossFit] = {
    ScalingLaw.chinchilla: LossFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    ScalingLaw.besiroglu: LossFit(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
}


def chinchilla_loss(n_params: float, tokens: float) -> float:
    """Predicted final loss, Hoffmann et al. 2022 eq. 10 (N = 70e9, D = 1.4e12 gives 1.94)."""
    return FITS[ScalingLaw.chinchilla].loss(n_params, tokens)


def kaplan_optimal(flops: float) -> tuple[float, float]:
    """(N, D) by Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (arXiv:2001.08361),
    sec. 6.1, fig. 14: N_opt = 1.3e9 (C / PF-day)^0.73, D = C / 6N.

    For comparison only: Kaplan's N excludes embeddings and comes from models
    trained short of convergence; Hoffmann et al. 2022 explain why it
    overweights model size.
    """
    n = 1.3e9 * (flops / PF_DAY_FLOPS) ** 0.73
    return n, flops / (6 * n)


def lifetime_flops(n_params: float, tokens: float, inference_tokens: float) -> float:
    """Training 6ND plus inference 2N per token served (Sardana et al. 2024)."""
    return 6 * n_params * tokens + 2 * n_params * inference_tokens


def inference_optimal(fit: LossFit, loss: float, inference_tokens: float) -> tuple[float, float]:
    """(N, D) with the fewest lifetime FLOPs 6ND + 2N D_inf among models that reach ``loss``.

    Sardana et al. 2024, "Beyond Chinchilla-Optimal: Accounting for Inference in
    Language Model Scaling Laws" (arXiv:2401.00448): along the curve
    L(N, D) = loss, D(N) falls as N grows; training cost is least at the
    compute-optimal N, and serving adds 2N per token, so the optimum is a
    smaller model trained on more tokens. Found numerically: a log-spaced scan
    of N between the floor and the compute-optimal N, refined by golden section.
    """
    top = fit.params_for_loss(loss)
    if inference_tokens <= 0 or not math.isfinite(top):
        return top, fit.tokens_to_reach(top, loss)

    def cost(log_n: float) -> float:
        n = math.exp(log_n)
        return lifetime_flops(n, fit.tokens_to_reach(n, loss), inference_tokens)

    lo, hi = math.log(fit.params_floor(loss)), math.log(top)
    grid = [lo + (hi - lo) * i / 400 for i in range(1, 401)]
    best = min(range(len(grid)), key=lambda i: cost(grid[i]))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if cost(c) < cost(d):
            b = d
        else:
            a = c
    n = math.exp((a + b) / 2)
    return n, fit.tokens_to_reach(n, loss)


def scaling_estimate(cfg: Config, n_active: float, tokens: float) -> dict:
    """The plan's ``scaling`` block for N parameters (active ones for MoE) and D tokens,
    under ``cfg.estimate.scaling_law``."""
    fit = FITS[cfg.estimate.scaling_law]
    return {
        "tokens_per_param": tokens / n_active,
        "predicted_loss": fit.loss(n_active, tokens) if tokens > 0 else None,
    }
