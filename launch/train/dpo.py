"""The DPO objective, written once for every engine: sequence log-probabilities and the preference loss.

Direct preference optimisation (Rafailov et al. 2023) trains a policy pi on pairs (prompt x, chosen
y_w, rejected y_l) against a frozen reference pi_ref. With the implicit reward
``r(y) = beta * (log pi(y|x) - log pi_ref(y|x))`` (the *log-ratio* times beta) and the margin
``m = r(y_w) - r(y_l)`` divided by beta, the per-pair losses are, as TRL 1.16 computes them
(``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss``, ``f_divergence_type="reverse_kl"``):

- ``sigmoid``: ``-log sigmoid(beta * m)`` (Rafailov et al. 2023, eq. 7);
- ``hinge``: ``relu(1 - beta * m)`` (SLiC, Zhao et al. 2023);
- ``ipo``: ``(m_avg - 1 / (2 beta))^2`` (Azar et al. 2023, eq. 17), where TRL takes each log-ratio
  *per completion token* (the summed log-ratio divided by the sequence's completion tokens), which
  makes beta independent of the completion length.

The batch loss is the mean over pairs. The rewards returned (and logged as ``rewards/chosen``,
``rewards/rejected``, their margin and accuracy, the share of pairs with chosen > rejected) are
``beta * log-ratio`` of the *summed* log-probabilities for every loss type, as TRL logs them.

How the callers (the DeepSpeed and the Megatron-Core trainers) use this: each runs the policy (with
gradients) and the reference (without) on the chosen and the rejected sequences, takes
``sequence_logps`` of each (summed over the completion tokens, with their count), and calls
``dpo_loss`` with the sums; for ``ipo`` they also pass ``chosen_tokens`` and ``rejected_tokens``
(the counts), and ``dpo_loss`` averages per token itself. A caller may instead pass log-probs that
are already averaged per token and leave the counts out: the loss is then the same, the rewards
are per token.

Tested against TRL's own ``_compute_loss`` on the same model and batch (tests/test_train_dpo.py).
"""

from __future__ import annotations

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
STAT_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
"""The metrics a DPO step logs (TRL's names), from ``pair_stats`` summed over micro-batches and ranks."""


def sequence_logps(logits, labels, loss_mask):
    """(sum of log p(label) over the positions where ``loss_mask`` is 1, how many such positions), per sequence.

    ``logits`` [B, S, V] predict ``labels`` [B, S] (the tokens shifted by one, as every sample of
    ``launch.train.chat`` / ``launch.train.preference`` holds them); ``loss_mask`` [B, S] is 1 on the
    completion's tokens. Computed in float32 (log-softmax through cross-entropy, which never builds the
    [B, S, V] log-probabilities twice). Returns two [B] float32 tensors.
    """
    import torch.nn.functional as F

    mask = loss_mask.float()
    flat = logits.float().reshape(-1, logits.size(-1))
    token_logps = -F.cross_entropy(flat, labels.reshape(-1), reduction="none").view_as(mask)
    return (token_logps * mask).sum(dim=-1), mask.sum(dim=-1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float, loss_type: str, chosen_tokens=None, rejected_tokens=None):
    """(mean loss over the pairs, chosen rewards [B], rejected rewards [B]); rewards detached.

    The log-probs are per-sequence sums over the completion (``sequence_logps``), [B] each.
    ``loss_type``: ``sigmoid``, ``ipo`` or ``hinge`` (``stage.dpo_loss``). For ``ipo``, pass the
    completion token counts (``chosen_tokens``, ``rejected_tokens``: [B], ``sequence_logps``' second
    value) and the log-ratios are averaged per token, as TRL does; without them the log-probs given
    are taken as already averaged.
    """
    import torch
    import torch.nn.functional as F

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    elif loss_type == "ipo":
        chosen_avg, rejected_avg = chosen_logratios, rejected_logratios
        if chosen_tokens is not None:
            chosen_avg = chosen_logratios / chosen_tokens.clamp(min=1.0)
        if rejected_tokens is not None:
            rejected_avg = rejected_logratios / rejected_tokens.clamp(min=1.0)
        per_pair = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"stage.dpo_loss={loss_type!r}: not one of {', '.join(LOSS_TYPES)}")
    return per_pair.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def pair_stats(loss, chosen_rewards, rejected_rewards):
    """One micro-batch's figures as a float64 tensor to sum over micro-batches and ranks:
    [loss * pairs, sum chosen reward, sum rejected reward, pairs chosen > rejected, pairs]."""
    import torch

    n = chosen_rewards.numel()
    return torch.stack([loss.detach().double() * n, chosen_rewards.double().sum(), rejected_rewards.double().sum(),
                        (chosen_rewards > rejected_rewards).double().sum(),
                        torch.tensor(float(n), dtype=torch.float64, device=chosen_rewards.device)])


def stats_metrics(summed) -> dict[str, float]:
    """The logged metrics (``STAT_NAMES``) of ``pair_stats`` summed over micro-batches and ranks: means per pair."""
    loss, chosen, rejected, correct, n = (float(x) for x in summed)
    n = max(n, 1.0)
    return dict(zip(STAT_NAMES, (loss / n, chosen / n, rejected / n, (chosen - rejected) / n, correct / n)))


def split_pairs(tokens, labels, loss_mask):
    """A micro-batch of preference samples ([B, 2, S] each: row 0 chosen, row 1 rejected) as one [2B, S]
    batch of the chosen sequences then the rejected ones (TRL's order: one forward pass for both)."""
    return tuple(t.transpose(0, 1).reshape(-1, t.size(-1)) for t in (tokens, labels, loss_mask))
