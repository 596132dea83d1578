"""Validation rules that hold on any backend: names, sizes, the parallel layout, batch, data, stage, estimator.

Each rule takes the typed config and its derived numbers and yields the
problems it finds; ``launch.config.validate.RULES`` lists them in the order
they run. A new rule is a function here and a line there.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Iterator

from launch.config.derive import Derived, uneven_split
from launch.config.problem import Problem, divisors, is_megatron, split_evenly
from launch.config.schema import BOUNDS, Bound, Config, StageKind
from launch.config.slurm_time import parse_time_limit


# --- names and sizes ----------------------------------------------------------

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def name_is_a_path_component(cfg: Config, d: Derived) -> Iterator[Problem]:
    """The name becomes a directory and a SLURM job name."""
    if not _SAFE_NAME.match(cfg.name):
        yield Problem({"name": cfg.name}, "the run name must be letters, digits, '.', '_' or '-'",
                      "name=my_run_v2")


def values_within_bounds(cfg: Config, d: Derived) -> Iterator[Problem]:
    """Every numeric key within its range (``launch.config.schema.BOUNDS``: the range and why). NaN and
    infinities are never within one."""
    for key, bound in BOUNDS.items():
        value = _at(cfg, key)
        if value is None:
            continue
        low_ok = value > bound.low if bound.open_low else value >= bound.low
        high_ok = value < bound.high if bound.open_high else value <= bound.high
        if low_ok and high_ok:
            continue
        default = _default(key)
        suggestion = f"{key}={default} (the default)" if default is not None else f"a value {_range(bound)}"
        yield Problem({key: value}, f"must be {_range(bound)}: {bound.why}", suggestion)


def _range(b: Bound) -> str:
    low = f"above {b.low:g}" if b.open_low else f"at least {b.low:g}"
    high = f"below {b.high:g}" if b.open_high else f"at most {b.high:g}"
    return f"{low} and {high}"


def _at(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _default(key: str):
    """The schema's default for ``key`` when it is a plain number (None for required and optional keys)."""
    group, _, name = key.rpartition(".")
    node = Config
    for part in filter(None, group.split(".")):
        node = typing.get_type_hints(node)[part]
    found = {f.name: f.default for f in dataclasses.fields(node)}.get(name)
    return found if isinstance(found, (int, float)) and not isinstance(found, bool) else None


def tokens_or_steps(cfg: Config, d: Derived) -> Iterator[Problem]:
    t = cfg.train
    keys = {"train.tokens": t.tokens, "train.steps": t.steps}
    if (t.tokens is None) == (t.steps is None):
        yield Problem(keys, "set exactly one of train.tokens and train.steps",
                      "train.tokens=1000000000 train.steps=null, or train.steps=1000 train.tokens=null")


def guard_policy(cfg: Config, d: Derived) -> Iterator[Problem]:
    """The divergence policy: skips in the run bound skips in a row (ranges: ``BOUNDS``; launch/train/guard.py)."""
    g = cfg.train.guard
    if g.max_skipped_steps < g.max_consecutive_skips:
        yield Problem({"train.guard.max_skipped_steps": g.max_skipped_steps,
                       "train.guard.max_consecutive_skips": g.max_consecutive_skips},
                      "the run's bound on skipped steps is below the bound on skips in a row, which never counts",
                      f"train.guard.max_skipped_steps={max(g.max_consecutive_skips, 50)}")


def hang_timeout(cfg: Config, d: Derived) -> Iterator[Problem]:
    """The watchdog's timeout is a duration; under a second it would call every step a hang."""
    timeout = cfg.train.hang_timeout_s
    if not (timeout == 0 or timeout >= 1):
        yield Problem({"train.hang_timeout_s": timeout}, "a hang timeout is 0 (no watchdog) or at least 1 second",
                      "train.hang_timeout_s=480 (longer than a checkpoint save), or 0 to turn the watchdog off")


def time_limit_format(cfg: Config, d: Derived) -> Iterator[Problem]:
    try:
        seconds = parse_time_limit(cfg.cluster.time_limit)
    except ValueError:
        seconds = None
    if not seconds:
        yield Problem({"cluster.time_limit": cfg.cluster.time_limit}, "not a positive SLURM time limit",
                      "cluster.time_limit=04:00:00 (HH:MM:SS) or 2-00:00:00 (D-HH:MM:SS)")


# --- the parallel layout ------------------------------------------------------

def world_divisible_by_model_parallel(cfg: Config, d: Derived) -> Iterator[Problem]:
    p = cfg.parallel
    mp = p.tp * p.pp * p.cp
    if mp > 0 and d.world_size % mp:
        yield Problem(
            {"cluster.nodes": cfg.cluster.nodes, "cluster.gpus_per_node": cfg.cluster.gpus_per_node,
             "parallel.tp": p.tp, "parallel.pp": p.pp, "parallel.cp": p.cp},
            f"world size {d.world_size} is not divisible by tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = {mp}",
            f"make nodes*gpus_per_node a multiple of {mp}, or choose tp*pp*cp from the "
            f"divisors of {d.world_size}: {divisors(d.world_size)}",
        )


def expert_layout_divides_world(cfg: Config, d: Derived) -> Iterator[Problem]:
    p = cfg.parallel
    size = p.ep * d.etp * p.pp
    if cfg.model.num_experts and size > 0 and d.world_size % size:
        yield Problem(
            {"parallel.ep": p.ep, "parallel.etp": d.etp, "parallel.pp": p.pp, "world_size": d.world_size},
            f"expert layers need ep*etp*pp = {p.ep}*{d.etp}*{p.pp} = {size} to divide the world size {d.world_size}",
            "choose ep so that ep*etp*pp divides nodes*gpus_per_node",
        )


def experts_divisible_by_ep(cfg: Config, d: Derived) -> Iterator[Problem]:
    p, m = cfg.parallel, cfg.model
    if p.ep > 1 and not m.num_experts:
        yield Problem({"parallel.ep": p.ep, "model.num_experts": m.num_experts},
                      "expert parallelism needs an MoE model", "parallel.ep=1, or pick an MoE model (model=mixtral_8x7b)")
    elif m.num_experts:
        yield from split_evenly("model.num_experts", m.num_experts, "experts", "parallel.ep", p.ep)


def tp_within_node(cfg: Config, d: Derived) -> Iterator[Problem]:
    p, c = cfg.parallel, cfg.cluster
    if p.tp > c.gpus_per_node and not p.allow_tp_across_nodes:
        yield Problem(
            {"parallel.tp": p.tp, "cluster.gpus_per_node": c.gpus_per_node},
            f"tp={p.tp} spans more than one node of {c.gpus_per_node} GPUs: every layer's "
            "all-reduce would cross InfiniBand instead of NVLink",
            f"parallel.tp={c.gpus_per_node} and raise parallel.pp, or force it with "
            "parallel.allow_tp_across_nodes=true",
        )


def heads_divisible_by_tp(cfg: Config, d: Derived) -> Iterator[Problem]:
    yield from split_evenly("model.num_attention_heads", cfg.model.num_attention_heads, "heads",
                             "parallel.tp", cfg.parallel.tp)


def query_groups_divisible_by_tp(cfg: Config, d: Derived) -> Iterator[Problem]:
    """Megatron-Core shards KV heads over tp; it does not replicate them."""
    m, p = cfg.model, cfg.parallel
    if m.num_query_groups:  # without GQA the heads rule covers it
        yield from split_evenly("model.num_query_groups", m.num_query_groups, "KV groups", "parallel.tp", p.tp)
    if m.num_query_groups and m.num_attention_heads % m.num_query_groups:
        yield Problem({"model.num_attention_heads": m.num_attention_heads, "model.num_query_groups": m.num_query_groups},
                      "attention heads must be a multiple of the KV groups",
                      f"choose model.num_query_groups from {divisors(m.num_attention_heads)}")


def head_dim_is_whole(cfg: Config, d: Derived) -> Iterator[Problem]:
    m = cfg.model
    if m.kv_channels is None and m.num_attention_heads > 0 and m.hidden_size % m.num_attention_heads:
        yield Problem({"model.hidden_size": m.hidden_size, "model.num_attention_heads": m.num_attention_heads},
                      "hidden_size is not divisible by num_attention_heads",
                      "set model.kv_channels (the head dimension) or change the head count")


def vpp_needs_pp(cfg: Config, d: Derived) -> Iterator[Problem]:
    p = cfg.parallel
    if p.vpp > 1 and p.pp < 2:
        yield Problem({"parallel.vpp": p.vpp, "parallel.pp": p.pp},
                      "virtual pipeline stages interleave a pipeline of at least 2 stages",
                      "parallel.vpp=1, or parallel.pp>=2")


def pipeline_split(cfg: Config, d: Derived) -> Iterator[Problem]:
    """Layers must divide into pp*vpp chunks, or an explicit uneven split must add up.

    Megatron's account_for_embedding/loss flags count the embedding and the
    loss as one layer each; explicit first/last stage sizes pin those stages and
    split the rest evenly over the middle stages.
    """
    p, L = cfg.parallel, cfg.model.num_layers
    if p.pp < 1 or p.vpp < 1:
        return
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    accounting = p.account_for_embedding_in_pipeline_split or p.account_for_loss_in_pipeline_split
    explicit = first is not None or last is not None
    keys: dict[str, object] = {"model.num_layers": L, "parallel.pp": p.pp, "parallel.vpp": p.vpp}
    if (explicit or accounting) and p.pp < 2:
        yield Problem(keys, "an uneven pipeline split needs parallel.pp >= 2",
                      "remove the first/last stage settings, or raise parallel.pp")
        return
    if explicit and accounting:
        yield Problem({**keys, "parallel.num_layers_in_first_pipeline_stage": first,
                       "parallel.num_layers_in_last_pipeline_stage": last},
                      "explicit first/last stage sizes and account_for_* flags cannot be combined (Megatron refuses)",
                      "use either the explicit sizes or the account_for_* flags")
        return
    if explicit:
        yield from _explicit_split(cfg, keys, first, last)
        return
    slots = L + int(p.account_for_embedding_in_pipeline_split) + int(p.account_for_loss_in_pipeline_split)
    chunks = p.pp * p.vpp
    if slots % chunks:
        what = f"{L} layers" + (f" (+{slots - L} for embedding/loss = {slots})" if slots != L else "")
        yield Problem(keys, f"{what} cannot be split evenly into pp*vpp = {p.pp}*{p.vpp} = {chunks} chunks",
                      _propose_split(L, p.pp, p.vpp))


def _explicit_split(cfg: Config, keys: dict, first: int | None, last: int | None) -> Iterator[Problem]:
    p, L = cfg.parallel, cfg.model.num_layers
    keys = {**keys, "parallel.num_layers_in_first_pipeline_stage": first,
            "parallel.num_layers_in_last_pipeline_stage": last}
    pinned = (first or 0) + (last or 0)
    middle_stages = p.pp - (first is not None) - (last is not None)
    rest = L - pinned
    if rest < 0 or (middle_stages == 0 and rest != 0):
        yield Problem(keys, f"the stages add up to {pinned} layers, not {L}", _propose_split(L, p.pp, p.vpp))
        return
    if middle_stages and rest % (middle_stages * p.vpp):
        yield Problem(keys, f"the remaining {rest} layers cannot be split evenly over {middle_stages} middle "
                      f"stages x vpp {p.vpp}", _propose_split(L, p.pp, p.vpp))
        return
    for key, n in (("first", first), ("last", last)):
        if n is not None and (n < 1 or n % p.vpp):
            yield Problem(keys, f"the {key} stage's {n} layers must be a positive multiple of vpp={p.vpp}",
                          _propose_split(L, p.pp, p.vpp))


def _propose_split(layers: int, pp: int, vpp: int) -> str:
    """A split Megatron accepts for ``layers`` over ``pp`` stages (``derive.uneven_split``), as overrides."""
    split = uneven_split(layers, pp, vpp) or {}
    if split.get("account_for_embedding_in_pipeline_split"):
        return ("count the embedding and the loss as layers: parallel.account_for_embedding_in_pipeline_split=true "
                f"parallel.account_for_loss_in_pipeline_split=true ({layers}+2 = {pp}x{(layers + 2) // pp})")
    if split.get("account_for_loss_in_pipeline_split"):
        return (f"count the loss as a layer: parallel.account_for_loss_in_pipeline_split=true "
                f"({layers}+1 = {pp}x{(layers + 1) // pp})")
    if split:
        lo, hi = split["num_layers_in_first_pipeline_stage"], split["num_layers_in_last_pipeline_stage"]
        return (f"parallel.num_layers_in_first_pipeline_stage={lo} "
                f"parallel.num_layers_in_last_pipeline_stage={hi} ({pp - 2} middle stages of "
                f"{(layers - lo - hi) // (pp - 2)})")
    good = [k for k in divisors(layers) if k <= 64]
    return f"choose parallel.pp*parallel.vpp from the divisors of {layers}: {good}"



def context_parallel_sequence(cfg: Config, d: Derived) -> Iterator[Problem]:
    """Megatron's CP splits each sequence into 2*cp chunks (load-balanced causal attention)."""
    p, m = cfg.parallel, cfg.model
    if p.cp > 1 and m.seq_length % (2 * p.cp):
        yield Problem({"model.seq_length": m.seq_length, "parallel.cp": p.cp},
                      f"seq_length must be divisible by 2*cp = {2 * p.cp}",
                      f"model.seq_length={m.seq_length - m.seq_length % (2 * p.cp)}, or another cp")


def sequence_fits_positions(cfg: Config, d: Derived) -> Iterator[Problem]:
    m = cfg.model
    if m.max_position_embeddings is not None and m.seq_length > m.max_position_embeddings:
        yield Problem({"model.seq_length": m.seq_length, "model.max_position_embeddings": m.max_position_embeddings},
                      "the sequence is longer than the model's positions",
                      f"model.seq_length={m.max_position_embeddings}, or raise model.max_position_embeddings")


def batch_divisible(cfg: Config, d: Derived) -> Iterator[Problem]:
    p, t = cfg.parallel, cfg.train
    per_step = p.micro_batch_size * d.dp
    if per_step > 0 and t.global_batch_size % per_step:
        lower = max(t.global_batch_size - t.global_batch_size % per_step, per_step)
        yield Problem(
            {"train.global_batch_size": t.global_batch_size, "parallel.micro_batch_size": p.micro_batch_size, "dp": d.dp},
            f"global batch {t.global_batch_size} is not divisible by micro_batch_size*dp = "
            f"{p.micro_batch_size}*{d.dp} = {per_step}",
            f"train.global_batch_size={lower} or {lower + per_step}, or another micro_batch_size",
        )


def batch_rampup(cfg: Config, d: Derived) -> Iterator[Problem]:
    """Every batch of the ramp must split into whole micro-batches, as megatron-core's calculator asserts."""
    p, t = cfg.parallel, cfg.train
    ramp = t.rampup_batch_size
    if ramp is None:
        return
    key = {"train.rampup_batch_size": list(ramp)}
    example = "train.rampup_batch_size=[START,INCREMENT,SAMPLES], e.g. [16,16,5859375] (GPT-3 175B in Megatron-LM)"
    if len(ramp) != 3 or any(v < 1 for v in ramp):
        yield Problem(key, "needs three positive numbers: start batch, increment, ramp-up samples", example)
        return
    start, inc, _ = ramp
    per_step = p.micro_batch_size * d.dp
    if is_megatron(cfg) and (p.vpp or 1) > 1:
        per_step *= p.pp  # the interleaved schedule needs micro-batches in multiples of pp
    keys = {**key, "train.global_batch_size": t.global_batch_size}
    if start >= t.global_batch_size:
        yield Problem(keys, "the ramp must start below the global batch", "a smaller start, or train.rampup_batch_size=null")
    elif (t.global_batch_size - start) % inc:
        yield Problem(keys, f"the ramp from {start} by {inc} does not reach {t.global_batch_size}",
                      f"an increment dividing {t.global_batch_size - start}")
    if per_step > 0 and (start % per_step or inc % per_step):
        yield Problem({**key, "parallel.micro_batch_size": p.micro_batch_size, "dp": d.dp},
                      f"every batch of the ramp must be a multiple of micro_batch_size*dp = {per_step}"
                      + (" (x pp: interleaved schedule)" if per_step != p.micro_batch_size * d.dp else ""),
                      f"start and increment as multiples of {per_step}")


def sequence_parallel_setting(cfg: Config, d: Derived) -> Iterator[Problem]:
    sp = cfg.parallel.sequence_parallel
    if sp != "auto" and type(sp) is not bool:
        yield Problem({"parallel.sequence_parallel": sp}, "must be auto, true or false",
                      "parallel.sequence_parallel=auto")
    elif sp is True and cfg.parallel.tp < 2:
        yield Problem({"parallel.sequence_parallel": sp, "parallel.tp": cfg.parallel.tp},
                      "sequence parallelism splits activations over the tensor-parallel group; it needs tp > 1",
                      "parallel.sequence_parallel=auto, or parallel.tp>1")


def sequence_parallel_splits_sequence(cfg: Config, d: Derived) -> Iterator[Problem]:
    """Sequence parallelism scatters each CP chunk of the sequence over tp ranks."""
    p, m = cfg.parallel, cfg.model
    if is_megatron(cfg) and d.sequence_parallel and p.tp > 1 and p.cp > 0 and (m.seq_length // p.cp) % p.tp:
        yield Problem({"model.seq_length": m.seq_length, "parallel.cp": p.cp, "parallel.tp": p.tp},
                      f"with sequence parallelism, seq_length/cp = {m.seq_length // p.cp} must be divisible by tp",
                      f"model.seq_length={m.seq_length - m.seq_length % (p.cp * p.tp)}")


def moe_settings(cfg: Config, d: Derived) -> Iterator[Problem]:
    p, m = cfg.parallel, cfg.model
    if not m.num_experts:
        return
    if m.moe_router_topk > m.num_experts:
        yield Problem({"model.moe_router_topk": m.moe_router_topk, "model.num_experts": m.num_experts},
                      "a token cannot be routed to more experts than there are", "model.moe_router_topk=2")
    if is_megatron(cfg) and p.tp > 1 and not d.sequence_parallel:
        yield Problem({"parallel.tp": p.tp, "parallel.sequence_parallel": p.sequence_parallel, "model.num_experts": m.num_experts},
                      "Megatron-Core requires sequence parallelism for MoE with tensor parallelism",
                      "parallel.sequence_parallel=auto")


def interleaved_schedule_microbatches(cfg: Config, d: Derived) -> Iterator[Problem]:
    """Megatron-Core's interleaved 1F1B runs micro-batches in groups of pp per virtual stage,
    and raises unless their number is a multiple of pp (pipeline_parallel/schedules.py)."""
    p = cfg.parallel
    if p.vpp > 1 and p.pp > 1 and d.grad_accum_steps % p.pp:
        per_step = p.pp * p.micro_batch_size * d.dp
        yield Problem({"parallel.vpp": p.vpp, "parallel.pp": p.pp, "grad_accum_steps": d.grad_accum_steps},
                      f"the interleaved schedule needs a multiple of pp = {p.pp} micro-batches per step, this layout "
                      f"has {d.grad_accum_steps}",
                      f"train.global_batch_size as a multiple of {per_step}, or parallel.vpp=1")


def no_secrets_in_files(cfg: Config, d: Derived) -> Iterator[Problem]:
    """Every value of the config is written to disk (config.yaml, the job script), and cluster.setup and
    cluster.directives reach the script as raw shell: a secret stays in the submitting environment, which
    jobs inherit. Three checks: cluster.env names that say "secret", setup/directive lines that assign a
    literal to such a name, and any value shaped like a well-known token (the value is never printed)."""
    fix_export = "remove it and export {name} where you run trainctl; jobs inherit the environment " \
                 "(list it in cluster.export_env when that is set)"
    for key in cfg.cluster.env:
        if _SECRET_NAME.search(key):
            yield Problem({f"cluster.env.{key}": "<hidden>"}, "looks like a secret, and cluster.env is written to disk",
                          fix_export.format(name=key))
    raw = [(f"cluster.setup[{i}]", line) for i, line in enumerate(cfg.cluster.setup)]
    raw += [(f"cluster.directives.{k}", v) for k, v in cfg.cluster.directives.items()]
    for key, line in raw:
        for name, value in _ASSIGNMENT.findall(str(line)):
            if _SECRET_NAME.search(name) and value and not value.startswith(("$", '"$')):
                yield Problem({key: "<hidden>"}, f"assigns a literal to {name}, which looks like a secret, and this "
                              "line is written into the job script", fix_export.format(name=name) +
                              f"; a line may still use it as ${name}")
    for key, value in _strings(cfg):
        token = _TOKEN_VALUE.search(value)
        if token:
            yield Problem({key: "<hidden>"}, f"holds what looks like {_TOKEN_KINDS[token.lastgroup]}, and the "
                          "config is written to disk", "remove it; pass the token in the environment that runs "
                          "trainctl (jobs inherit it), never in the config")


_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW(OR)?D|PASSPHRASE|CREDENTIAL|AUTH|PRIVATE|COOKIE|(^|_)PAT($|_)",
                          re.IGNORECASE)
"""Names that hold secrets by convention: WANDB_API_KEY, HF_TOKEN, GITHUB_PAT, HF_AUTH, SSH_PRIVATE_KEY..."""
_ASSIGNMENT = re.compile(r"(?:^|[\s;&|(])(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(\S*)")
_TOKEN_KINDS = {"hf": "a Hugging Face token", "gh": "a GitHub token", "sk": "an API secret key",
                "slack": "a Slack token", "aws": "an AWS access key", "gitlab": "a GitLab token", "pem": "a private key"}
_TOKEN_VALUE = re.compile(
    r"(?P<hf>\bhf_[A-Za-z0-9]{30,})|(?P<gh>\b(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}))"
    r"|(?P<sk>\bsk-[A-Za-z0-9_-]{20,})|(?P<slack>\bxox[abprs]-[A-Za-z0-9-]{10,})|(?P<aws>\bAKIA[0-9A-Z]{16}\b)"
    r"|(?P<gitlab>\bglpat-[A-Za-z0-9_-]{20,})|(?P<pem>-----BEGIN [A-Z ]*PRIVATE KEY-----)")
"""The published shapes of common tokens (Hugging Face, GitHub, OpenAI-style sk-, Slack, AWS, GitLab, PEM)."""


def _strings(node, path: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of every string in a config dataclass, its lists and dicts included."""
    if isinstance(node, str):
        yield path, node
    elif dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _strings(getattr(node, f.name), f"{path}.{f.name}".lstrip("."))
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}[{i}]")


def env_names(cfg: Config, d: Derived) -> Iterator[Problem]:
    """cluster.env keys become ``export NAME=...`` lines and cluster.export_env ``--export=NAME,...``: each
    must be a shell variable name (``NAME=value`` in --export would write a value, perhaps a secret, to disk)."""
    fix = "use letters, digits and _ only, not starting with a digit (NCCL_IB_HCA)"
    for key in cfg.cluster.env:
        if not _ENV_NAME.fullmatch(key):
            yield Problem({f"cluster.env.{key}": cfg.cluster.env[key]}, "is not an environment variable name", fix)
    for i, name in enumerate(cfg.cluster.export_env or []):
        if not _ENV_NAME.fullmatch(name):
            yield Problem({f"cluster.export_env[{i}]": name}, "is not an environment variable name", fix +
                          "; values come from the shell that runs trainctl submit, never from the config")


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# --- data and stage -----------------------------------------------------------

def mixture_weights(cfg: Config, d: Derived) -> Iterator[Problem]:
    sources = cfg.data.sources
    if not sources:
        yield Problem({"data.sources": "{}"}, "the mixture has no sources",
                      "choose a mixture with sources (data=tiny_mix), or write your own data/ config")
    for name, source in sources.items():
        if not source.weight > 0:
            yield Problem({f"data.sources.{name}.weight": source.weight}, "mixture weights must be positive",
                          f"data.sources.{name}.weight=0.1, or remove the source with ~data.sources.{name}")


def data_split(cfg: Config, d: Derived) -> Iterator[Problem]:
    split = cfg.data.split
    if len(split) != 3 or any(x < 0 for x in split) or sum(split) <= 0:
        yield Problem({"data.split": list(split)}, "need three non-negative fractions: train, validation, test",
                      "data.split=[0.98,0.01,0.01]")


def stage_needs_init(cfg: Config, d: Derived) -> Iterator[Problem]:
    s = cfg.stage
    if s.kind != StageKind.pretrain and not s.init_checkpoint and not s.from_scratch:
        yield Problem({"stage": s.kind, "stage.init_checkpoint": s.init_checkpoint},
                      f"{s.kind.name} starts from a trained model",
                      "stage.init_checkpoint=/path/to/checkpoint, or stage.from_scratch=true")
    if s.kind == StageKind.rlhf and not s.reward_model and not s.rewards:
        yield Problem({"stage": s.kind, "stage.reward_model": s.reward_model, "stage.rewards": list(s.rewards)},
                      "RLHF needs something to score the completions",
                      "stage.rewards=[exact_match,format], or stage.reward_model=/path/to/reward_model")


def rl_stage(cfg: Config, d: Derived) -> Iterator[Problem]:
    """RLHF: reward names resolve, the reward model exists, the group size divides the batch (``rl_check``)."""
    from launch.config.rl_check import stage_rl

    yield from stage_rl(cfg, d)


# --- estimator assumptions ----------------------------------------------------

def estimate_settings(cfg: Config, d: Derived) -> Iterator[Problem]:
    """The step-time model divides by the achievable fractions and by estimate.mfu; the
    memory model adds the overheads. A share of communication may be 0 (fully hidden)."""
    e = cfg.estimate
    defaults = type(e)()  # EstimateConfig's defaults, for the fixes
    for name in ("achievable_fraction_dense", "achievable_fraction_moe", "achievable_fraction_fp8",
                 "achievable_fraction_hbm"):
        value = getattr(e, name)
        if not 0 < value <= 1:
            yield Problem({f"estimate.{name}": value}, "a share of the peak must be in (0, 1]",
                          f"estimate.{name}={getattr(defaults, name)} (the default)")
    for name in ("dp_comm_exposed_fraction", "tp_comm_exposed_fraction", "ep_comm_exposed_fraction",
                 "pp_comm_exposed_fraction"):
        value = getattr(e, name)
        if not 0 <= value <= 1:
            yield Problem({f"estimate.{name}": value},
                          "a share of the communication left exposed must be in [0, 1] (0: all hidden)",
                          f"estimate.{name}={getattr(defaults, name)} (the default)")
    if e.mfu is not None and not 0 < e.mfu <= 1:
        yield Problem({"estimate.mfu": e.mfu}, "MFU is a share of the peak: it must be in (0, 1]",
                      "estimate.mfu=0.4, or estimate.mfu=null to use the step-time model")
    for name in ("cuda_context_gib", "nccl_buffers_gib", "allocator_fragmentation"):
        value = getattr(e, name)
        if not value >= 0:
            yield Problem({f"estimate.{name}": value}, "a memory overhead cannot be negative",
                          f"estimate.{name}={getattr(defaults, name)} (the default), or 0")
