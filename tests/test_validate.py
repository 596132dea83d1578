"""Every validation rule: a config it accepts and a config it rejects, with the message a user sees."""

from __future__ import annotations

import shlex

import pytest

from launch.config import backend_rules as b
from launch.config import rollout as ro
from launch.config import rules as r
from launch.config import validate as v
from tests.conftest import RECIPES, typed

G8 = "cluster.gpus_per_node=8"
RL = ["recipe=llama3_8b_sft_h100", "stage=rlhf", "stage.init_checkpoint=/models/sft_hf", "stage.rewards=[format]"]

# rule -> (accepted overrides, [(rejected overrides, words the message must contain)])
CASES = {
    r.name_is_a_path_component: (["name=my_run-2.b"], [(["name=a/b"], "name=a/b")]),
    r.values_within_bounds: (["parallel.tp=1", "optim.beta2=0.999", "train.checkpoint_interval=1"], [
        (["parallel.pp=0"], "parallel.pp=0: must be at least 1 and at most 1.04858e+06: a parallel size"),
        (["model.num_layers=0"], "model.num_layers=0: must be at least 1"),
        (["model.num_attention_heads=0"], "model.num_attention_heads=0"),
        (["cluster.gpu.mtbf_hours=0"], "cluster.gpu.mtbf_hours=0.0: must be above 0"),
        (["cluster.gpu.peak_bf16_tflops=-1"], "cluster.gpu.peak_bf16_tflops=-1.0"),
        (["train.steps=0"], "train.steps=0: must be at least 1"),
        (["train.steps=99999999999999999999999"], "train.steps=99999999999999999999999: must be at least 1 and at "
                                                  "most 9.0072e+15"),
        (["train.checkpoint_interval=-2"], "train.checkpoint_interval=-2: must be at least 1"),
        (["optim.beta2=2"], "optim.beta2=2.0: must be at least 0 and below 1"),
        (["optim.eps=0"], "Adam divides by sqrt(v) + eps"),
        (["optim.lr=nan"], "optim.lr=nan: must be above 0"),
        (["model.init_method_std=1e20"], "fix: model.init_method_std=0.02 (the default)"),
        (["cluster.pue=0.5"], "cluster.pue=0.5: must be at least 1"),
        (["train.rank_check_min_busbw_gbps=-1"], "train.rank_check_min_busbw_gbps=-1.0: must be at least 0"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints=0: must be at least 1 and at most 1e+06: at least one "
                                       "checkpoint must be kept"),
        (["cluster.max_excluded_nodes=-1"], "cluster.max_excluded_nodes=-1: must be at least 0"),
        (["backend=deepspeed", "parallel.zero_stage=4"], "DeepSpeed's ZeRO stages are 0 to 3"),
        (["train.guard.max_consecutive_skips=0"], "train.guard.max_consecutive_skips=0: must be at least 1"),
        (["train.guard.spike_window=1"], "train.guard.spike_window=1: must be at least 2"),
        (["train.guard.spike_zscore=1"], "flags ordinary steps"),
        (["stage=rlhf", "stage.num_generations=1"], "stage.num_generations=1: must be at least 2")]),
    r.tokens_or_steps: (
        ["train.tokens=1000000", "train.steps=null"],
        [(["train.tokens=1000"], "exactly one of train.tokens and train.steps")]),
    r.guard_policy: (["train.guard.spike_zscore=null", "train.guard.max_rewinds=0"], [
        (["train.guard.max_skipped_steps=3"], "below the bound on skips in a row")]),
    r.hang_timeout: (["train.hang_timeout_s=0"], [
        (["train.hang_timeout_s=0.5"], "train.hang_timeout_s=0.5: a hang timeout is 0 (no watchdog) or at least 1"),
        (["train.hang_timeout_s=-5"], "train.hang_timeout_s=480 (longer than a checkpoint save)")]),
    r.time_limit_format: (["cluster.time_limit=2-00:00:00"], [(["cluster.time_limit=4h"], "not a positive SLURM time limit"),
                                                              (["cluster.time_limit=00:00:00"], "not a positive")]),
    r.world_divisible_by_model_parallel: (
        [G8, "parallel.tp=2", "parallel.pp=2"],
        [(["cluster.gpus_per_node=6", "parallel.tp=4"], "world size 6 is not divisible by tp*pp*cp = 4*1*1 = 4")]),
    r.expert_layout_divides_world: (
        ["model=mixtral_8x7b", G8, "parallel.ep=8"],
        [(["model=mixtral_8x7b", "cluster.gpus_per_node=6", "parallel.ep=4"], "ep*etp*pp = 4*1*1 = 4")]),
    r.experts_divisible_by_ep: (
        ["model=mixtral_8x7b", G8, "parallel.ep=4"],
        [(["model=mixtral_8x7b", G8, "parallel.ep=3"], "8 experts cannot be split evenly over ep=3"),
         ([G8, "parallel.ep=2"], "needs an MoE model")]),
    r.tp_within_node: (
        ["model=llama3_8b", "cluster.nodes=2", "cluster.gpus_per_node=4", "parallel.tp=8",
         "parallel.allow_tp_across_nodes=true"],
        [(["model=llama3_8b", "cluster.nodes=2", "cluster.gpus_per_node=4", "parallel.tp=8"],
          "parallel.allow_tp_across_nodes=true")]),
    r.heads_divisible_by_tp: (
        ["model=llama3_8b", G8, "parallel.tp=8"],
        [(["model=llama3_8b", "model.num_attention_heads=20", G8, "parallel.tp=8"],
          "20 heads cannot be split evenly over tp=8")]),
    r.query_groups_divisible_by_tp: (
        ["model=llama3_8b", G8, "parallel.tp=8"],
        [(["cluster.gpus_per_node=4", "parallel.tp=4"], "2 KV groups cannot be split evenly over tp=4"),
         (["model.num_query_groups=3"], "multiple of the KV groups")]),
    r.head_dim_is_whole: (
        ["model.num_attention_heads=3", "model.num_query_groups=null", "model.kv_channels=64"],
        [(["model.num_attention_heads=3", "model.num_query_groups=null"], "not divisible by num_attention_heads")]),
    r.vpp_needs_pp: (
        ["parallel.pp=2", "parallel.vpp=2", "cluster.gpus_per_node=2"],
        [(["parallel.vpp=2"], "at least 2 stages")]),
    r.pipeline_split: (
        ["recipe=llama3_405b_pretrain_h100"],
        [(["recipe=llama3_405b_pretrain_h100", "parallel.account_for_embedding_in_pipeline_split=false",
           "parallel.account_for_loss_in_pipeline_split=false"],
          "126 layers cannot be split evenly into pp*vpp = 16*8 = 128 chunks"),
         (["model=llama3_70b", G8, "cluster.nodes=6", "parallel.pp=6",
           "parallel.num_layers_in_first_pipeline_stage=11", "parallel.num_layers_in_last_pipeline_stage=10"],
          "remaining 59 layers cannot be split evenly over 4 middle stages"),
         (["recipe=llama3_405b_pretrain_h100", "parallel.num_layers_in_first_pipeline_stage=6"],
          "cannot be combined")]),
    r.context_parallel_sequence: (
        ["parallel.cp=2", "cluster.gpus_per_node=2"],
        [(["parallel.cp=2", "cluster.gpus_per_node=2", "model.seq_length=254"], "divisible by 2*cp = 4")]),
    r.sequence_fits_positions: (["model.seq_length=128"], [(["model.seq_length=512"], "longer than the model's positions")]),
    r.batch_divisible: (
        ["cluster.gpus_per_node=4"],
        [(["cluster.gpus_per_node=3"], "global batch 8 is not divisible by micro_batch_size*dp = 1*3 = 3")]),
    r.sequence_parallel_setting: (
        ["parallel.sequence_parallel=true", "parallel.tp=2", "cluster.gpus_per_node=2"],
        [(["parallel.sequence_parallel=true"], "needs tp > 1")]),  # =maybe: a composition error (test_cli.py)
    b.deepspeed_layout: (
        ["backend=deepspeed", "parallel.recompute=full", "parallel.offload_params=cpu"],
        [(["backend=deepspeed", "parallel.tp=2", "cluster.gpus_per_node=2"], "backend=megatron"),
         (["backend=deepspeed", "parallel.pp=2", "cluster.gpus_per_node=2"], "parallel.pp=2"),
         (["backend=deepspeed", "parallel.recompute=selective"], "full activation checkpointing only"),
         (["backend=deepspeed", "parallel.zero_stage=2", "parallel.offload_params=cpu"], "needs ZeRO stage 3"),
         (["backend=deepspeed", "parallel.zero_stage=0", "parallel.offload_optimizer=cpu"], "ZeRO stage 1 or higher"),
         (["backend=deepspeed", "cluster=h100", "train.precision=fp8"], "TransformerEngine")]),
    r.sequence_parallel_splits_sequence: (
        ["parallel.tp=2", "cluster.gpus_per_node=2"],
        [(["parallel.tp=2", "cluster.gpus_per_node=2", "model.seq_length=255"], "seq_length/cp = 255 must be divisible by tp")]),
    r.moe_settings: (
        ["recipe=mixtral_8x7b_pretrain_h100", "parallel.tp=2"],
        [(["recipe=mixtral_8x7b_pretrain_h100", "parallel.tp=2", "parallel.sequence_parallel=false"],
          "requires sequence parallelism for MoE"),
         (["model=mixtral_8x7b", "model.moe_router_topk=9"], "more experts than there are")]),
    r.interleaved_schedule_microbatches: (
        ["recipe=gpt3_175b_pretrain_h100", "train.global_batch_size=128"],
        [(["recipe=gpt3_175b_pretrain_h100", "train.global_batch_size=64"], "needs a multiple of pp = 8 micro-batches"),
         (["recipe=gpt3_175b_pretrain_h100", "train.global_batch_size=192"], "this layout has 12")]),
    r.no_secrets_in_files: (
        ["+cluster.env.NCCL_IB_HCA=mlx5"],
        [(["+cluster.env.WANDB_API_KEY=abc"], "looks like a secret"), (["+cluster.env.HF_TOKEN=abc"], "HF_TOKEN"),
         (["+cluster.env.GITHUB_PAT=abc"], "GITHUB_PAT"), (["+cluster.env.HF_AUTH=abc"], "HF_AUTH"),
         (["+cluster.env.SSH_PRIVATE_KEY_FILE=x"], "SSH_PRIVATE_KEY_FILE"),
         (["cluster.setup=['module load cuda', 'export WANDB_API_KEY=0123abc']"],
          "cluster.setup[1]=<hidden>: assigns a literal to WANDB_API_KEY"),
         (["+cluster.directives.comment='HF_TOKEN=abc'"], "assigns a literal to HF_TOKEN"),
         ([f"+cluster.env.NOTE={'hf_' + 'a1B2' * 9}"], "cluster.env.NOTE=<hidden>: holds what looks like a Hugging Face token"),
         ([f"cluster.account={'ghp_' + 'Z9y8' * 9}"], "looks like a GitHub token"),
         ([f"cluster.partition={'AKIA' + 'ABCDEFGH12345678'}"], "looks like an AWS access key")]),
    r.env_names: (["+cluster.env.NCCL_IB_HCA=mlx5"], [(["+cluster.env.NCCL-IB=mlx5"], "cluster.env.NCCL-IB")]),
    b.local_cluster_precision: (["cluster=h100", "train.precision=fp8"], [(["train.precision=fp8"], "FP8 needs H100")]),
    b.local_cluster_is_one_node: (["cluster=h100", "cluster.nodes=2"], [(["cluster=local", "cluster.nodes=2"],
                                                                        "cluster.nodes=2: a local cluster is this one")]),
    r.mixture_weights: (
        ["data.sources.code.weight=0.01"],
        [(["data.sources.code.weight=0"], "data.sources.code.weight=0"),
         (["~data.sources.code", "~data.sources.prose"], "no sources")]),
    r.data_split: (["data.split=[1,0,0]"], [(["data.split=[0.5,0.5]"], "three non-negative fractions")]),
    r.stage_needs_init: (
        ["stage=sft", "stage.init_checkpoint=/ckpt/sft"],
        [(["stage=dpo"], "stage.from_scratch=true"),
         (["stage=rlhf", "stage.init_checkpoint=/ckpt/sft"], "needs something to score")]),
    ro.rollout_settings: (
        [*RL, "stage.rollout.engine=vllm_server", "stage.rollout.nodes=1", "stage.rollout.tensor_parallel=8"],
        [(["stage=sft", "stage.from_scratch=true", "stage.rollout.engine=vllm_server"], "a sft stage generates none"),
         ([*RL, "stage.rollout.nodes=1"], "only the vllm_server engine runs on nodes of its own"),
         ([*RL, "cluster=slurm_local", "stage.rollout.engine=vllm_colocate"], "vLLM runs on GPUs only"),
         ([*RL, "stage.init_checkpoint=null", "stage.from_scratch=true", "stage.rollout.engine=vllm_colocate"],
          "stage.init_checkpoint=/path/to/hf_model"),
         ([*RL, "stage.rollout.engine=vllm_colocate", "stage.rollout.tensor_parallel=3"], "3 does not divide"),
         ([*RL, "stage.rollout.engine=vllm_colocate", "stage.rollout.tensor_parallel=8", "model.num_attention_heads=12"],
          "splits the 12 attention heads"),
         ([*RL, "stage.rollout.engine=vllm_colocate", "stage.rollout.gpu_memory_utilization=1.5"], "must be in (0, 1]"),
         ([*RL, "cluster=h200_local", "stage.rollout.engine=vllm_server", "stage.rollout.nodes=1"],
          "stage.rollout.engine=vllm_colocate (vLLM on the training GPUs)"),
         ([*RL, "stage.rollout.engine=vllm_server", "stage.rollout.nodes=2"], "serves from one node"),
         ([*RL, "stage.rollout.engine=vllm_server", "stage.rollout.nodes=1", "stage.rollout.port=80"], "1024..65535"),
         ([*RL, "stage.rollout.engine=vllm_server", "stage.rollout.nodes=1", "stage.rollout.server_timeout_s=0"],
          "stage.rollout.server_timeout_s=900")]),
    b.z_loss_backend: (
        ["recipe=tiny_local", "optim.z_loss=1e-4"],
        [(["optim.z_loss=1e-4"], "moe_z_loss_coeff"), (["recipe=tiny_local", "optim.z_loss=-1"], "negative")]),
    b.stage_supported_by_backend: (
        ["recipe=llama3_8b_dpo_h100"],
        [(["recipe=llama3_8b_dpo_h100", "backend=megatron", "parallel.cp=2"], "does not add the parts up"),
         (["recipe=llama3_8b_dpo_h100", "backend=megatron", "parallel.cp=2"], "parallel.cp=1"),
         (["recipe=llama3_8b_dpo_h100", "stage=rlhf", "stage.rl_algorithm=ppo", "stage.reward_model=/rm"],
          "no PPO trainer"),
         (["stage=rlhf", "stage.from_scratch=true", "backend=megatron", "stage.rewards=[format]"],
          "run this stage with backend=deepspeed")]),
    r.rl_stage: (
        ["recipe=tiny_grpo"],
        [(["recipe=tiny_grpo", "stage.rewards=[exact_mtch]"], "not a shipped reward"),
         (["recipe=tiny_grpo", "stage.rewards=[json.decoder:nosuchfn]"], "defines no nosuchfn"),
         (["recipe=tiny_grpo", "stage.num_generations=3"], "groups of 3"),
         (["recipe=tiny_grpo", "stage.reward_model=/nonexistent/rm"], "config.json"),
         (["recipe=tiny_grpo", "stage.reference_checkpoint=/ref"], "initial policy")]),
    b.learning_rate_schedule: (
        ["recipe=llama3_8b_sft_h100"],
        [(["stage=sft", "stage.from_scratch=true"], "min_lr 3e-05 is above the peak learning rate 1e-05"),
         (["stage=sft", "stage.from_scratch=true"], "stage.lr=1e-05"),
         (["backend=deepspeed", "optim.warmup_steps=0"], "WarmupCosineLR needs at least one warmup step"),
         (["optim.warmup_steps=20"], "the warmup is as long as the run")]),
    b.deepspeed_nvme_offload: (
        ["backend=deepspeed", "parallel.offload_optimizer=cpu", "parallel.offload_params=cpu"],
        [(["backend=deepspeed", "parallel.offload_optimizer=nvme"], "parallel.offload_optimizer=nvme: NVMe offload"),
         (["backend=deepspeed", "parallel.offload_params=nvme"], "parallel.offload_params=cpu")]),
    b.deepspeed_ulysses: (
        ["recipe=llama3_8b_sft_h100", "parallel.cp=2"],
        [(["recipe=llama3_8b_sft_h100", "model.num_attention_heads=24", "model.num_query_groups=6", "parallel.cp=4"],
          "6 KV heads to divide by cp=4"),
         (["recipe=llama3_8b_sft_h100", "model.num_attention_heads=24", "parallel.cp=16"],
          "24 heads cannot be split evenly over cp=16"),
         (["recipe=llama3_8b_dpo_h100", "parallel.cp=2"], "token-level losses (pretrain, SFT) only")]),
    b.megatron_parallel_needs_transformer_engine: (
        ["train.precision=fp32", "parallel.tp=2", "cluster.gpus_per_node=2"],  # auto: off on CPU runs
        [(["train.precision=fp32", "parallel.tp=2", "parallel.sequence_parallel=true", "cluster.gpus_per_node=2"],
          "TransformerEngine's norms"),
         (["train.precision=fp32", "parallel.cp=2", "cluster.gpus_per_node=2"], "parallel.cp=2, train.precision=fp32")]),
    b.megatron_sft_data: (
        ["stage=sft", "stage.from_scratch=true", "data=chat_sft"],
        [(["stage=sft", "stage.from_scratch=true"], 'under the key "messages"'),
         (["stage=sft", "stage.from_scratch=true", "data=chat_sft", "stage.mask_prompt=false"],
          "always masks the prompt tokens")]),
    r.batch_rampup: (
        ["cluster.gpus_per_node=2", "train.rampup_batch_size=[2,2,16]"],
        [(["train.rampup_batch_size=[2,2]"], "three positive numbers"),
         (["train.rampup_batch_size=[8,2,16]"], "the ramp must start below the global batch"),
         (["train.rampup_batch_size=[2,4,16]"], "the ramp from 2 by 4 does not reach 8"),
         (["cluster.gpus_per_node=2", "train.rampup_batch_size=[2,3,16]"], "multiple of micro_batch_size*dp = 2")]),
    r.estimate_settings: (
        ["estimate.mfu=1.0", "estimate.achievable_fraction_dense=1.0", "estimate.dp_comm_exposed_fraction=0",
         "estimate.allocator_fragmentation=0", "estimate.cuda_context_gib=0"],
        [(["estimate.achievable_fraction_dense=0"], "estimate.achievable_fraction_dense=0.0: a share of the peak"),
         (["estimate.achievable_fraction_fp8=1.2"], "estimate.achievable_fraction_fp8=0.4 (the default)"),
         (["estimate.tp_comm_exposed_fraction=-0.1"], "left exposed must be in [0, 1]"),
         (["estimate.pp_comm_exposed_fraction=-50"], "estimate.pp_comm_exposed_fraction=0.1 (the default)"),
         (["estimate.mfu=0"], "estimate.mfu=0.0: MFU is a share of the peak"),
         (["estimate.mfu=55"], "estimate.mfu=null"),
         (["estimate.nccl_buffers_gib=-1"], "estimate.nccl_buffers_gib=-1.0: a memory overhead cannot be negative"),
         (["estimate.allocator_fragmentation=-0.05"], "estimate.allocator_fragmentation=0.07 (the default)")]),
}


def test_every_rule_has_cases():
    assert set(CASES) == set(v.RULES)


def test_every_rule_function_is_listed_once():
    """A rule written into rules.py or backend_rules.py but not listed in validate.RULES would never run."""
    import inspect

    written = {fn for module in (r, b, ro) for name, fn in inspect.getmembers(module, inspect.isfunction)
               if fn.__module__ == module.__name__ and not name.startswith("_")
               and (module is not ro or list(inspect.signature(fn).parameters) == ["cfg", "d"])}
    assert written == set(v.RULES)
    assert len(v.RULES) == len(set(v.RULES))


@pytest.mark.parametrize("rule", list(CASES), ids=lambda r: r.__name__)
def test_rule_accepts(rule):
    cfg, d = typed(*CASES[rule][0])
    assert list(rule(cfg, d)) == []


REJECTS = [(rule, ov, words) for rule, (_, bad) in CASES.items() for ov, words in bad]


@pytest.mark.parametrize("rule,overrides,words", REJECTS, ids=lambda x: getattr(x, "__name__", None))
def test_rule_rejects(rule, overrides, words):
    cfg, d = typed(*overrides)
    problems = list(rule(cfg, d))
    assert problems, f"{rule.__name__} accepted {overrides}"
    text = "\n".join(map(str, problems))
    assert words in text
    assert "fix:" in text


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_are_valid(recipe):
    cfg, d = typed(f"recipe={recipe}")
    assert v.validate(cfg, d) == []


@pytest.mark.parametrize("layers,pp,vpp", [(80, 6, 1), (126, 16, 1), (126, 16, 2), (62, 8, 1), (30, 4, 1), (100, 7, 1)])
def test_proposed_pipeline_split_is_accepted(layers, pp, vpp):
    """The fix the pipeline rule proposes is itself a valid layout."""
    base = ["model=llama3_70b", f"model.num_layers={layers}", G8, f"cluster.nodes={pp}", f"parallel.pp={pp}",
            f"parallel.vpp={vpp}", "train.global_batch_size=64"]
    cfg, d = typed(*base)
    (problem,) = r.pipeline_split(cfg, d)
    proposed = [w for w in problem.fix.replace("(", " ").split() if w.startswith("parallel.") and "=" in w]
    if not proposed:
        assert "divisors" in problem.fix
        return
    cfg, d = typed(*base, *proposed)
    assert list(r.pipeline_split(cfg, d)) == [], shlex.join(proposed)
    assert sum(d.stage_layers) == layers


def test_backend_scoped_keys_are_ignored():
    """ZeRO settings mean nothing to Megatron, distributed_optimizer nothing to DeepSpeed (ranges still hold:
    ``BOUNDS``)."""
    cfg, d = typed("backend=megatron", "parallel.zero_stage=2", "parallel.offload_params=cpu")
    assert v.validate(cfg, d) == []
    cfg, d = typed("backend=deepspeed", "parallel.distributed_optimizer=false")
    assert v.validate(cfg, d) == []


def test_all_problems_reported_at_once():
    cfg, d = typed("cluster.gpus_per_node=6", "parallel.tp=4", "data.sources.code.weight=-1", "stage=sft")
    keys = [set(p.keys) for p in v.validate(cfg, d)]
    for expected in ({"parallel.tp", "parallel.pp", "parallel.cp"}, {"model.num_query_groups", "parallel.tp"},
                     {"data.sources.code.weight"}, {"stage", "stage.init_checkpoint"}):
        assert any(expected <= k for k in keys), expected


def test_mha_model_gets_one_problem_for_tp():
    cfg, d = typed("recipe=gpt3_175b_pretrain_h100", "parallel.tp=5", "cluster.gpus_per_node=5", "cluster.nodes=64",
                   "parallel.allow_tp_across_nodes=true")
    problems = [str(p) for p in v.validate(cfg, d) if "parallel.tp=5" in str(p) and "heads" in str(p).lower()]
    assert len(problems) == 1 and "num_query_groups" not in problems[0]


def test_every_numeric_key_of_the_schema_has_a_bound_with_a_reason():
    """A numeric key added to the schema without a range would accept -1, 0, NaN and 10^30 unchecked."""
    import dataclasses
    import typing

    from launch.config.schema import BOUNDS, Config

    def numeric(cls, prefix=""):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
            if typing.get_origin(hint) in (list, dict):
                continue  # data.split: data_split checks it
            if dataclasses.is_dataclass(base):
                yield from numeric(base, f"{prefix}{f.name}.")
            elif base in (int, float):
                yield f"{prefix}{f.name}"
    assert set(numeric(Config)) == set(BOUNDS)
    assert all(b.why and b.low < b.high for b in BOUNDS.values())
