"""The numbers that follow from a config, computed here and nowhere else.

dp, gradient-accumulation steps, tokens per step, steps from tokens and the
layers on each pipeline stage are read by the validator, the estimator, the
backend translators and the trainer; each reads them from ``Derived``.

``derive`` never raises on a bad layout: it rounds down so the validator can
report every broken equation at once, with the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch.config.rampup import Rampup, micro_batches, schedule
from launch.config.schema import Config, MfuBasis, Precision


@dataclass(frozen=True)
class Derived:
    world_size: int
    """cluster.nodes * cluster.gpus_per_node."""
    dp: int
    """Data-parallel replicas: world / (tp * pp * cp)."""
    dense_dp: int
    """Ranks the dense gradients and optimizer state are sharded over: dp * cp
    (Megatron's data-parallel group includes the context-parallel ranks)."""
    etp: int
    """Tensor parallel size inside experts (parallel.etp, or tp)."""
    expert_dp: int
    """Data-parallel replicas of each expert: world / (ep * etp * pp)."""
    sequence_parallel: bool
    grad_accum_steps: int
    """Micro-batches per optimizer step on each replica: gbs / (mbs * dp)."""
    tokens_per_step: int
    steps: int
    tokens: int
    """Tokens the run trains on (train.tokens, or the steps' samples * seq_length)."""
    samples: int
    """Sequences the run trains on: steps * global batch, less what a batch ramp-up skips."""
    stage_layers: tuple[int, ...]
    """Transformer layers on each pipeline rank, first to last."""
    lr: float
    """Peak learning rate: stage.lr when set, else optim.lr."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def stage_layers(num_layers: int, pp: int, first: int | None, last: int | None,
                 embedding_as_layer: bool, loss_as_layer: bool) -> tuple[int, ...]:
    """Transformer layers per pipeline rank, as Megatron-Core assigns them.

    Explicit first/last stage sizes (``--decoder-first/last-pipeline-num-layers``)
    pin those stages and split the rest evenly. ``account_for_embedding/loss``
    count the embedding and the loss as one layer each of the first and last
    stage, so 126 layers + 2 = 128 = 16 stages x 8. When layers do not divide,
    the remainder goes to the middle stages (the validator reports it).
    """
    pp = max(pp, 1)
    if pp == 1:
        return (num_layers,)
    if first is not None or last is not None:
        pinned = [first, last]
        middle_stages = pp - sum(x is not None for x in pinned)
        rest = num_layers - (first or 0) - (last or 0)
        middle = _even_split(rest, middle_stages)
        head = [first] if first is not None else []
        tail = [last] if last is not None else []
        return tuple(head + middle + tail)
    extra_first, extra_last = int(embedding_as_layer), int(loss_as_layer)
    slots = _even_split(num_layers + extra_first + extra_last, pp)
    slots[0] -= extra_first
    slots[-1] -= extra_last
    return tuple(slots)


def _even_split(n: int, parts: int) -> list[int]:
    if parts <= 0:
        return []
    base, rem = divmod(max(n, 0), parts)
    # Remainder on the middle stages: the first and last carry embedding/loss.
    order = sorted(range(parts), key=lambda i: (i in (0, parts - 1), i))
    out = [base] * parts
    for i in order[:rem]:
        out[i] += 1
    return out


def mfu_peak_tflops(cfg: Config) -> float:
    """The per-GPU peak MFU is quoted against, in TFLOP/s: dense BF16 (the convention, Chowdhery
    et al. 2022, appendix B), or dense FP8 with estimate.mfu_basis=fp8.

    The plan's MFU (``estimate.perf``) and the trainer's measured MFU (``train.metrics``)
    both divide by this number, so the two are comparable.
    """
    gpu = cfg.cluster.gpu
    return float(gpu.peak_fp8_tflops if cfg.estimate.mfu_basis == MfuBasis.fp8 else gpu.peak_bf16_tflops)


def pipeline_split(layers: int, pp: int, vpp: int) -> dict | None:
    """How ``layers`` go onto pp stages of vpp chunks each, as parallel keys; None if they cannot.

    In order of preference: an even split; counting the embedding and the loss as one
    layer each (Megatron's ``account_for_*_in_pipeline_split``: 126 + 2 = 128 = 16 x 8
    for Llama 3 405B), or the loss alone; else explicit first and last stages lighter
    than the middle ones (``--decoder-first/last-pipeline-num-layers``), which carry
    the embedding and the output layer.
    """
    chunks = pp * vpp
    if pp == 1:
        return {} if vpp == 1 else None
    if layers % chunks == 0:
        return {}
    return uneven_split(layers, pp, vpp)


def uneven_split(layers: int, pp: int, vpp: int) -> dict | None:
    """The parallel keys of a split Megatron accepts when ``layers`` do not divide into pp*vpp
    chunks (the same order as ``pipeline_split``), or None. ``tune`` places layers with it and
    the validator proposes it as the fix of a split that does not add up.
    """
    chunks = pp * vpp
    if (layers + 2) % chunks == 0:
        return {"account_for_embedding_in_pipeline_split": True, "account_for_loss_in_pipeline_split": True}
    if (layers + 1) % chunks == 0:
        return {"account_for_loss_in_pipeline_split": True}
    uneven = uneven_first_last(layers, pp, vpp)
    if uneven is None:
        return None
    first, last = uneven
    return {"num_layers_in_first_pipeline_stage": first, "num_layers_in_last_pipeline_stage": last}


def uneven_first_last(layers: int, pp: int, vpp: int) -> tuple[int, int] | None:
    """(first, last): pp-2 middle stages of ceil(layers/pp) layers (rounded up to a multiple of
    vpp) and the rest shared by the first and last stages, each a positive multiple of vpp
    no larger than a middle stage; None when no such split exists."""
    if pp < 3:
        return None
    per = -(-layers // pp)
    per += (-per) % vpp
    rest = layers - per * (pp - 2)
    first = rest // 2 - (rest // 2) % vpp
    last = rest - first
    if 0 < first <= per and 0 < last <= per and last % vpp == 0:
        return first, last
    return None


def derive(cfg: Config) -> Derived:
    p, c, t, m = cfg.parallel, cfg.cluster, cfg.train, cfg.model
    world = c.nodes * c.gpus_per_node
    model_parallel = max(p.tp * p.pp * p.cp, 1)
    dp = max(world // model_parallel, 1)
    etp = p.etp if p.etp is not None else p.tp
    expert_dp = max(world // max(p.ep * etp * p.pp, 1), 1)
    sp = p.sequence_parallel
    # auto: on when tp > 1, except fp32 (CPU) runs, whose megatron-core norms cannot do it (backend_rules.py)
    sequence_parallel = (p.tp > 1 and t.precision != Precision.fp32) if sp == "auto" else bool(sp)
    grad_accum = micro_batches(t.global_batch_size, p.micro_batch_size, dp)
    tokens_per_step = t.global_batch_size * m.seq_length
    ramp = Rampup.of(t.rampup_batch_size)
    if t.tokens is not None:
        steps, samples = schedule(t.global_batch_size, ramp, samples=_ceil_div(t.tokens, max(m.seq_length, 1)))
        tokens = t.tokens
    else:
        steps, samples = schedule(t.global_batch_size, ramp, steps=t.steps or 0)
        tokens = samples * m.seq_length
    layers = stage_layers(
        m.num_layers, p.pp,
        p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage,
        p.account_for_embedding_in_pipeline_split, p.account_for_loss_in_pipeline_split,
    )
    lr = cfg.stage.lr if cfg.stage.lr is not None else cfg.optim.lr
    return Derived(
        world_size=world, dp=dp, dense_dp=dp * max(p.cp, 1), etp=etp, expert_dp=expert_dp,
        sequence_parallel=sequence_parallel, grad_accum_steps=grad_accum,
        tokens_per_step=tokens_per_step, steps=steps, tokens=tokens, samples=samples,
        stage_layers=layers, lr=lr,
    )
