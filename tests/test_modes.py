"""The schema's modes are enums (sequence_parallel, prepare_on, dpo_loss, wandb.mode), typed as users type them.

``parallel.sequence_parallel`` has members named true and false, which YAML and
Hydra read as bools: launch/config/bool_names.py quotes them before composing.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launch.backends.megatron import to_megatron
from launch.backends.megatron_lm import to_megatron_lm_args
from launch.config.bool_names import KEYS, quote_overrides
from launch.config.schema import Config, DpoLoss, PrepareOn, SequenceParallel, WandbMode
from launch.run_record import read_config
from tests.conftest import run_trainctl, typed

TP2 = ("parallel.tp=2", "cluster.gpus_per_node=2")


@pytest.mark.parametrize("value,member,on", [("true", SequenceParallel.true, True),
                                             ("false", SequenceParallel.false, False),
                                             ("auto", SequenceParallel.auto, True)])
def test_sequence_parallel_composes_and_translates(value, member, on):
    """true/false/auto from the command line compose to the enum and reach both Megatron translations."""
    cfg, d = typed(f"parallel.sequence_parallel={value}", *TP2, "train.precision=bf16")
    assert cfg.parallel.sequence_parallel is member and d.sequence_parallel is on
    assert to_megatron(cfg, d)["transformer_config"]["sequence_parallel"] is on
    assert ("--sequence-parallel" in to_megatron_lm_args(cfg, d)) is on


@pytest.mark.parametrize("given,sent", [
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel='true'"),
    ("++parallel.sequence_parallel=False", "++parallel.sequence_parallel='false'"),
    ("parallel.sequence_parallel=true,false,auto", "parallel.sequence_parallel='true','false',auto"),
    ("parallel.sequence_parallel='true'", "parallel.sequence_parallel='true'"),
    ("parallel.sequence_parallel=auto", "parallel.sequence_parallel=auto"),
    ("train.save_final=false", "train.save_final=false"),  # a real bool key: untouched
    ("-m", "-m"),
])
def test_quote_overrides(given, sent):
    assert quote_overrides([given]) == [sent]


def _bool_named(schema: type, prefix: str = "") -> list[str]:
    found = []
    for f in dataclasses.fields(schema):
        hint = typing.get_type_hints(schema)[f.name]
        if dataclasses.is_dataclass(hint):
            found += _bool_named(hint, f"{prefix}{f.name}.")
        elif isinstance(hint, type) and issubclass(hint, enum.Enum) and {"true", "false"} & set(hint.__members__):
            found.append(f"{prefix}{f.name}")
    return found


def test_bool_names_lists_every_enum_with_true_or_false_members():
    assert sorted(KEYS) == sorted(_bool_named(Config))


def test_modes_are_enums_with_the_old_defaults():
    cfg, _ = typed("stage=dpo", "stage.from_scratch=true")
    assert cfg.parallel.sequence_parallel is SequenceParallel.auto
    assert cfg.data.prepare_on is PrepareOn.here and cfg.wandb.mode is WandbMode.offline
    assert cfg.stage.dpo_loss is DpoLoss.sigmoid
    assert typed("wandb.mode=disabled", "data.prepare_on=slurm")[0].wandb.mode is WandbMode.disabled


def test_config_yaml_keeps_the_names_users_type(workdir: Path):
    out = run_trainctl("plan", "parallel.sequence_parallel=true", *TP2, "wandb.mode=online", cwd=workdir)
    assert out.returncode == 0, out.stderr
    written = OmegaConf.load(workdir / "runs/run/config.yaml")
    assert written.parallel.sequence_parallel == "true" and written.wandb.mode == "online"
    assert written.data.prepare_on == "here" and "sequence_parallel: 'true'" in (workdir / "runs/run/config.yaml").read_text()
    assert read_config(workdir / "runs/run").cfg.parallel.sequence_parallel is SequenceParallel.true


def test_an_older_config_yaml_with_a_bool_still_reads(workdir: Path):
    """Before the enum, config.yaml held ``sequence_parallel: true`` (a YAML bool); a requeued job reads it."""
    assert run_trainctl("plan", "parallel.sequence_parallel=true", *TP2, cwd=workdir).returncode == 0
    path = workdir / "runs/run/config.yaml"
    path.write_text(path.read_text().replace("sequence_parallel: 'true'", "sequence_parallel: true"))
    record = read_config(workdir / "runs/run")
    assert record.cfg.parallel.sequence_parallel is SequenceParallel.true and record.derived.sequence_parallel


def test_a_yaml_bool_in_an_option_file_says_to_quote_it(workdir: Path):
    options = workdir / "conf/parallel"
    options.mkdir(parents=True)
    (options / "sp.yaml").write_text("defaults:\n  - single\ntp: 2\nsequence_parallel: true\n")
    env = {"TRAINCTL_CONFIG_PATH": str(workdir / "conf")}
    out = run_trainctl("plan", "parallel=sp", "cluster.gpus_per_node=2", cwd=workdir, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "parallel.sequence_parallel: Invalid value 'True'" in out.stderr and "parallel/sp.yaml" in out.stderr
    assert "fix: quote it in the YAML file: sequence_parallel: 'true'" in out.stderr
    (options / "sp.yaml").write_text("defaults:\n  - single\ntp: 2\nsequence_parallel: 'true'\n")
    assert run_trainctl("plan", "parallel=sp", "cluster.gpus_per_node=2", cwd=workdir, env=env).returncode == 0


def test_a_checkpoint_recorded_with_a_bool_still_resumes():
    """A checkpoint saved before the enum recorded ``sequence_parallel: false``; the record now says 'false'."""
    from launch.train.checkpoint import config_diff

    saved = {"parallel": {"sequence_parallel": False, "tp": 1}}
    assert config_diff(saved, {"parallel": {"sequence_parallel": "false", "tp": 1}}) == []
    assert config_diff(saved, {"parallel": {"sequence_parallel": "auto", "tp": 1}}) \
        == ["parallel.sequence_parallel: 'false' -> 'auto'"]
