"""Schema keys that reach no engine through the backend files, and where each is read instead.

Every leaf key of ``launch.config.schema.Config`` either changes what an engine receives
(ds_config.json, megatron.yaml, megatron_args.txt, or the Hugging Face model the DeepSpeed
trainer builds) or is listed here, once, with where it is read:

- ``login``: only on the login node (plan/estimate, size, tune, the sbatch script and
  launch.sh, submit, prepare, validation);
- ``trainer``: read by the trainer itself from RUN_DIR/config.yaml (not through a backend file);
- ``unused``: in the schema for a stage no trainer runs yet; nothing reads it.

tests/test_reach.py enumerates the schema, changes each key on its own and fails on a key
that changes nothing and is not listed here, or one listed here that does change something.
A new key therefore either reaches an engine or says here why it need not.
"""

from __future__ import annotations

WHERE = ("login", "trainer", "unused")

NOT_IN_ARTIFACTS: dict[str, tuple[str, str]] = {
    # --- names of presets: records and reports only
    "model.name": ("login", "the preset's name: plan, reports, run records"),
    "optim.name": ("login", "the preset's name: plan, reports, run records"),
    "data.name": ("login", "the preset's name: plan, reports, run records"),
    "cluster.name": ("login", "the profile's name: plan, reports, run records"),
    # --- the model and parallel layout, outside the backend files
    "parallel.allow_tp_across_nodes": ("login", "validation's permission for tp > GPUs per node"),
    # --- data
    "data.prepare_on": ("login", "where `trainctl prepare` tokenizes (here or a Slurm array)"),
    "data.sources.*.text_key": ("trainer", "prepare's text column; the SFT trainers' chat field (launch/train/chat.py)"),
    # --- stages
    "stage.from_scratch": ("trainer", "whether the trainers load stage.init_checkpoint (launch.train.preflight.init_checkpoint)"),
    "stage.dpo_beta": ("trainer", "the DPO loss (launch/train/dpo.py, run by launch/train/deepspeed_dpo.py and launch/train/megatron/dpo.py)"),
    "stage.dpo_loss": ("trainer", "the DPO loss variant (launch/train/dpo.py, run by launch/train/deepspeed_dpo.py and launch/train/megatron/dpo.py)"),
    "stage.reference_checkpoint": ("trainer", "DPO's frozen reference (launch/train/deepspeed_dpo.py, launch/train/megatron/dpo.py)"),
    "stage.reward_model": ("trainer", "RLHF: a reward function of TRL's trainer (launch/train/rl.py)"),
    "stage.kl_coef": ("trainer", "RLHF: TRL's beta (launch/train/rl.py trl_args)"),
    "stage.clip_eps": ("trainer", "RLHF: TRL's epsilon (launch/train/rl.py trl_args)"),
    "stage.rl_algorithm": ("trainer", "RLHF: GRPOTrainer or RLOOTrainer (launch/train/rl.py)"),
    "stage.rewards": ("trainer", "RLHF: the reward functions (launch/train/rewards.py resolve)"),
    "stage.num_generations": ("trainer", "RLHF: TRL's num_generations (launch/train/rl.py trl_args)"),
    "stage.max_completion_length": ("trainer", "RLHF: TRL's max_completion_length (launch/train/rl.py)"),
    "stage.temperature": ("trainer", "RLHF: TRL's sampling temperature (launch/train/rl.py trl_args)"),
    "stage.rollout.engine": ("login", "the job script's vLLM server step (launch/executors/rollout.py); the RL trainer: hf generate or vLLM (launch/train/rl.py rollout_args, launch/train/rollout.py)"),
    "stage.rollout.nodes": ("login", "the job script's allocation and its vLLM server step (launch/executors/rollout.py)"),
    "stage.rollout.tensor_parallel": ("login", "the vLLM server's --tensor-parallel-size; colocated, TRL's vllm_tensor_parallel_size (launch/train/rollout.py)"),
    "stage.rollout.gpu_memory_utilization": ("trainer", "colocated vLLM's share of each GPU, TRL's vllm_gpu_memory_utilization (launch/train/rollout.py)"),
    "stage.rollout.port": ("login", "the vLLM server's --port and the script's /health wait; TRL's vllm_server_port (launch/train/rollout.py)"),
    "stage.rollout.server_timeout_s": ("login", "the job script's wait for the vLLM server's /health; TRL's vllm_server_timeout"),
    # --- optimizer
    "optim.z_loss": ("trainer", "the DeepSpeed trainer's loss (launch/train/loss.py); megatron refuses it in validation"),
    # --- training run
    "train.save_final": ("trainer", "the step loop's final save and export (launch/train/loop.py)"),
    "train.keep_checkpoints": ("trainer", "the pruning after each save (launch/record/checkpoints.py prune)"),
    "train.rank_check_s": ("trainer", "launch/train/__main__.py runs the rank check instead of training"),
    "train.rank_check_min_busbw_gbps": ("trainer", "the rank check's bus-bandwidth floor (launch/train/rankcheck.py)"),
    "train.guard.max_consecutive_skips": ("trainer", "the trainers' stop after non-finite steps in a row (launch/train/guard.py)"),
    "train.guard.max_skipped_steps": ("trainer", "the trainers' stop after non-finite steps in all (launch/train/guard.py)"),
    "train.guard.spike_zscore": ("trainer", "the trainers' loss-spike test (launch/train/guard.py)"),
    "train.guard.spike_window": ("trainer", "the trainers' loss-spike test (launch/train/guard.py)"),
    "train.guard.spike_skip_batches": ("trainer", "the data the trainers skip after a rewind (launch/train/guard.py)"),
    "train.guard.max_rewinds": ("trainer", "the trainers' bound on rewinds past loss spikes (launch/train/guard.py)"),
    "train.hang_timeout_s": ("trainer", "the hang watchdog of every rank (launch/train/watchdog.py)"),
    # --- wandb: the trainers' Reporter opens the run (launch/train/metrics.py)
    "wandb.mode": ("trainer", "offline/online/disabled: wandb.init in launch/train/metrics.py (Megatron-LM's flags "
                   "only tell disabled from the rest)"),
    "wandb.entity": ("trainer", "wandb.init(entity=...) in launch/train/metrics.py"),
    "wandb.group": ("trainer", "wandb.init(group=...) in launch/train/metrics.py"),
    "wandb.tags": ("trainer", "wandb.init(tags=...) in launch/train/metrics.py"),
    # --- the cluster: the sbatch script, launch.sh, the estimate
    "cluster.scheduler": ("login", "which executor submits (launch.sh or sbatch)"),
    "cluster.partition": ("login", "#SBATCH --partition"),
    "cluster.account": ("login", "#SBATCH --account"),
    "cluster.qos": ("login", "#SBATCH --qos"),
    "cluster.time_limit": ("login", "#SBATCH --time, and the estimate's jobs-to-finish"),
    "cluster.container_image": ("login", "srun --container-image in the sbatch script"),
    "cluster.container_mounts": ("login", "srun --container-mounts in the sbatch script"),
    "cluster.setup": ("login", "shell lines of the sbatch script before torchrun"),
    "cluster.env": ("login", "exported by the sbatch script"),
    "cluster.export_env": ("login", "#SBATCH --export: the submitting shell's variables the job gets"),
    "cluster.network": ("login", "the NCCL/libfabric variables the sbatch script exports"),
    "cluster.exclusive": ("login", "#SBATCH --exclusive"),
    "cluster.cpus_per_node": ("login", "#SBATCH --cpus-per-task"),
    "cluster.mem": ("login", "#SBATCH --mem"),
    "cluster.mpi": ("login", "srun --mpi"),
    "cluster.python": ("login", "the interpreter launch.sh and the sbatch script start torchrun with"),
    "cluster.shared_paths": ("login", "submit's check that the run directory and interpreter are on node-visible storage"),
    "cluster.rdzv_port": ("login", "torchrun's rendezvous port in the sbatch script"),
    "cluster.directives": ("login", "extra #SBATCH lines"),
    "cluster.signal_lead_s": ("login", "#SBATCH --signal lead time"),
    "cluster.max_requeues": ("login", "the sbatch script's requeue limit"),
    "cluster.max_crash_requeues": ("login", "the sbatch script's crash budget (crashes in a row without a new checkpoint)"),
    "cluster.max_excluded_nodes": ("login", "the sbatch script's cap on nodes left out of a requeued job"),
    "cluster.calibration": ("login", "scales the estimate (launch/estimate/calibration.py)"),
    "cluster.checkpoint_write_gbps": ("login", "the estimate's checkpoint cost and interval; sbatch's signal lead"),
    "cluster.usd_per_gpu_hour": ("login", "the estimate's cost"),
    "cluster.pue": ("login", "the estimate's energy"),
    "cluster.node_overhead_w": ("login", "the estimate's energy"),
    "cluster.grid_kgco2_per_kwh": ("login", "the estimate's carbon"),
    "cluster.gpu.name": ("login", "reports and plan"),
    "cluster.gpu.peak_bf16_tflops": ("trainer", "the step-time estimate; the trainers' logged MFU (launch/train/metrics.py)"),
    "cluster.gpu.peak_fp8_tflops": ("trainer", "the step-time estimate; the trainers' MFU at estimate.mfu_basis=fp8"),
    "cluster.gpu.hbm_gib": ("login", "the memory estimate's limit (validation, OOM check, tune)"),
    "cluster.gpu.hbm_bandwidth_tbps": ("login", "validation of the GPU spec"),
    "cluster.gpu.nvlink_gbps": ("trainer", "the step-time estimate's tensor-parallel traffic; the rank check's "
                                "expected bus bandwidth inside a node (launch/train/rankcheck.py)"),
    "cluster.gpu.ib_gbps": ("trainer", "the step-time estimate's data/pipeline-parallel traffic; the rank check's "
                            "expected bus bandwidth across nodes"),
    "cluster.gpu.power_w": ("login", "the estimate's energy"),
    "cluster.gpu.mtbf_hours": ("login", "the estimate's failure rate and checkpoint interval"),
    # --- the estimator's assumptions (plan.json; the trainer logs plan.json's predictions, not these)
    "estimate.mfu": ("login", "replaces the step-time model in the estimate"),
    "estimate.mfu_basis": ("trainer", "the estimate's MFU basis; the trainers' logged MFU (launch/train/metrics.py)"),
    "estimate.achievable_fraction_dense": ("login", "step-time model"),
    "estimate.achievable_fraction_moe": ("login", "step-time model"),
    "estimate.achievable_fraction_fp8": ("login", "step-time model"),
    "estimate.achievable_fraction_hbm": ("login", "step-time model: an RL stage's decode steps"),
    "estimate.dp_comm_exposed_fraction": ("login", "step-time model"),
    "estimate.tp_comm_exposed_fraction": ("login", "step-time model"),
    "estimate.ep_comm_exposed_fraction": ("login", "step-time model"),
    "estimate.pp_comm_exposed_fraction": ("login", "step-time model"),
    "estimate.cuda_context_gib": ("login", "memory estimate"),
    "estimate.nccl_buffers_gib": ("login", "memory estimate"),
    "estimate.allocator_fragmentation": ("login", "memory estimate"),
    "estimate.flash_attention": ("login", "memory estimate: whether attention scores are stored"),
    "estimate.scaling_law": ("login", "the estimate's predicted loss (size, plan)"),
    "estimate.allow_oom": ("login", "lets render/submit go ahead past the memory estimate"),
    # --- commands
    "submit.preflight": ("login", "submit runs sbatch --test-only"),
    "tune.top_k": ("login", "trainctl tune"),
    "tune.max_micro_batch_size": ("login", "trainctl tune's search"),
    "tune.min_tokens_per_cp_rank": ("login", "trainctl tune's search"),
    "tune.layout_name": ("login", "the parallel/ option trainctl tune writes"),
    "tune.probe": ("login", "trainctl tune submits probe runs"),
    "tune.probe_steps": ("login", "the probe runs' length (they are rendered with train.steps)"),
    "pipeline": ("login", "trainctl submit renders one run per stage (launch/verbs/pipeline.py)"),
}
