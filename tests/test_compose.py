"""Composition: presets carry the published architectures, recipes compose, derived numbers are right."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from launch.config.derive import stage_layers
from launch.config.schema import Activation, BackendName, Normalization, PositionEmbedding, Recompute
from tests.conftest import RECIPES, ROOT, typed

# Published architectures: layers, hidden, FFN, heads, KV groups, vocab, RoPE base.
PRESETS = {
    "llama3_8b": (32, 4096, 14336, 32, 8, 128256, 500000),
    "llama3_70b": (80, 8192, 28672, 64, 8, 128256, 500000),
    "llama3_405b": (126, 16384, 53248, 128, 8, 128256, 500000),
    "mixtral_8x7b": (32, 4096, 14336, 32, 8, 32000, 1000000),
    "mixtral_8x22b": (56, 6144, 16384, 48, 8, 32768, 1000000),
}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_match_the_published_architectures(name):
    cfg, _ = typed(f"model={name}")
    m = cfg.model
    got = (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups,
           m.vocab_size, m.rotary_base)
    assert got == PRESETS[name]
    assert (m.normalization, m.activation, m.position_embedding_type) == (
        Normalization.RMSNorm, Activation.swiglu, PositionEmbedding.rope)
    assert m.untie_embeddings_and_output_weights


def test_moe_presets():
    for name in ("mixtral_8x7b", "mixtral_8x22b"):
        cfg, _ = typed(f"model={name}")
        assert (cfg.model.num_experts, cfg.model.moe_router_topk) == (8, 2)


def test_gpt3_175b_preset():
    m = typed("model=gpt3_175b")[0].model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size, m.seq_length) == (96, 12288, 96, 49152, 2048)
    assert (m.normalization, m.activation, m.position_embedding_type) == (
        Normalization.LayerNorm, Activation.gelu, PositionEmbedding.learned_absolute)
    assert m.add_bias_linear and not m.untie_embeddings_and_output_weights


def test_tiny_is_a_few_million_parameters():
    from launch.estimate.params import params_total

    assert 1e6 < params_total(typed("model=tiny")[0].model) < 10e6


def test_a_custom_architecture_is_a_set_of_overrides():
    cfg, _ = typed("model=llama3_8b", "model.name=my_3b", "model.num_layers=28", "model.hidden_size=3072",
                   "model.ffn_hidden_size=8192", "model.num_attention_heads=24")
    assert (cfg.model.name, cfg.model.num_layers, cfg.model.hidden_size) == ("my_3b", 28, 3072)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_sets_its_name(recipe):
    cfg, _ = typed(f"recipe={recipe}")
    assert cfg.name == recipe


def test_command_line_beats_recipe_beats_group_defaults():
    cfg, _ = typed("recipe=llama3_70b_pretrain_h100")
    assert (cfg.parallel.tp, cfg.cluster.name, cfg.model.name) == (4, "h100", "llama3_70b")
    cfg, _ = typed("recipe=llama3_70b_pretrain_h100", "parallel.tp=8", "model.seq_length=4096")
    assert (cfg.parallel.tp, cfg.model.seq_length, cfg.model.num_layers) == (8, 4096, 80)


def test_command_line_parallel_option_replaces_the_recipes_layout():
    p = typed("recipe=llama3_405b_pretrain_h100")[0].parallel
    assert (p.tp, p.pp) == (8, 16)
    p = typed("recipe=llama3_405b_pretrain_h100", "parallel=single")[0].parallel
    assert (p.tp, p.pp, p.vpp) == (1, 1, 1)  # the whole layout, not single's keys under the recipe's


def test_llama3_405b_recipe_is_the_papers_layout():
    cfg, d = typed("recipe=llama3_405b_pretrain_h100")
    p = cfg.parallel
    assert (p.tp, p.pp, p.cp, d.world_size, cfg.model.seq_length) == (8, 16, 1, 16384, 8192)
    assert d.tokens_per_step == 2048 * 8192  # 16M tokens per step
    assert d.stage_layers == (7,) + (8,) * 14 + (7,)  # 126 + embedding + loss = 16 x 8
    assert d.dp == 128 and d.grad_accum_steps == 16


def test_mixtral_recipe_uses_expert_parallelism():
    cfg, d = typed("recipe=mixtral_8x7b_pretrain_h100")
    assert cfg.parallel.ep == 8 and cfg.backend.name == BackendName.megatron
    assert d.expert_dp == 128 // (8 * 1 * 4)


def test_derived_numbers():
    cfg, d = typed("cluster=h100", "cluster.nodes=4", "model=llama3_8b", "parallel.tp=2", "parallel.pp=2",
                   "parallel.micro_batch_size=2", "train.global_batch_size=64", "train.tokens=1000000000",
                   "train.steps=null")
    assert d.world_size == 32 and d.dp == 8
    assert d.grad_accum_steps == 64 // (2 * 8)
    assert d.tokens_per_step == 64 * 8192
    assert d.steps == -(-1_000_000_000 // (64 * 8192))  # rounded up: at least the tokens asked for
    assert d.sequence_parallel is True  # auto: on when tp > 1
    assert typed("parallel.sequence_parallel=false", "parallel.tp=2", "cluster.gpus_per_node=2")[1].sequence_parallel is False


def test_stage_lr_replaces_optim_lr():
    assert typed("stage=sft", "stage.from_scratch=true")[1].lr == 1e-5
    assert typed("optim.lr=0.002")[1].lr == 0.002


@pytest.mark.parametrize("args,expected", [
    ((8, 1, None, None, False, False), (8,)),
    ((8, 4, None, None, False, False), (2, 2, 2, 2)),
    ((126, 16, None, None, True, True), (7,) + (8,) * 14 + (7,)),
    ((80, 6, 12, 12, False, False), (12, 14, 14, 14, 14, 12)),
    ((30, 4, None, 6, False, False), (8, 8, 8, 6)),
])
def test_stage_layers(args, expected):
    assert stage_layers(*args) == expected
    assert sum(expected) == args[0]


def test_recompute_defaults_follow_the_recipe():
    assert typed("recipe=llama3_405b_pretrain_h100")[0].parallel.recompute == Recompute.full


def test_wheel_install_finds_configs_and_recipes(tmp_path: Path):
    """A regular (non-editable) wheel carries conf/, recipes/ and the sample data inside the package."""
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("trainctl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "launch/_assets/recipes/llama3_405b_pretrain_h100.yaml" in names
    assert "launch/_assets/conf/config.yaml" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # what pip install puts in site-packages
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("HYDRA_FULL_ERROR", None)
    out = subprocess.run([sys.executable, "-c",
                          "import launch, sys; from launch.cli import main; print(launch.__file__);"
                          "sys.exit(main(['plan', 'recipe=tiny_local']))"],
                         cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith(str(target))
    config = (work / "runs/tiny_local/config.yaml").read_text()
    assert str(target / "launch/_assets/data/sample/prose.jsonl") in config


def test_tiny_mix_ships_its_files_and_a_tokenizer_of_tiny_vocab():
    import json

    cfg, _ = typed("recipe=tiny_local")
    assert all(Path(s.path).is_file() for s in cfg.data.sources.values())
    tokenizer = json.loads(Path(cfg.data.tokenizer).read_text())
    assert len(tokenizer["model"]["vocab"]) == cfg.model.vocab_size == 4096
