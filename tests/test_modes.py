"""The schema's modes are enums (prepare_on, dpo_loss, wandb.mode), typed as users type them.

``parallel.sequence_parallel`` (auto | true | false) stays the one exception: users
write true/false, which YAML and Hydra read as bools and OmegaConf 2.3 refuses for an
Enum field, so it is checked by a validation rule and read through ``Derived``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launch.backends.megatron import to_megatron
from launch.backends.megatron_lm import to_megatron_lm_args
from launch.config.schema import DpoLoss, PrepareOn, WandbMode
from launch.record.read import read_config
from tests.conftest import run_trainctl, typed

TP2 = ("parallel.tp=2", "cluster.gpus_per_node=2")


@pytest.mark.parametrize("value,on", [("true", True), ("false", False), ("auto", True)])
def test_sequence_parallel_composes_and_translates(value, on):
    """true/false/auto from the command line reach both Megatron translations."""
    cfg, d = typed(f"parallel.sequence_parallel={value}", *TP2, "train.precision=bf16")
    assert d.sequence_parallel is on
    assert to_megatron(cfg, d)["transformer_config"]["sequence_parallel"] is on
    assert ("--sequence-parallel" in to_megatron_lm_args(cfg, d)) is on


def test_modes_are_enums_with_the_old_defaults():
    cfg, _ = typed("stage=dpo", "stage.from_scratch=true")
    assert cfg.data.prepare_on is PrepareOn.here and cfg.wandb.mode is WandbMode.offline
    assert cfg.stage.dpo_loss is DpoLoss.sigmoid
    assert typed("wandb.mode=disabled", "data.prepare_on=slurm")[0].wandb.mode is WandbMode.disabled


def test_config_yaml_keeps_the_names_users_type(workdir: Path):
    out = run_trainctl("plan", "parallel.sequence_parallel=true", *TP2, "wandb.mode=online", cwd=workdir)
    assert out.returncode == 0, out.stderr
    written = OmegaConf.load(workdir / "runs/run/config.yaml")
    assert written.parallel.sequence_parallel is True and written.wandb.mode == "online"
    assert written.data.prepare_on == "here"
    record = read_config(workdir / "runs/run")
    assert record.cfg.wandb.mode is WandbMode.online and record.derived.sequence_parallel is True


def test_a_yaml_bool_in_an_option_file_works(workdir: Path):
    options = workdir / "conf/parallel"
    options.mkdir(parents=True)
    (options / "sp.yaml").write_text("defaults:\n  - single\ntp: 2\nsequence_parallel: true\n")
    env = {"TRAINCTL_CONFIG_PATH": str(workdir / "conf")}
    out = run_trainctl("plan", "parallel=sp", "cluster.gpus_per_node=2", "train.precision=bf16", cwd=workdir,
                       env=env)
    assert out.returncode == 0, out.stderr
    bad = run_trainctl("plan", "parallel.sequence_parallel=maybe", *TP2, cwd=workdir)
    assert bad.returncode == 2 and "parallel.sequence_parallel" in bad.stderr and "must be auto, true or false" \
        in bad.stderr and "Traceback" not in bad.stderr
