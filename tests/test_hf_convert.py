"""Checkpoints cross engines: Megatron-Core <-> Hugging Face, and what ``stage.init_checkpoint`` finds.

Both directions on the real models, one CPU process each (torch.cuda redirected to the CPU:
``launch.train.cuda_on_cpu``): a tiny Llama and a tiny Mixtral (the tiny preset with 4 experts,
top-2) are built by ``transformers`` with random weights (norm weights moved off 1, so that a
swapped norm shows), saved, imported into the Megatron trainer's model (``MegatronModule.init_from``:
the path ``stage.init_checkpoint`` takes), and the Megatron logits must match transformers'. The
imported weights are then saved as a distributed checkpoint and exported by ``MegatronModule.export``
(what the trainer writes into ``final/``): transformers loads the export, its logits match, and every
tensor equals the original's bit for bit. Exports from tp 2 and pp 2 training runs are checked in
tests/test_train_megatron.py, which trains them anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.errors import UserError
from launch.record import checkpoints as ckpt
from launch.train.init_source import Format, resolve_init
from tests.conftest import PYTHONPATH, run_trainctl

LOGITS_ATOL = 1e-5
"""Max abs difference of the logits, fp32 (seen: ~8e-7, both families; the attention and the MoE's
weighted sum run in another order)."""
FAMILIES = {"llama": (), "mixtral": ("model.num_experts=4", "model.moe_router_topk=2")}
MEGATRON, DEEPSPEED = (Format.megatron, Format.hf), (Format.hf,)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _hf_model(run_dir: Path, out: Path):
    """A random transformers model of the run's shape, norms moved off 1, saved to ``out``; (model, config)."""
    import torch
    from transformers import AutoModelForCausalLM

    from launch.record.read import read_config
    from launch.train.model import hf_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(read_config(run_dir).cfg, eod=0), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(str(out))
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """{family: (transformers logits, Megatron logits after the import, export dir, HF dir, tokens)}."""
    import torch

    work = tmp_path_factory.mktemp("hf")
    tokens = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, work / "tokens.pt")
    jobs, done = {}, {}
    for family, extra in FAMILIES.items():
        out = run_trainctl("render", "recipe=tiny_local", "backend=megatron", "cluster.gpus_per_node=1",
                           f"name={family}", *extra, cwd=work)
        assert out.returncode == 0, out.stderr
        run_dir = work / "runs" / family
        model = _hf_model(run_dir, work / f"hf_{family}")
        with torch.no_grad():
            done[family] = [model(tokens).logits]
        job = f"{work / f'hf_{family}'},{work / f'{family}.pt'},{work / f'export_{family}'}"
        jobs[family] = subprocess.Popen([sys.executable, "-m", "tests.megatron_logits", str(run_dir),
                                         str(work / "tokens.pt"), job], env=_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)  # both families at once
    for family, proc in jobs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-5000:]
        got = torch.load(work / f"{family}.pt")
        assert got["format"] == "hf" and got["source"] == str(work / f"hf_{family}")
        done[family] += [got["logits"], work / f"export_{family}", work / f"hf_{family}", tokens]
    return done


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_weights_imported_into_megatron_give_transformers_logits(converted, family):
    hf_logits, megatron_logits, *_ = converted[family]
    assert megatron_logits.shape == hf_logits.shape  # the tiny vocabulary needs no padding at tp 1
    assert (megatron_logits - hf_logits).abs().max().item() <= LOGITS_ATOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_megatron_export_loads_in_transformers_with_the_same_logits(converted, family):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    hf_logits, megatron_logits, export, original, tokens = converted[family]
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [f"{family.capitalize()}ForCausalLM"]
    assert (export / "tokenizer.json").is_file() and (export / "megatron/metadata.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(export), local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits
    assert (logits - megatron_logits).abs().max().item() <= LOGITS_ATOL
    # The round trip HF -> Megatron -> HF changes no bit, under the published names (Mixtral's w1/w2/w3).
    weight_map = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(original / "model.safetensors"), "pt") as f:
        assert sorted(weight_map) == sorted(f.keys())
        for name, file in weight_map.items():
            with safe_open(str(export / file), "pt") as g:
                assert torch.equal(g.get_tensor(name), f.get_tensor(name)), name


# --- stage.init_checkpoint: what it finds --------------------------------------------------------

def _hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def _megatron_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    return path


def _committed_step(ckpt_dir: Path, step: int) -> Path:
    tmp = _megatron_dir(ckpt_dir / f".tmp_{ckpt.step_name(step)}")
    return ckpt.commit(ckpt_dir, tmp.name, step, {"step": step, "consumed_samples": 8 * step})


def test_a_run_directory_leads_to_its_final_export_for_either_engine(tmp_path):
    final = tmp_path / "run/checkpoints/final"
    _hf_dir(final)
    _megatron_dir(final / "megatron")
    _committed_step(tmp_path / "run/checkpoints", 4)
    for given in (tmp_path / "run", tmp_path / "run/checkpoints"):
        got = resolve_init(given, MEGATRON, "Megatron-Core")
        assert (got.path, got.format) == (final / "megatron", Format.megatron) and "final/" in got.note
        got = resolve_init(given, DEEPSPEED, "DeepSpeed")
        assert (got.path, got.format) == (final, Format.hf)
    assert resolve_init(final, DEEPSPEED, "DeepSpeed").note == ""  # named directly: nothing to say


def test_an_unfinished_run_gives_megatron_its_newest_step_and_deepspeed_a_refusal(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _committed_step(ckpts, 2)
    newest = _committed_step(ckpts, 4)
    got = resolve_init(ckpts, MEGATRON, "Megatron-Core")
    assert (got.path, got.format) == (newest, Format.megatron) and "has not finished" in got.note
    assert resolve_init(newest, MEGATRON, "Megatron-Core").path == newest  # a step directory, named
    with pytest.raises(UserError, match="(?s)has not finished.*fix: let the run finish"):
        resolve_init(ckpts, DEEPSPEED, "DeepSpeed")


def test_hf_models_load_on_both_engines_and_megatron_checkpoints_only_on_megatron(tmp_path):
    hf = _hf_dir(tmp_path / "hf")
    for formats in (MEGATRON, DEEPSPEED):
        assert resolve_init(hf, formats, "x").format == Format.hf
    dist = _megatron_dir(tmp_path / "old_final")  # a final/ from before the HF export
    with pytest.raises(UserError, match=r"cannot load\n  fix: export it .*python -m launch.train.megatron.export"):
        resolve_init(dist, DEEPSPEED, "DeepSpeed")


def test_the_latest_file_and_missing_paths_are_refused_with_the_fix(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _committed_step(ckpts, 2)
    with pytest.raises(UserError) as exc:
        resolve_init(ckpts / "latest", MEGATRON, "Megatron-Core")
    assert exc.value.problems == [f"stage.init_checkpoint={ckpts / 'latest'}: this is the `latest` pointer of a "
                                  "checkpoint directory (it holds a step's name, not weights)\n  fix: "
                                  f"stage.init_checkpoint={ckpts} (its final/ is used, else the step latest names)"]
    with pytest.raises(UserError, match="no such directory"):
        resolve_init(tmp_path / "nowhere", MEGATRON, "Megatron-Core")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint there"):
        resolve_init(tmp_path / "empty", DEEPSPEED, "DeepSpeed")


def test_an_hf_model_of_another_shape_is_refused_before_building(tmp_path):
    from launch.train.init_source import hf_problems
    from tests.conftest import typed

    cfg, _ = typed("recipe=tiny_local")
    hf = _hf_dir(tmp_path / "hf")
    good = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096, "tie_word_embeddings": False,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "rms_norm_eps": 1e-5}
    (hf / "config.json").write_text(json.dumps(good))
    assert hf_problems(cfg, hf) == []
    (hf / "config.json").write_text(json.dumps({**good, "hidden_size": 512,
                                                "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3"}}))
    assert hf_problems(cfg, hf) == ["hidden_size: the checkpoint has 512, model.hidden_size makes 256",
                                    "head_dim: the checkpoint has 128, model.kv_channels makes 64",
                                    "rope_theta: the checkpoint has 500000.0, model.rotary_base makes 10000.0",
                                    "rope_type: the checkpoint has llama3, (no rope scaling in model.*) makes default"]


def test_the_trainer_refuses_a_latest_file_before_it_builds(tmp_path):
    """Preflight (on the node, before torch): exit 2 with the line above, for either backend."""
    from launch.record.read import RunConfig
    from launch.train import preflight
    from tests.conftest import typed

    ckpts = tmp_path / "pretrain/checkpoints"
    _committed_step(ckpts, 2)
    for backend in ("megatron", "deepspeed"):
        cfg, derived = typed("recipe=tiny_sft", f"backend={backend}", "stage.from_scratch=false",
                             f"stage.init_checkpoint={ckpts / 'latest'}", f"train.checkpoint_dir={tmp_path / 'ck'}")
        problem, code, _ = preflight.preflight(tmp_path, RunConfig(cfg=cfg, raw={}, derived=derived),
                                               preflight.ENGINES[cfg.backend.name])
        assert code == preflight.EXIT_USER == 2
        assert problem == (f"stage.init_checkpoint={ckpts / 'latest'}: this is the `latest` pointer of a checkpoint "
                           "directory (it holds a step's name, not weights)\n  fix: "
                           f"stage.init_checkpoint={ckpts} (its final/ is used, else the step latest names)")
