"""The training objective (launch/train/loss.py) against torch's own cross-entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from launch.train.loss import lm_loss


def test_without_z_loss_it_is_the_masked_mean_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0  # padding / prompt tokens carry no loss
    objective, ce = lm_loss(logits, labels, mask)
    keep = mask.bool()
    assert torch.allclose(objective, F.cross_entropy(logits[keep], labels[keep]))
    assert objective is ce


def test_z_loss_adds_the_squared_log_normaliser() -> None:
    torch.manual_seed(1)
    logits, labels, mask = torch.randn(1, 4, 7) + 3.0, torch.randint(0, 7, (1, 4)), torch.ones(1, 4)
    objective, ce = lm_loss(logits, labels, mask, z_loss=1e-4)
    log_z = torch.logsumexp(logits[0], dim=-1)
    assert math.isclose(float(objective - ce), 1e-4 * float(log_z.square().mean()), rel_tol=1e-3)  # float32 difference
    assert float(objective) > float(ce)  # logits shifted by +3: log Z is far from 0, so the penalty shows
