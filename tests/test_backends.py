"""Backend translators: DeepSpeed and megatron-core accept what trainctl writes, Megatron-LM's parser
knows every flag, and golden files pin the rendered artifacts of two recipes.

deepspeed and megatron-core are imported once per module, inside fixtures, so the
Megatron-LM and golden-file tests run without them.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import shlex
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from launch.backends import FILES, artifacts, save_interval
from launch.backends.deepspeed import to_deepspeed, to_deepspeed_reference
from launch.backends.megatron import resolve, to_megatron
from launch.estimate.params import model_vocab_size
from launch.backends.megatron_lm import EXIT_SIGNAL, to_megatron_lm_args
from tests.conftest import RECIPES, ROOT, typed

GOLDEN = ROOT / "tests" / "golden"
REFERENCE = GOLDEN / "reference" / "megatron_lm_arguments.json"
"""A copy of reference/megatron_lm_arguments.json (Megatron-LM d98e8a64, 2026-08) so CI has it."""
SHARED_REFERENCE = Path("/work/shared/reference/megatron_lm_arguments.json")

BACKEND = {r: typed(f"recipe={r}")[0].backend.name.value for r in RECIPES}
DS_RECIPES = [r for r in RECIPES if BACKEND[r] == "deepspeed"]
MEGATRON_RECIPES = [r for r in RECIPES if BACKEND[r] == "megatron"]

SFT8B = "recipe=llama3_8b_sft_h100"
TINY_MEGATRON = ("backend=megatron", "train.precision=fp32", "cluster.gpus_per_node=4", "train.steps=100",
                 "optim.warmup_steps=5")
DS_CASES = [(f"recipe={r}",) for r in DS_RECIPES] + [
    (SFT8B, "parallel.zero_stage=0"),
    (SFT8B, "parallel.zero_stage=1"),
    (SFT8B, "parallel.zero_stage=2", "parallel.offload_optimizer=cpu"),
    (SFT8B, "parallel.offload_optimizer=cpu", "parallel.offload_params=cpu"),
    (SFT8B, "parallel.cp=2"),  # Ulysses
    (SFT8B, "optim=wsd", "optim.min_lr=1e-6"),
    ("recipe=tiny_local", "parallel.recompute=full"),
]
MEGATRON_CASES = [(f"recipe={r}",) for r in MEGATRON_RECIPES] + [
    ("recipe=llama3_70b_pretrain_h100", "optim=wsd", "parallel.recompute=full", "train.precision=fp8"),
    ("recipe=llama3_70b_pretrain_h100", "cluster.nodes=192", "parallel.pp=6", "parallel.vpp=1",
     "parallel.num_layers_in_first_pipeline_stage=12", "parallel.num_layers_in_last_pipeline_stage=12"),
    ("recipe=llama3_8b_pretrain_h100", "stage=sft", "data=chat_sft", "stage.init_checkpoint=/ckpt/8b",
     "optim.min_lr=1e-6", "parallel.recompute=none"),
    TINY_MEGATRON,
    (*TINY_MEGATRON, "parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=16"),
]


def _ids(case: tuple[str, ...]) -> str:
    return " ".join(case).replace("recipe=", "")


@functools.lru_cache(maxsize=None)
def _valid(*overrides: str):
    """(Config, Derived), composed once per module; translators only ever see validated configs."""
    from launch.config.validate import validate

    cfg, d = typed(*overrides)
    assert validate(cfg, d) == [], overrides
    return cfg, d


def _render(*overrides: str, run_dir: str | None = None):
    cfg, d = _valid(*overrides)
    return cfg, d, artifacts(cfg, d, run_dir=run_dir)


# --- DeepSpeed ----------------------------------------------------------------

@pytest.fixture(scope="module")
def ds():
    pytest.importorskip("deepspeed")
    import torch
    from deepspeed.runtime import config as ds_config
    from deepspeed.runtime import lr_schedules

    return SimpleNamespace(config=ds_config, lr_schedules=lr_schedules, torch=torch)


def _deepspeed_config(ds, monkeypatch, config: dict, world: int):
    """DeepSpeed's own parser, as if ``world`` processes had started (no process group needed)."""
    monkeypatch.setattr(ds.config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds.config.dist, "get_world_size", lambda *a, **k: world)
    return ds.config.DeepSpeedConfig(json.loads(json.dumps(config)))


@pytest.mark.parametrize("case", DS_CASES, ids=_ids)
def test_deepspeed_accepts_the_config_at_the_target_world_size(ds, monkeypatch, case):
    cfg, d, files = _render(*case)
    config = json.loads(files["ds_config.json"])
    assert config == to_deepspeed(cfg, d)
    assert "auto" not in json.dumps(config)
    parsed = _deepspeed_config(ds, monkeypatch, config, d.world_size)
    p = cfg.parallel
    assert parsed.world_size == d.dp == d.world_size // p.cp
    assert parsed.train_batch_size == cfg.train.global_batch_size == p.micro_batch_size * d.grad_accum_steps * d.dp
    assert parsed.train_micro_batch_size_per_gpu == p.micro_batch_size
    assert parsed.gradient_accumulation_steps == d.grad_accum_steps
    assert parsed.zero_optimization_stage == p.zero_stage
    assert parsed.bfloat16_config.enabled == (cfg.train.precision.name == "bf16")
    assert parsed.gradient_clipping == cfg.optim.clip_grad
    assert parsed.optimizer_params["lr"] == d.lr
    assert not parsed.monitor_config.wandb.enabled  # the trainer logs to wandb itself (launch/train/metrics.py)
    zero, h = parsed.zero_config, cfg.model.hidden_size
    if p.zero_stage:
        assert zero.overlap_comm and zero.reduce_bucket_size == h * h
    if p.zero_stage == 3:
        assert zero.prefetch_bucket_size == int(0.9 * h * h) and zero.param_persistence_threshold == 10 * h
        assert zero.gather_16bit_weights_on_model_save
    assert (zero.offload_optimizer.device if zero.offload_optimizer else "none") == p.offload_optimizer.name
    assert (zero.offload_param.device if zero.offload_param else "none") == p.offload_params.name


@pytest.mark.parametrize("case", DS_CASES, ids=_ids)
def test_deepspeed_refuses_the_config_at_another_world_size(ds, monkeypatch, case):
    cfg, d, files = _render(*case)
    config = json.loads(files["ds_config.json"])
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        _deepspeed_config(ds, monkeypatch, config, 2 * d.world_size)


@pytest.mark.parametrize("case", [c for c in DS_CASES if "optim=wsd" not in c], ids=_ids)
def test_deepspeed_optimizer_and_schedule_build_with_the_rendered_values(ds, case):
    """AdamW and WarmupCosineLR take the params as written; the LR peaks at Derived.lr and ends at min_lr."""
    cfg, d, _ = _render(*case)
    config = to_deepspeed(cfg, d)
    params = dict(config["optimizer"]["params"])
    params.pop("torch_adam", None)  # DeepSpeed's switch, not AdamW's
    weight = ds.torch.nn.Parameter(ds.torch.zeros(2))
    optimizer = ds.torch.optim.AdamW([weight], **{**params, "betas": tuple(params["betas"])})
    schedule = ds.lr_schedules.WarmupCosineLR(optimizer, **config["scheduler"]["params"])
    schedule.step(cfg.optim.warmup_steps)  # DeepSpeed's first cosine step: just below the peak
    assert 0.9 * d.lr < schedule.get_last_lr()[0] <= d.lr
    schedule.step(d.steps)
    assert math.isclose(schedule.get_last_lr()[0], cfg.optim.min_lr)


def test_deepspeed_hands_wsd_to_the_trainer():
    cfg, d, _ = _render(SFT8B, "optim=wsd", "optim.min_lr=1e-6")
    assert "scheduler" not in to_deepspeed(cfg, d)


def test_deepspeed_stages_change_the_lr_and_dpo_adds_a_frozen_reference(ds, monkeypatch):
    sft_cfg, sft_d, sft = _render(SFT8B)
    assert json.loads(sft["ds_config.json"])["optimizer"]["params"]["lr"] == sft_d.lr == sft_cfg.stage.lr == 1e-5
    assert "ds_reference_config.json" not in sft
    cfg, d, files = _render("recipe=llama3_8b_dpo_h100")
    assert json.loads(files["ds_config.json"])["optimizer"]["params"]["lr"] == d.lr == 5e-7
    reference = json.loads(files["ds_reference_config.json"])
    assert reference == to_deepspeed_reference(cfg, d)
    assert "optimizer" not in reference and "scheduler" not in reference
    parsed = _deepspeed_config(ds, monkeypatch, reference, d.world_size)
    assert parsed.zero_optimization_stage == 3 and parsed.optimizer_name is None
    cfg, d, files = _render("recipe=llama3_8b_dpo_h100", "parallel.zero_stage=2")
    assert json.loads(files["ds_reference_config.json"])["zero_optimization"] == {"stage": 0}


def test_deepspeed_cpu_runs_use_torch_adamw():
    cfg, d, _ = _render("recipe=tiny_local")
    assert to_deepspeed(cfg, d)["optimizer"]["params"]["torch_adam"] is True
    cfg, d, _ = _render(SFT8B)
    assert "torch_adam" not in to_deepspeed(cfg, d)["optimizer"]["params"]


# --- Megatron-Core ------------------------------------------------------------

@pytest.fixture(scope="module")
def mcore():
    pytest.importorskip("megatron.core")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        import torch
        from megatron.core import parallel_state
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
        from megatron.core.distributed import DistributedDataParallelConfig
        from megatron.core.models.gpt import GPTModel
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.tokenizers import MegatronTokenizer
        from megatron.core.transformer import TransformerConfig
    return SimpleNamespace(**locals())


def _signature(fn) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


@pytest.mark.parametrize("case", MEGATRON_CASES, ids=_ids)
def test_megatron_core_builds_every_config_object(mcore, case):
    cfg, d, files = _render(*case)
    doc = yaml.safe_load(files["megatron.yaml"])
    assert doc == to_megatron(cfg, d)  # the YAML text holds exactly the translated values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tc = mcore.TransformerConfig(**resolve(doc, "transformer_config"))
        ddp = mcore.DistributedDataParallelConfig(**resolve(doc, "ddp_config"))
        mcore.OptimizerConfig(**resolve(doc, "optimizer_config"))
        # A real megatron-core tokenizer stands in for the Hugging Face one (no transformers here).
        tokenizer = mcore.MegatronTokenizer.from_pretrained(metadata_path={"library": "null"},
                                                            vocab_size=cfg.model.vocab_size)
        data = mcore.GPTDatasetConfig(**resolve(doc, "dataset_config", tokenizer=tokenizer))
    p = cfg.parallel
    sizes = (tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size, tc.context_parallel_size)
    assert sizes == (p.tp, p.pp, p.cp)
    assert tc.virtual_pipeline_model_parallel_size == (p.vpp if p.vpp > 1 else None)
    assert tc.expert_tensor_parallel_size == d.etp and tc.sequence_parallel == d.sequence_parallel
    assert tc.params_dtype == (mcore.torch.float32 if cfg.train.precision.name == "fp32" else mcore.torch.bfloat16)
    assert tc.batch_p2p_comm is (p.vpp == 1)  # interleaved pipelines must not batch p2p (DESIGN trap)
    assert tc.num_moe_experts == cfg.model.num_experts
    assert ddp.use_distributed_optimizer == p.distributed_optimizer
    assert data.blend[0] and math.isclose(sum(data.blend[1]), 1.0)
    assert doc["training"]["num_microbatches"] == d.grad_accum_steps and doc["training"]["train_iters"] == d.steps
    assert set(doc["model_parallel"]) <= _signature(mcore.parallel_state.initialize_model_parallel)
    assert set(doc["gpt_model"]) | set(doc["objects"]["gpt_model"]) <= _signature(mcore.GPTModel.__init__)
    assert doc["gpt_model"]["vocab_size"] % (128 * p.tp) == 0


@pytest.mark.parametrize("case", MEGATRON_CASES, ids=_ids)
def test_megatron_core_schedule_runs_from_peak_to_min_lr(mcore, case):
    cfg, d, _ = _render(*case)
    doc = to_megatron(cfg, d)
    optimizer = mcore.torch.optim.SGD([mcore.torch.nn.Parameter(mcore.torch.zeros(2))], lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schedule = mcore.OptimizerParamScheduler(optimizer, **resolve(doc, "scheduler"))
    schedule.step(cfg.optim.warmup_steps)
    assert math.isclose(optimizer.param_groups[0]["lr"], d.lr)
    schedule.step(d.steps - cfg.optim.warmup_steps)
    assert math.isclose(optimizer.param_groups[0]["lr"], cfg.optim.min_lr)


def test_megatron_core_local_layer_spec_resolves_for_cpu_runs(mcore):
    cfg, d, _ = _render(*TINY_MEGATRON)
    doc = to_megatron(cfg, d)
    assert doc["objects"]["gpt_model"] == {"transformer_layer_spec": "local"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = resolve(doc, "gpt_model")["transformer_layer_spec"]
    assert type(spec).__name__ == "ModuleSpec"
    cfg, d, _ = _render("recipe=llama3_70b_pretrain_h100")
    assert to_megatron(cfg, d)["objects"]["gpt_model"] == {"transformer_layer_spec": "transformer_engine"}


def test_megatron_yaml_names_the_uneven_pipeline_fields():
    cfg, d, _ = _render(*MEGATRON_CASES[-4])
    tc = to_megatron(cfg, d)["transformer_config"]
    assert (tc["num_layers_in_first_pipeline_stage"], tc["num_layers_in_last_pipeline_stage"]) == (12, 12)
    assert d.stage_layers == (12, 14, 14, 14, 14, 12)
    cfg, d, _ = _render("recipe=llama3_405b_pretrain_h100")
    tc = to_megatron(cfg, d)["transformer_config"]
    assert tc["account_for_embedding_in_pipeline_split"] and tc["account_for_loss_in_pipeline_split"]


def test_padded_vocab_is_a_multiple_of_128_tp():
    cfg, d = typed("recipe=gpt3_175b_pretrain_h100")
    assert to_megatron(cfg, d)["gpt_model"]["vocab_size"] == model_vocab_size(cfg) == 51200  # 50257 -> 50 x 1024


# --- Megatron-LM flags --------------------------------------------------------

@pytest.fixture(scope="module")
def reference() -> dict:
    data = json.loads(REFERENCE.read_text())
    if SHARED_REFERENCE.is_file():
        assert json.loads(SHARED_REFERENCE.read_text()) == data, f"{REFERENCE} is stale: copy {SHARED_REFERENCE}"
    return {flag: arg for arg in data["arguments"] for flag in arg["flags"]}


def _check_value(flag: str, arg: dict, value: str) -> str | None:
    """Why Megatron-LM's parser would refuse ``value`` for ``flag``, or None."""
    kind, choices = arg["type"], arg["choices"]
    if kind == "int":
        try:
            int(value)
        except ValueError:
            return f"{flag} {value}: not an int"
    elif kind == "float":
        try:
            float(value)
        except ValueError:
            return f"{flag} {value}: not a float"
    elif kind == "enum_type_handler":  # megatron's handler looks the name up in the enum: Signals[value]
        if flag == "--exit-signal":
            member = getattr(signal.Signals, value, None)
            if member is None or str(int(member)) not in choices:
                return f"{flag} {value}: not a signal name among {choices}"
            return None
        if not any(c.split(".", 1)[-1] == value for c in choices):
            return f"{flag} {value}: not among {choices}"
        return None
    elif kind not in ("str", None):
        return f"{flag}: type {kind} is not checked here; add it"
    if choices is not None and value not in [str(c) for c in choices]:
        return f"{flag} {value}: not among {choices}"
    return None


def _problems(lines: list[str], reference: dict) -> list[str]:
    problems, seen = [], set()
    for line in lines:
        flag, *values = shlex.split(line)
        arg = reference.get(flag)
        if arg is None:
            problems.append(f"{flag}: not a Megatron-LM flag")
            continue
        if arg["dest"] in seen:
            problems.append(f"{flag}: given twice")
        seen.add(arg["dest"])
        nargs = arg["nargs"]
        if arg["action"] in ("_StoreTrueAction", "_StoreFalseAction", "BooleanOptionalAction") or nargs == 0:
            if values:
                problems.append(f"{flag}: a switch takes no value, got {values}")
            continue
        if arg["action"] != "_StoreAction":
            problems.append(f"{flag}: action {arg['action']} not checked here")
        count_ok = {None: len(values) == 1, "?": len(values) <= 1, "*": True, "+": len(values) >= 1}.get(
            nargs, len(values) == nargs)
        if not count_ok:
            problems.append(f"{flag}: {len(values)} values for nargs={nargs}")
        problems += [p for v in values if (p := _check_value(flag, arg, v))]
    return problems


@pytest.mark.parametrize("case", MEGATRON_CASES, ids=_ids)
def test_megatron_lm_flags_exist_with_values_the_parser_accepts(reference, case):
    cfg, d, files = _render(*case, run_dir="/runs/x")
    lines = files["megatron_args.txt"].splitlines()
    assert lines == to_megatron_lm_args(cfg, d, run_dir="/runs/x", save_interval=None)
    assert _problems(lines, reference) == []
    flags = dict(line.split(" ", 1) if " " in line else (line, "") for line in lines)
    p = cfg.parallel
    assert flags["--global-batch-size"] == str(cfg.train.global_batch_size)
    assert flags["--micro-batch-size"] == str(p.micro_batch_size)
    assert flags["--train-iters"] == str(d.steps) and float(flags["--lr"]) == d.lr
    assert flags["--context-parallel-size"] == str(p.cp)
    assert ("--sequence-parallel" in flags) == d.sequence_parallel
    assert ("--num-virtual-stages-per-pipeline-rank" in flags) == (p.vpp > 1)
    assert flags["--exit-signal"] == EXIT_SIGNAL and "--exit-signal-handler" in flags
    data = shlex.split(flags["--data-path"])
    assert len(data) == 2 * len(cfg.data.sources) and math.isclose(sum(map(float, data[::2])), 1.0)


def test_megatron_lm_checker_catches_bad_flags(reference):
    bad = ["--num-layrs 2", "--num-layers two", "--exit-signal SIGFOO", "--exit-signal 10", "--bf16 1",
           "--lr-decay-style cosinus", "--micro-batch-size", "--seed 1", "--seed 2"]
    problems = "\n".join(_problems(bad, reference))
    for words in ("--num-layrs: not a Megatron-LM flag", "two: not an int", "SIGFOO", "--exit-signal 10",
                  "--bf16: a switch", "cosinus", "--micro-batch-size: 0 values", "--seed: given twice"):
        assert words in problems, words


def test_megatron_lm_stage_and_checkpoint_flags():
    cfg, d, files = _render(*MEGATRON_CASES[-3], run_dir="/runs/sft")
    lines = files["megatron_args.txt"].splitlines()
    assert {"--sft", "--tokenizer-type SFTTokenizer", "--pretrained-checkpoint /ckpt/8b",
            "--save /runs/sft/checkpoints", "--load /runs/sft/checkpoints"} <= set(lines)
    assert "--data-path 1.0 /data/sft/chat.jsonl" in lines and f"--lr {d.lr!r}" in lines
    cfg, d = typed("recipe=llama3_70b_pretrain_h100", "train.checkpoint_dir=/ckpt/70b dir")
    lines = to_megatron_lm_args(cfg, d, save_interval=500)
    assert "--save '/ckpt/70b dir'" in lines and "--save-interval 500" in lines
    assert "--tensorboard-dir tensorboard" in lines  # no run directory: relative to the job's directory


def test_save_interval_from_config_or_plan():
    cfg, _ = typed("recipe=llama3_70b_pretrain_h100")
    numbers = {"run": {"checkpoint_interval_min": 30.0}, "throughput": {"step_time_s": 2.5}}
    assert save_interval(cfg, numbers) == 720 and save_interval(cfg, None) is None
    cfg, _ = typed("recipe=llama3_70b_pretrain_h100", "train.checkpoint_interval=100")
    assert save_interval(cfg, numbers) == 100


# --- golden files -------------------------------------------------------------

GOLDEN_CASES = [
    ("llama3_70b_pretrain_h100", ("megatron.yaml", "megatron_args.txt")),
    ("llama3_8b_sft_h100", ("ds_config.json",)),
]


@pytest.mark.parametrize("recipe,names", GOLDEN_CASES, ids=[r for r, _ in GOLDEN_CASES])
def test_golden_files(recipe, names):
    cfg, d = typed(f"recipe={recipe}", "train.checkpoint_interval=1000")
    files = artifacts(cfg, d, run_dir=f"/runs/{recipe}")
    for name in names:
        path = GOLDEN / recipe / name
        if not path.exists():  # first run, or deleted on purpose: record the current rendering
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(files[name])
        expected = path.read_text()
        if files[name] != expected:
            diff = "".join(difflib.unified_diff(expected.splitlines(True), files[name].splitlines(True),
                                                str(path), f"rendered {name}"))
            pytest.fail(f"{name} of {recipe} differs from {path}; delete the golden file if this change is "
                        f"intended (the next run records the new one):\n{diff}")


def test_every_artifact_name_is_listed():
    names = set()
    for case in [("recipe=llama3_8b_dpo_h100",), ("recipe=llama3_70b_pretrain_h100",)]:
        cfg, d = typed(*case)
        names |= set(artifacts(cfg, d))
    assert names == set(FILES)


def test_translators_import_no_training_packages():
    """render runs on login nodes: translating every recipe loads no torch, deepspeed or megatron."""
    code = ("import sys; from tests.conftest import RECIPES, typed; from launch.backends import artifacts\n"
            "for r in RECIPES:\n    cfg, d = typed(f'recipe={r}'); artifacts(cfg, d, run_dir='/r')\n"
            "print([m for m in ('torch', 'deepspeed', 'megatron', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("fp32", [True, False])
def test_gradient_reduction_dtype_reaches_every_backend_file(fp32):
    """train.grad_reduce_in_fp32: the same choice in megatron.yaml, megatron_args.txt (whose Megatron-LM
    default is the bf16 buffer) and ds_config.json."""
    flag = f"train.grad_reduce_in_fp32={str(fp32).lower()}"
    cfg, d = typed("recipe=llama3_70b_pretrain_h100", flag)
    assert to_megatron(cfg, d)["ddp_config"]["grad_reduce_in_fp32"] is fp32
    assert ("--accumulate-allreduce-grads-in-fp32" in to_megatron_lm_args(cfg, d, save_interval=None)) is fp32
    cfg, d = typed("recipe=llama3_8b_sft_h100", flag)
    assert to_deepspeed(cfg, d)["communication_data_type"] == ("fp32" if fp32 else "bf16")


def test_moe_and_fp8_settings_are_defined_once_and_reach_both_megatron_translations():
    """launch/backends/common.py holds them; megatron.yaml and megatron_args.txt both carry those values."""
    from launch.backends.common import FP8, MOE

    assert (MOE.load_balancing, MOE.aux_loss_coeff, MOE.token_dispatcher) == ("aux_loss", 1e-2, "alltoall")
    assert (FP8.format, FP8.recipe, FP8.amax_history_len, FP8.amax_compute_algo) == ("hybrid", "delayed", 1024, "max")
    cfg, d = typed("recipe=mixtral_8x7b_pretrain_h100", "train.precision=fp8")
    tc = to_megatron(cfg, d)["transformer_config"]
    assert (tc["moe_router_load_balancing_type"], tc["moe_aux_loss_coeff"], tc["moe_token_dispatcher_type"]) \
        == (MOE.load_balancing, MOE.aux_loss_coeff, MOE.token_dispatcher)
    assert (tc["fp8"], tc["fp8_recipe"], tc["fp8_amax_history_len"], tc["fp8_amax_compute_algo"]) \
        == (FP8.format, FP8.recipe, FP8.amax_history_len, FP8.amax_compute_algo)
    args = dict(line.split(" ", 1) for line in to_megatron_lm_args(cfg, d) if " " in line)

    def value(flag: str) -> str:
        return args[flag]

    assert (value("--moe-router-load-balancing-type"), float(value("--moe-aux-loss-coeff")),
            value("--moe-token-dispatcher-type")) == (MOE.load_balancing, MOE.aux_loss_coeff, MOE.token_dispatcher)
    assert (value("--fp8-format"), value("--fp8-recipe"), int(value("--fp8-amax-history-len")),
            value("--fp8-amax-compute-algo")) == (FP8.format, FP8.recipe, FP8.amax_history_len, FP8.amax_compute_algo)
