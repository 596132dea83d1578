"""``trainctl tune``: search the parallel layouts of a model on a cluster with the estimator.

Why analytic: picking TP/PP/VPP/CP/EP, micro batch and recompute by grid of real
jobs costs a queue wait per point; the estimator answers the same question for
every layout in seconds, and probe jobs (``launch/verbs/probe.py``) then check the few
best on the real cluster.

The search, one layout at a time (``layouts``), each judged like ``trainctl plan``
judges a config (``judge``):

1. enumerate: tp over the divisors of the GPUs per node; cp over powers of two
   keeping at least ``tune.min_tokens_per_cp_rank`` tokens per rank; pp over the
   divisors of world/(tp*cp) up to the layer count; vpp wherever the layers split
   into pp*vpp chunks, evenly, by counting the embedding and the loss as layers,
   or with lighter first and last stages (``pipeline_split``); ep over the
   divisors of the expert count (MoE); micro batch sizes dividing the per-replica
   batch, up to ``tune.max_micro_batch_size``; recompute none/selective/full;
   the distributed optimizer on and off (Megatron) or ZeRO stages 0-3 (DeepSpeed);
2. reject what the validator rejects (the same rules as ``plan``), then what the
   memory estimate says does not fit in HBM;
3. rank the rest by predicted step time (the same world and batch, so the same
   order as tokens/s/GPU and MFU), ties to less memory, then to the smaller
   model-parallel group.

Everything else in the config (model, cluster, batch, sequence, precision,
backend) is the user's; only ``parallel.*`` changes.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from launch.config import Config, Derived, derive
from launch.config.derive import pipeline_split
from launch.config.schema import BackendName, ParallelConfig, Recompute
from launch.config.validate import divisors, validate
from launch.errors import UserError
from launch.estimate.calibration import Calibration, load_calibration
from launch.estimate.flops import flops_per_token
from launch.estimate.memory import memory_estimate
from launch.estimate.perf import StepTerms, step_terms, throughput_estimate

SPLIT_KEYS = ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split",
              "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage")
"""The parallel keys that place layers on pipeline stages (``pipeline_split``)."""

LAYOUT_PROBLEM_KEYS = ("parallel.", "dp", "grad_accum_steps", "world_size")
"""A validation problem naming one of these keys is the layout's; any other is the config's own."""


# ---- the layouts -------------------------------------------------------------------------

def _powers_of_two(limit: int) -> list[int]:
    out, k = [], 1
    while k <= limit:
        out.append(k)
        k *= 2
    return out


def layouts(cfg: Config, world: int) -> Iterator[ParallelConfig]:
    """Every layout ``tune`` considers for ``cfg``'s model, cluster and batch on ``world`` GPUs (module
    docstring, step 1). Only the structure is enumerated here; whether a layout is legal is the validator's call.
    """
    m, c, t, tune = cfg.model, cfg.cluster, cfg.train, cfg.tune
    megatron = cfg.backend.name == BackendName.megatron
    base = dataclasses.replace(cfg.parallel, sequence_parallel="auto", etp=None, vpp=1, ep=1,
                               **{k: None if k.startswith("num_") else False for k in SPLIT_KEYS})
    tps = divisors(c.gpus_per_node) if megatron else [1]
    cps = [cp for cp in _powers_of_two(max(m.seq_length // max(tune.min_tokens_per_cp_rank, 1), 1)) if world % cp == 0]
    eps = divisors(m.num_experts) if m.num_experts and megatron else [1]
    recomputes = list(Recompute) if megatron else [Recompute.none, Recompute.full]
    optimizers = ([{"distributed_optimizer": True}, {"distributed_optimizer": False}] if megatron
                  else [{"zero_stage": z} for z in (0, 1, 2, 3)])
    for tp in tps:
        for cp in cps:
            if world % (tp * cp):
                continue
            pps = [pp for pp in divisors(world // (tp * cp)) if pp <= m.num_layers] if megatron else [1]
            for pp in pps:
                dp = world // (tp * cp * pp)
                for vpp in range(1, max((m.num_layers + 2) // pp, 1) + 1):  # +2: embedding, loss as layers
                    split = pipeline_split(m.num_layers, pp, vpp)
                    if split is None:
                        continue
                    for ep in eps:
                        if world % (ep * tp * pp):
                            continue
                        for mbs in _micro_batch_sizes(t.global_batch_size, dp, tune.max_micro_batch_size):
                            for recompute in recomputes:
                                for optimizer in optimizers:
                                    yield dataclasses.replace(base, tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep,
                                                              micro_batch_size=mbs, recompute=recompute,
                                                              **optimizer, **split)


def _micro_batch_sizes(global_batch: int, dp: int, largest: int) -> list[int]:
    """Micro batch sizes dividing the per-replica batch; [1] when dp does not divide the
    global batch (the validator then says so)."""
    if global_batch % dp:
        return [1]
    return [b for b in divisors(global_batch // dp) if b <= largest] or [1]


# ---- judging one layout -------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One layout and what the estimator says of it."""

    parallel: ParallelConfig
    derived: Derived
    memory: dict | None = None
    """plan.json's ``memory_gib`` block; None when the validator rejected the layout."""
    throughput: dict | None = None
    """plan.json's ``throughput`` block; None when rejected."""
    rejected: str | None = None
    """Why the layout cannot run: the validator's problems, or the memory estimate."""

    @property
    def step_s(self) -> float:
        return self.throughput["step_time_s"] if self.throughput else float("inf")

    def sort_key(self) -> tuple:
        p = self.parallel
        return (self.step_s, self.memory["per_gpu_peak"] if self.memory else 0.0, p.tp * p.pp * p.cp * p.ep,
                p.vpp, p.micro_batch_size)


def judge(cfg: Config, parallel: ParallelConfig, flops_per_step: float, calibration: Calibration) -> Candidate:
    """``parallel`` in place of ``cfg.parallel``: validated, then its memory, then its step time."""
    variant = dataclasses.replace(cfg, parallel=parallel)
    d = derive(variant)
    problems = validate(variant, d)
    if problems:
        return Candidate(parallel, d, rejected="; ".join(str(p).splitlines()[0] for p in problems))
    memory, _ = memory_estimate(variant, d, calibration)
    if not memory["fits"]:
        return Candidate(parallel, d, memory=memory,
                         rejected=f"memory: needs {memory['per_gpu_peak']:.1f} GiB, the GPU has {memory['hbm']:.1f}")
    return Candidate(parallel, d, memory=memory, throughput=throughput_estimate(variant, d, flops_per_step, calibration))


@dataclass(frozen=True)
class Search:
    cfg: Config
    ranked: list[Candidate]
    """The layouts that fit, fastest first."""
    rejected: list[Candidate]
    current: Candidate
    """The config's own layout, judged the same way."""
    seconds: float
    calibration: Calibration
    """``cluster.calibration``'s ratios, which every candidate's estimate includes."""


def search(cfg: Config) -> Search:
    """Judge every layout of ``layouts(cfg)`` and rank those that fit (module docstring)."""
    d = derive(cfg)
    _check_searchable(cfg, d)
    calibration = load_calibration(cfg)  # read once for the thousands of candidates
    start = time.perf_counter()
    flops_per_step = flops_per_token(cfg) * d.tokens_per_step  # as the plan's flops block counts it
    seen: dict[tuple, Candidate] = {}
    for parallel in layouts(cfg, d.world_size):
        key = _identity(parallel)
        if key not in seen:
            seen[key] = judge(cfg, parallel, flops_per_step, calibration)
    current = seen.get(_identity(cfg.parallel)) or judge(cfg, cfg.parallel, flops_per_step, calibration)
    judged = list(seen.values())
    ranked = sorted((c for c in judged if c.rejected is None), key=Candidate.sort_key)
    rejected = [c for c in judged if c.rejected is not None]
    return Search(cfg, ranked, rejected, current, time.perf_counter() - start, calibration)


def _identity(parallel: ParallelConfig) -> tuple:
    """Equal layouts, equal tuples (``dataclasses.astuple`` deep-copies: too slow for thousands)."""
    return tuple(vars(parallel).values())


def _check_searchable(cfg: Config, d: Derived) -> None:
    """Refuse what no layout can mend: problems of the config itself, or a step time that ignores the layout."""
    if cfg.estimate.mfu is not None:
        raise UserError(f"estimate.mfu={cfg.estimate.mfu}: tune ranks layouts by the step-time model, and a "
                        "fixed MFU gives every layout the same step time\n  fix: remove estimate.mfu (or set "
                        "estimate.mfu=null)")
    own = [p for p in validate(cfg, d)
           if not any(key.startswith(LAYOUT_PROBLEM_KEYS) for key in p.keys)]
    if own:
        raise UserError(["this config has problems no parallel layout can mend:"] + [str(p) for p in own])


def rejected_by(s: Search) -> dict[str, int]:
    """How many layouts each cause rejected, commonest first: ``memory``, or the keys that the
    validator's first problem names (``parallel.vpp, parallel.pp, grad_accum_steps``)."""
    return dict(Counter(_cause(c.rejected) for c in s.rejected).most_common())


def _cause(reason: str) -> str:
    if reason.startswith("memory:"):
        return "memory"
    head = reason.split(";")[0].split(": ")[0]  # "train.global_batch_size=2048, parallel.micro_batch_size=1, dp=4096"
    return ", ".join(part.split("=")[0].strip() for part in head.split(","))


# ---- why the best wins ----------------------------------------------------------------------

TERMS = ("compute", "TP/SP communication", "CP communication", "EP communication", "pipeline sends",
         "pipeline bubble", "DP communication")


def step_parts(terms: StepTerms) -> dict[str, float]:
    """One step's seconds by cause; they add up to the step time (perf.py's model)."""
    m = terms.microbatches
    return dict(zip(TERMS, (m * terms.compute_s, m * terms.tp_s, m * terms.cp_s, m * terms.ep_s, m * terms.pp_s,
                            m * terms.microbatch_s * terms.bubble, terms.dp_s)))


def layout_keys(c: Candidate, backend: BackendName) -> dict[str, object]:
    """What a user sets to get this layout: every parallel key tune chooses, as ``parallel.KEY`` values."""
    p = c.parallel
    keys: dict[str, object] = {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "cp": p.cp, "ep": p.ep,
                               "micro_batch_size": p.micro_batch_size, "recompute": p.recompute.name}
    if backend == BackendName.megatron:
        keys["distributed_optimizer"] = p.distributed_optimizer
    else:
        keys["zero_stage"] = p.zero_stage
    for key in SPLIT_KEYS:
        if getattr(p, key):
            keys[key] = getattr(p, key)
    return keys


def overrides(c: Candidate, backend: BackendName) -> list[str]:
    return [f"parallel.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in layout_keys(c, backend).items()]


def why_best(cfg: Config, best: Candidate, other: Candidate, calibration: Calibration) -> list[str]:
    """Why ``best`` is faster than ``other``: the keys they differ in, and the parts of the
    step (``step_parts``, scaled by the search's ``calibration``) that differ most, in seconds per step."""
    backend = cfg.backend.name
    a, b = layout_keys(best, backend), layout_keys(other, backend)
    differ = [f"{k} {a.get(k, '-')} vs {b.get(k, '-')}" for k in {**a, **b} if a.get(k) != b.get(k)]
    gap = other.step_s - best.step_s
    if gap <= 1e-9 * other.step_s:
        lines = ["the same predicted step time as the runner-up, which differs in " + ", ".join(differ)
                 + "; ranked first for " + _tiebreak(best, other)]
    else:
        lines = [f"{gap:.3g} s/step ({100 * gap / other.step_s:.1f}%) faster than the runner-up, which differs in "
                 + ", ".join(differ)]
    parts_a, parts_b = _parts(cfg, best, calibration), _parts(cfg, other, calibration)
    deltas = sorted(TERMS, key=lambda t: -abs(parts_b[t] - parts_a[t]))
    for term in deltas[:3]:
        delta = parts_b[term] - parts_a[term]
        if abs(delta) >= 0.005 * best.step_s:
            lines.append(f"{term}: {parts_a[term]:.3g} s vs {parts_b[term]:.3g} s per step "
                         f"({'saves' if delta > 0 else 'costs'} {abs(delta):.3g} s)")
    mem = other.memory["per_gpu_peak"] - best.memory["per_gpu_peak"]
    if abs(mem) >= 0.1:
        lines.append(f"memory: {best.memory['per_gpu_peak']:.1f} vs {other.memory['per_gpu_peak']:.1f} GiB per GPU")
    return lines


def _parts(cfg: Config, c: Candidate, calibration: Calibration) -> dict[str, float]:
    """``step_parts`` of a candidate, scaled by the calibration its ranked step time includes."""
    ratio = calibration.step_time_ratio
    terms = step_terms(dataclasses.replace(cfg, parallel=c.parallel), c.derived)
    return {k: v * ratio for k, v in step_parts(terms).items()}


NEAR_TIE = 0.02
"""Step times within 2% of each other are a tie as far as the estimate can tell (its published cases are
off by up to 15%, tests/test_estimate.py)."""


def roomier(s: Search) -> Candidate | None:
    """The layout within ``NEAR_TIE`` of the best step time that needs the least memory, when it needs at
    least a tenth of the GPU's memory less than the best: a 1% difference the model cannot vouch for is a
    poorer reason to choose than headroom (allocator fragmentation, a longer sequence, a bigger batch)."""
    if not s.ranked:
        return None
    best = s.ranked[0]
    near = [c for c in s.ranked if c.step_s <= best.step_s * (1 + NEAR_TIE)]
    lightest = min(near, key=lambda c: c.memory["per_gpu_peak"])
    saved = best.memory["per_gpu_peak"] - lightest.memory["per_gpu_peak"]
    return lightest if saved >= 0.1 * best.memory["hbm"] else None


def _tiebreak(best: Candidate, other: Candidate) -> str:
    """Which part of ``Candidate.sort_key`` after the step time put ``best`` first."""
    reasons = ("less memory", "a smaller model-parallel group", "fewer virtual stages", "a smaller micro batch")
    for reason, a, b in zip(reasons, best.sort_key()[1:], other.sort_key()[1:]):
        if a != b:
            return reason
    return "the search's order (nothing the estimate sees tells them apart)"


# ---- records ----------------------------------------------------------------------------------

def candidate_record(c: Candidate, cfg: Config, rank: int | None) -> dict:
    """One entry of tune.json's ``candidates``: blocks shaped like plan.json's."""
    d, p, backend = c.derived, c.parallel, cfg.backend.name
    parallel = {"tp": p.tp, "pp": p.pp, "cp": p.cp, "ep": p.ep, "vpp": p.vpp, "dp": d.dp,
                "micro_batch_size": p.micro_batch_size, "grad_accum_steps": d.grad_accum_steps,
                "global_batch_size": cfg.train.global_batch_size}
    parallel.update({k: v for k, v in layout_keys(c, backend).items() if k not in parallel})
    return {"rank": rank, "parallel": parallel, "overrides": overrides(c, backend), "memory_gib": c.memory,
            "throughput": c.throughput, "rejected": c.rejected}


def tune_record(s: Search) -> dict:
    """tune.json: what was searched, the best layout and why, and every candidate."""
    cfg, backend = s.cfg, s.cfg.backend.name
    ranks = {id(c): i + 1 for i, c in enumerate(s.ranked)}
    return {
        "model": cfg.model.name, "backend": backend.name, "world_size": s.current.derived.world_size,
        "nodes": cfg.cluster.nodes, "gpus_per_node": cfg.cluster.gpus_per_node, "gpu": cfg.cluster.gpu.name,
        "seq_length": cfg.model.seq_length, "global_batch_size": cfg.train.global_batch_size,
        "searched": len(s.ranked) + len(s.rejected), "fit": len(s.ranked), "seconds": s.seconds,
        "rejected_by": rejected_by(s),
        "best": candidate_record(s.ranked[0], cfg, 1) if s.ranked else None,
        "why_best": why_best(cfg, s.ranked[0], s.ranked[1], s.calibration) if len(s.ranked) > 1 else [],
        "roomier": _maybe_record(roomier(s), cfg, ranks),
        "current": _maybe_record(s.current, cfg, ranks),
        "candidates": [candidate_record(c, cfg, ranks.get(id(c))) for c in s.ranked + s.rejected],
    }


def _maybe_record(c: Candidate | None, cfg: Config, ranks: dict) -> dict | None:
    return None if c is None else candidate_record(c, cfg, ranks.get(id(c)))
