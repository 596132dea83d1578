"""DPO on the DeepSpeed engine: ``DpoDeepSpeedModule``, the policy of ``DeepSpeedModule`` plus a frozen reference.

The skeleton (``launch.train.loop``) runs DPO as any stage: checkpoints, resume, stop signals, the
guard and the export are its own. What differs is the step's objective and a second engine:

- The reference policy is a second ``deepspeed.initialize`` with ``RUN_DIR/ds_reference_config.json``
  (``launch.backends.deepspeed.to_deepspeed_reference``: the policy's batch and precision, ZeRO-3
  partitioning when the policy has it, no optimizer section): given no optimizer, DeepSpeed builds
  an inference engine, weights only (no gradients, no optimizer state), as TRL's
  ``prepare_deepspeed`` does for its reference model. Its weights come from
  ``stage.reference_checkpoint``, else ``stage.init_checkpoint`` (the Hugging Face model each leads to:
  ``launch.train.preflight.resolve_reference``);
  with ``stage.from_scratch=true`` it is a copy of the policy's initial weights, so both start
  equal. It is never saved: a resumed job loads it again from the same place.
- A micro-batch of preference samples ``[mbs, 2, S]`` becomes one ``[2 mbs, S]`` batch (chosen rows,
  then rejected: ``launch.train.dpo.split_pairs``); the policy runs it with gradients and the
  reference without; ``launch.train.dpo`` turns their sequence log-probabilities into the loss
  (``stage.dpo_loss``, ``stage.dpo_beta``) and the figures logged beside it (rewards of the chosen and
  the rejected, their margin, the share of pairs ranked right).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from launch.config.schema import BackendName
from launch.record.read import PlanNumbers, RunConfig, read_backend_file
from launch.train.deepspeed_trainer import DeepSpeedModule
from launch.train.dpo import dpo_loss, pair_stats, sequence_logps, split_pairs, stats_metrics
from launch.train.preflight import ENGINES, resolve_reference

REFERENCE_CONFIG = "ds_reference_config.json"


class DpoDeepSpeedModule(DeepSpeedModule):
    def __init__(self, run_dir: Path, record: RunConfig, plan: PlanNumbers):
        super().__init__(run_dir, record, plan)
        cfg = record.cfg
        self.beta, self.loss_type = float(cfg.stage.dpo_beta), cfg.stage.dpo_loss.value
        source = resolve_reference(cfg, ENGINES[BackendName.deepspeed])  # what preflight checked
        self.reference_from = str(source.path) if source else None
        ref_config = read_backend_file(run_dir, REFERENCE_CONFIG)
        self.reference = _reference_engine(ref_config, self.reference_from, self.engine.module)
        self.ref_zero = ref_config.get("zero_optimization", {}).get("stage", 0)
        self._stats = None

    def describe(self) -> str:
        source = self.reference_from or "the policy's initial weights (stage.from_scratch)"
        return (f"{super().describe()}; DPO ({self.loss_type}, beta {self.beta:g}) against a frozen reference "
                f"from {source} (ZeRO {self.ref_zero}, weights only)")

    def _loss(self, tokens, labels, mask):
        """The DPO loss of one micro-batch of pairs; its figures are added to ``self._stats``."""
        tokens, labels, mask = split_pairs(tokens, labels, mask)
        logps, counts = sequence_logps(self.engine(input_ids=tokens).logits, labels, mask)
        with torch.no_grad():
            ref_logps, _ = sequence_logps(self.reference(input_ids=tokens).logits, labels, mask)
        pairs = logps.size(0) // 2
        loss, chosen, rejected = dpo_loss(logps[:pairs], logps[pairs:], ref_logps[:pairs], ref_logps[pairs:],
                                          beta=self.beta, loss_type=self.loss_type,
                                          chosen_tokens=counts[:pairs], rejected_tokens=counts[pairs:])
        stats = pair_stats(loss, chosen, rejected)
        self._stats = stats if self._stats is None else self._stats + stats
        return loss

    def train_step(self, step: int, batches: list):
        self._stats = None
        item, lr, grad_norm = super().train_step(step, batches)
        return (item, self._stats), lr, grad_norm

    def eval_step(self, batches: list):
        self._stats = None
        return super().eval_step(batches), self._stats

    def mean_loss(self, items: list) -> float:
        """The mean DPO loss per pair over the items and every rank."""
        return self.window_metrics(items)["loss"]

    def window_metrics(self, items: list) -> dict[str, float]:
        """Loss, rewards of the chosen and the rejected, their margin and the accuracy: means per pair, all ranks."""
        summed = torch.stack([stats for _, stats in items]).sum(dim=0).to(self.device)
        dist.all_reduce(summed)
        return stats_metrics(summed.tolist())


def _reference_engine(ref_config: dict, source: str | None, policy):
    """The frozen reference policy as an inference-only DeepSpeed engine (no optimizer: weights only)."""
    from transformers import AutoModelForCausalLM

    if source:
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=torch.float32)
    else:  # stage.from_scratch: a copy of the policy's initial weights
        model = AutoModelForCausalLM.from_config(policy.config, dtype=torch.float32)
        _copy_weights(policy, model)
    model.config.use_cache = False
    model.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, config=dict(ref_config))
    engine.eval()
    return engine


def _copy_weights(source, target) -> None:
    """``source``'s parameters (partitioned or not) into ``target``'s, one gathered parameter at a time.

    A copy, not a second model drawn from the same seed: equal whatever random numbers the first build drew."""
    targets = dict(target.named_parameters())
    with torch.no_grad():
        for name, param in source.named_parameters():
            gather = (deepspeed.zero.GatheredParameters([param]) if hasattr(param, "ds_id")
                      else contextlib.nullcontext())
            with gather:
                targets[name].copy_(param.data.to(targets[name].dtype))
