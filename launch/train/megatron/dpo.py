"""DPO on Megatron-Core: the frozen reference policy and the preference loss inside megatron-core's schedule.

A micro-batch holds ``mbs`` preference pairs as one batch of ``2 * mbs`` sequences, the
chosen ones first (``launch.train.dpo.split_pairs``), so the policy and the reference each run one forward
pass over both halves and the pipeline sends one tensor of ``[seq, 2 * mbs, hidden]``
between stages. A step is two passes of the same schedule
(``get_forward_backward_func``):

1. the reference (``build.build_frozen``: the policy's tp x pp x vpp layout, weights of
   ``stage.reference_checkpoint``, else ``stage.init_checkpoint``, found as
   ``preflight.resolve_reference`` finds them (a distributed checkpoint or a Hugging Face
   model), else the policy's initial weights) with ``forward_only=True`` under ``torch.no_grad``: each micro-batch's
   per-sequence log-probabilities, on the last pipeline stage, where its loss function runs;
2. the policy, whose loss function (last stage only) gets that micro-batch's reference
   log-probabilities through the data iterator (the fourth item of each batch: None on the
   other stages, which never compute a loss).

Per-token log-probabilities are megatron-core's own vocab-parallel cross entropy, negated:
the ``GPTModel`` returns it when given labels (``vocab_parallel_cross_entropy``: each tp
rank holds a slice of the vocabulary, and the log-softmax's max and sum are all-reduced
over the tp group), so no rank gathers the full logits. A sequence's log-probability is
their sum over its loss mask (the completion's tokens) with the count of those tokens, as
``launch.train.dpo.sequence_logps`` gives them from full logits; the loss itself is
``launch.train.dpo.dpo_loss``, shared with the DeepSpeed trainer (IPO averages per token there).

Each micro-batch's loss function returns (the sum of its pairs' losses, the number of
pairs, the report), so megatron-core divides by the pairs and by the micro-batches: the
gradient is that of the mean loss over the global batch, the dp average included. The
report is ``launch.train.dpo.pair_stats`` (loss, rewards, accuracy, pairs), summed over the
micro-batches and the data-parallel ranks like the pretraining loss.
"""

from __future__ import annotations

from functools import partial

import torch

from launch.train import guard
from launch.train.dpo import STAT_NAMES, dpo_loss, pair_stats, split_pairs, stats_metrics

WIDTH = len(STAT_NAMES)
"""The width of a step's report (``pair_stats``)."""


def sequence_logps(token_nll, mask):
    """(sum of log-probabilities over ``mask``, the tokens counted) per sequence, from megatron-core's
    per-token cross entropy ``[b, s]`` (``launch.train.dpo.sequence_logps`` takes full logits instead)."""
    weights = mask.float()
    return -(token_nll.float() * weights).sum(-1), weights.sum(-1)


def loss_of(total) -> float:
    """The mean DPO loss of a summed report."""
    return stats_metrics(total)["loss"]


class DpoObjective:
    """The reference model and the preference loss of one run (one per ``MegatronModule``)."""

    def __init__(self, *, doc: dict, stage, device, mbs: int, seq: int, source, hf_config):
        """``source``: ``preflight.resolve_reference``'s answer (a distributed checkpoint of any layout, or a
        Hugging Face model imported as ``stage.init_checkpoint`` is), None for the initial weights."""
        from launch.train.init_source import Format
        from launch.train.megatron import build, state

        self.reference = build.build_frozen(doc, device)
        self.source = source
        if source is not None and source.format is Format.hf:
            from launch.errors import UserError
            from launch.train.megatron import hf

            try:
                hf.load_hf(self.reference, source.path, hf_config())
            except hf.MappingError as exc:
                raise UserError(f"DPO's reference {source.path}: {exc}\n  fix: a Llama or Mixtral model of the "
                                "policy's shape") from None
        elif source is not None:
            state.load_weights(self.reference, source.path)
        self.beta, self.loss_type = float(stage.dpo_beta), stage.dpo_loss.value
        self.position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(2 * mbs, -1)

    def describe(self) -> str:
        where = self.source.path if self.source else "the initial weights (stage.from_scratch)"
        return f"DPO {self.loss_type}, beta {self.beta:g}, against a frozen reference from {where}"

    # --- the two passes -----------------------------------------------------------------------

    def batches(self, schedule, batches: list) -> list:
        """``batches`` of pairs ([mbs, 2, seq] each) as the policy's: (tokens, labels, mask) of ``2 * mbs``
        rows and the reference's (log-prob sums, token counts) ``[2, 2 * mbs]`` (None off the last stage)."""
        rows = [split_pairs(*b) for b in batches]
        with torch.no_grad():
            out = schedule(self.reference, self._reference_step, rows, forward_only=True)
        refs = [item["logps"] for item in out] if out else [None] * len(rows)
        return [(*b, ref) for b, ref in zip(rows, refs)]

    def _reference_step(self, data_iterator, model):
        tokens, labels, mask = next(data_iterator)
        output = model(tokens, self.position_ids, None, labels=labels)
        return output, partial(_reference_loss_func, mask)

    def policy_step(self, fault, here: bool):
        """The policy's forward step over ``batches``' items; ``fault``: a test-only fault on this step."""
        def step(data_iterator, model):
            tokens, labels, mask, ref = next(data_iterator)
            output = model(tokens, self.position_ids, None, labels=labels)
            return output, partial(self._loss_func, mask, ref, fault, here)
        return step

    def _loss_func(self, mask, ref, fault, here, output):
        """One micro-batch's DPO loss on the last stage: (the sum over its pairs, the pairs, the report)."""
        logps, counts = sequence_logps(output, mask)
        n = logps.shape[0] // 2
        ref_logps = ref[0]
        mean, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta=self.beta,
                                          loss_type=self.loss_type, chosen_tokens=counts[:n],
                                          rejected_tokens=counts[n:])
        loss = guard.apply_fault(mean * n, fault, here=here)
        return loss, torch.tensor(n, dtype=torch.int), {"lm loss": pair_stats(loss / n, chosen, rejected)}


def _reference_loss_func(mask, output):
    """Forward-only: the sequences' log-probabilities, collected by the schedule (the loss is not used)."""
    logps, counts = sequence_logps(output.detach(), mask)
    return logps.sum(), torch.tensor(1, dtype=torch.int), {"logps": torch.stack([logps, counts])}
