"""Every schema key reaches the engine, or says where it is read instead (launch/config/reach.py).

A setting that changes nothing runs without an error: ``parallel.recompute=full`` wrote an
``activation_checkpointing`` section into ds_config.json while the DeepSpeed trainer compared
the enum with a string and never switched the model's checkpointing on. So each leaf key of
``Config`` (enumerated here from the dataclasses, not from a list) is changed on its own,
generically by its type, in three base configs (DeepSpeed MoE pretrain, Megatron-Core
pretrain, Megatron-Core bf16 WSD SFT), and what the engines receive is compared: the backend's
files as render writes them (ds_config.json; megatron.yaml and megatron_args.txt), and on
DeepSpeed the Hugging Face model its trainer builds (its config, whether activation
checkpointing is on). A key that changes none of them must be declared in
``launch.config.reach.NOT_IN_ARTIFACTS``, and a declared key must indeed change none of them
(a stale declaration fails too). Pure translation: no training.

That recompute bug still changed a file, so the tests at the end check recompute where it
acts: the model the DeepSpeed trainer builds has activation checkpointing on for full (off for
none), and Megatron-Core's ``TransformerConfig`` built from the rendered megatron.yaml has
recompute_granularity "full" / "selective" / None.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import typing

import pytest

from launch.config.reach import NOT_IN_ARTIFACTS, WHERE
from launch.config.schema import Config
from tests.conftest import typed

TINY = ("model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=2",
        "model.num_query_groups=1", "model.vocab_size=256", "model.seq_length=64", "model.max_position_embeddings=64")
"""A model small enough to build once per changed key (the Hugging Face model is an engine object here)."""
BASES = {
    # A MoE model (Mixtral): the router's settings reach the Hugging Face config.
    "deepspeed": ("recipe=tiny_local", *TINY, "model.num_experts=4"),
    "megatron": ("recipe=tiny_local", "backend=megatron", *TINY),
    # bf16 and WSD: keys that only matter there (grad_reduce_in_fp32, decay_fraction) reach.
    "megatron_sft": ("recipe=tiny_sft", "backend=megatron", *TINY, "train.precision=bf16", "optim=wsd"),
}
EXPLICIT = {
    # Where the generic change is not a valid value, or lands on the value the base already has.
    "parallel.sequence_parallel": True,  # "auto" | true | false
    "parallel.recompute": None,  # every other member, below
    "data.split": [0.8, 0.1, 0.1],
    "data.prepare_on": "slurm",
    "stage.dpo_loss": "hinge",
    "cluster.time_limit": "01:00:00",
    "cluster.mem": "100G",
    "cluster.scheduler": "slurm",
    "train.rampup_batch_size": [2, 2, 4],
    "train.tokens": 1_000_000,  # with train.steps=None, below
    "train.steps": None,  # steps from train.tokens, below
    "wandb.mode": "disabled",
    "pipeline": [{"name": "a", "overrides": ["stage=sft"]}],
    "train.rank_check_s": 5.0,
}


# --- the schema's leaf keys ---------------------------------------------------------------------

def leaf_keys(cls=Config, prefix: str = "") -> dict[str, object]:
    """{dotted key: its annotated type}, descending into nested dataclasses (``*`` for a dict's values)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out.update(leaf_keys(tp, key + "."))
        elif origin is dict and dataclasses.is_dataclass(args[1]):
            out.update(leaf_keys(args[1], key + ".*."))
        else:
            out[key] = tp
    return out


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def _set(cfg, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    if isinstance(cfg, dict):
        cfg[last] = value
    else:
        setattr(cfg, last, value)


def changed_values(key: str, tp, value) -> list:
    """Other valid values of ``key`` (now ``value``), by type: int +1 and x2, float x1.5, bool flipped,
    enum every other member, optional None <-> a value, str and containers one different entry."""
    if key == "parallel.recompute":
        return [m for m in type(value) if m != value]
    if key in EXPLICIT:
        return [EXPLICIT[key]]
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    inner = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if optional else tp
    if value is None:
        return [_a_value(inner)]
    others = [None] if optional else []
    if isinstance(value, enum.Enum):
        return others + [m for m in type(value) if m != value]
    if isinstance(value, bool):
        return others + [not value]
    if isinstance(value, int):
        return others + [value + 1, value * 2 or 2]
    if isinstance(value, float):
        return others + [value * 1.5 or 0.5]
    if isinstance(value, str):
        return others + [value + "_other"]
    if isinstance(value, list):
        return others + [value + ["other"]]
    if isinstance(value, dict):
        return others + [{**value, "other": "1"}]
    raise AssertionError(f"{key}: no generic change for {value!r}; add one to EXPLICIT")


def _a_value(tp):
    if typing.get_origin(tp) is list:
        return ["other"]
    return {int: 2, float: 0.5, str: "other"}[tp]


# --- what the engines receive -------------------------------------------------------------------

def observe(cfg) -> dict:
    """What the engines get from ``cfg``: the backend's files as render writes them (less comments), and for
    DeepSpeed the Hugging Face model its trainer builds. A change that makes a translator raise is a change
    it reads."""
    from launch.backends import artifacts
    from launch.config.derive import derive
    from launch.config.schema import BackendName

    try:
        d = derive(cfg)
        files = artifacts(cfg, d)
    except Exception as exc:
        return {"artifacts": f"raised {type(exc).__name__}: {exc}"}
    # Comments do not count: megatron.yaml's are whole lines (its header names the run).
    out = {name: "\n".join(line for line in text.splitlines() if not line.startswith("#"))
           for name, text in files.items()}
    if cfg.backend.name == BackendName.deepspeed:
        try:
            out["hf_model"] = _hf_model(cfg, d)
        except Exception as exc:
            out["hf_model"] = f"raised {type(exc).__name__}: {exc}"
    return {name: json.dumps(value, sort_keys=True, default=str) for name, value in out.items()}


def _hf_model(cfg, d) -> dict:
    """The Hugging Face model as the DeepSpeed trainer builds it (launch.train.model.build): its config and
    whether activation checkpointing is on. Built without ZeRO-3's partitioning, which needs a process group."""
    from launch.backends.deepspeed import to_deepspeed
    from launch.train import model as model_mod

    ds = {**to_deepspeed(cfg, d), "zero_optimization": {"stage": 0}}
    model = model_mod.build(cfg, ds, eod=0)
    return {"config": model.config.to_dict(), "checkpointing": model.is_activation_checkpointing}


@pytest.fixture(scope="module")
def bases() -> dict:
    return {name: typed(*overrides)[0] for name, overrides in BASES.items()}


def _reaches(bases: dict, before: dict, key: str, tp) -> list[str]:
    """Which (base: observed part) a change of ``key`` alters."""
    hits = []
    for name, base in bases.items():
        concrete = key.replace("*", next(iter(base.data.sources)))
        for value in changed_values(key, tp, _get(base, concrete)):
            assert value != _get(base, concrete), f"{key}: the change {value!r} is the base's value ({name})"
            cfg = copy.deepcopy(base)
            _set(cfg, concrete, value)
            if key == "train.tokens":
                cfg.train.steps = None
            if key == "train.steps":
                cfg.train.tokens = 1_000_000
            after = observe(cfg)
            hits += [f"{name}: {part}" for part in before[name].keys() | after.keys()
                     if before[name].get(part) != after.get(part)]
    return sorted(set(hits))


def test_every_schema_key_reaches_an_engine_or_is_declared(bases):
    import time
    import warnings

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    keys = leaf_keys()
    before = {name: observe(base) for name, base in bases.items()}
    reach = {key: _reaches(bases, before, key, tp) for key, tp in keys.items()}
    silent = sorted(k for k, hits in reach.items() if not hits)
    print(f"{len(keys)} keys, {len(keys) - len(silent)} reach an engine, {time.perf_counter() - t0:.1f} s")
    undeclared = [k for k in silent if k not in NOT_IN_ARTIFACTS]
    assert not undeclared, (
        "these schema keys change no backend artifact and no engine object; wire them through, or declare "
        f"where they are read in launch/config/reach.py: {undeclared}")
    stale = {k: reach.get(k, "not a schema key") for k in NOT_IN_ARTIFACTS if k not in silent}
    assert not stale, f"declared in launch/config/reach.py but they reach an engine (or are gone): {stale}"


def test_declarations_say_where_and_why():
    for key, (where, why) in NOT_IN_ARTIFACTS.items():
        assert where in WHERE, (key, where)
        assert why and "\n" not in why, key


# --- recompute, specifically --------------------------------------------------------------------

@pytest.mark.parametrize("recompute", ["none", "full"])
def test_recompute_reaches_the_deepspeed_trainers_model(bases, recompute):
    from launch.config.derive import derive
    from launch.config.schema import Recompute

    cfg = copy.deepcopy(bases["deepspeed"])
    cfg.parallel.recompute = Recompute[recompute]
    assert _hf_model(cfg, derive(cfg))["checkpointing"] is (recompute == "full")


@pytest.mark.parametrize("recompute, granularity", [("none", None), ("selective", "selective"), ("full", "full")])
def test_recompute_reaches_megatron_cores_transformer_config(bases, recompute, granularity, tmp_path):
    from megatron.core.transformer import TransformerConfig

    from launch.backends import megatron as mb
    from launch.config.derive import derive
    from launch.config.schema import Recompute
    from launch.record.read import read_backend_file

    cfg = copy.deepcopy(bases["megatron"])
    cfg.parallel.recompute = Recompute[recompute]
    path = tmp_path / "megatron.yaml"
    path.write_text(mb.to_megatron_yaml(cfg, derive(cfg)))  # as render writes it, read back as the trainer does
    tc = TransformerConfig(**mb.resolve(read_backend_file(tmp_path, "megatron.yaml"), "transformer_config"))
    assert tc.recompute_granularity == granularity
    if recompute == "selective":
        assert tc.recompute_modules == ["core_attn"]
    if recompute == "full":
        assert (tc.recompute_method, tc.recompute_num_layers) == ("uniform", 1)
