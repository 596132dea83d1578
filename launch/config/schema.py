"""Typed schema of a trainctl config: one dataclass per config group.

Every YAML option under ``conf/<group>/`` is merged into the dataclass of its
group, so a wrong type (``parallel.tp=abc``) or an unknown key
(``parallel.tpp=2``) fails while Hydra composes, before anything runs.

Field names follow Megatron-Core where an equivalent exists (``num_layers``,
``ffn_hidden_size``, ``num_query_groups``, ...) so that a custom architecture is
a set of overrides and the Megatron translation is a rename-free copy.

OmegaConf 2.3 supports ``Enum`` but not ``Literal``; choices are enums, whose
member names are what a user types (``parallel.recompute=selective``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class Normalization(Enum):
    RMSNorm = "RMSNorm"
    LayerNorm = "LayerNorm"


class Activation(Enum):
    swiglu = "swiglu"  # gated SiLU, three FFN matrices (Llama, Mixtral)
    gelu = "gelu"  # two FFN matrices (GPT-3)


class PositionEmbedding(Enum):
    rope = "rope"
    learned_absolute = "learned_absolute"


class Recompute(Enum):
    none = "none"
    selective = "selective"  # attention core only (Korthikanti et al. 2022, sec. 5)
    full = "full"  # whole transformer layer


class Offload(Enum):
    none = "none"
    cpu = "cpu"
    nvme = "nvme"


class StageKind(Enum):
    pretrain = "pretrain"
    sft = "sft"
    dpo = "dpo"
    rlhf = "rlhf"  # reinforcement learning from rewards: ``stage.rl_algorithm`` says which


class DpoLoss(Enum):
    """DPO loss variants, named as TRL's ``DPOConfig.loss_type``."""
    sigmoid = "sigmoid"  # -log sigmoid(beta * margin) (Rafailov et al. 2023, eq. 7)
    ipo = "ipo"  # (margin - 1 / (2 beta))^2 on length-averaged log-probs (Azar et al. 2023, eq. 17)
    hinge = "hinge"  # relu(1 - beta * margin) (SLiC, Zhao et al. 2023)


class RlAlgorithm(Enum):
    """``stage.rl_algorithm`` for ``stage=rlhf``, named as TRL's trainers."""
    grpo = "grpo"  # group-relative advantages, no value model (Shao et al. 2024, DeepSeekMath); TRL GRPOTrainer
    rloo = "rloo"  # leave-one-out baseline (Ahmadian et al. 2024); TRL RLOOTrainer
    ppo = "ppo"  # refused: it needs a value model, and TRL 1.16 has no PPO trainer


class RolloutEngine(Enum):
    """``stage.rollout.engine``: what generates the completions of an RL stage."""
    hf = "hf"  # transformers' generate() inside the training ranks (CPU tests; slow on GPUs)
    vllm_colocate = "vllm_colocate"  # vLLM inside each training rank, sharing its GPU (TRL vllm_mode=colocate)
    vllm_server = "vllm_server"  # a vLLM server on dedicated nodes of the allocation (TRL vllm_mode=server)


class PrepareOn(Enum):
    """Where ``trainctl prepare`` tokenizes."""
    here = "here"  # in this process
    slurm = "slurm"  # a job array, one task per unfinished shard (cluster.scheduler=slurm)


class WandbMode(Enum):
    """wandb's own mode names (WANDB_MODE)."""
    offline = "offline"  # files under RUN_DIR/wandb, `wandb sync` later
    online = "online"
    disabled = "disabled"


class Schedule(Enum):
    cosine = "cosine"  # linear warmup, cosine decay to min_lr
    wsd = "wsd"  # warmup, stable, decay (Hu et al. 2024, MiniCPM)


class BackendName(Enum):
    megatron = "megatron"
    deepspeed = "deepspeed"


class Scheduler(Enum):
    local = "local"  # processes on this machine (torchrun)
    slurm = "slurm"


class Network(Enum):
    """``cluster.network``: the fabric between nodes; it picks the NCCL and libfabric variables the job
    exports (launch/executors/network.py, each variable with its source)."""
    infiniband = "infiniband"  # NCCL's IB verbs transport on ConnectX (mlx5) HCAs
    roce = "roce"  # the same transport over RoCE v2 (Ethernet): a RoCE v2 GID index
    efa = "efa"  # AWS Elastic Fabric Adapter: libfabric's efa provider through the aws-ofi-nccl plugin
    tcp = "tcp"  # IP sockets only (no RDMA)
    none = "none"  # no variables at all: CPU (gloo) profiles, or a site whose setup lines set them


class SrunMpi(Enum):
    """``srun --mpi``: torchrun needs none; pmix/pmi2 where the site's srun requires one."""
    none = "none"
    pmix = "pmix"
    pmi2 = "pmi2"


class ScalingLaw(Enum):
    chinchilla = "chinchilla"  # Hoffmann et al. 2022, approach 3
    besiroglu = "besiroglu"  # Besiroglu et al. 2024 re-fit of the same data


class MfuBasis(Enum):
    bf16 = "bf16"  # quote MFU against the dense BF16 peak (the convention)
    fp8 = "fp8"  # against the dense FP8 peak


class Precision(Enum):
    bf16 = "bf16"
    fp8 = "fp8"  # bf16 weights, fp8 matmuls (TransformerEngine)
    fp32 = "fp32"  # CPU runs


@dataclass
class ModelConfig:
    """A decoder-only transformer. Presets live in ``conf/model/``."""

    name: str = MISSING
    num_layers: int = MISSING
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING
    """FFN inner size; for MoE, the size of one expert."""
    num_attention_heads: int = MISSING
    num_query_groups: Optional[int] = None
    """KV heads for grouped-query attention; None means one per head (MHA)."""
    kv_channels: Optional[int] = None
    """Head dimension; None means hidden_size / num_attention_heads."""
    vocab_size: int = MISSING
    seq_length: int = MISSING
    """Training sequence length in tokens."""
    max_position_embeddings: Optional[int] = None
    """Longest sequence the positions support; None means seq_length."""
    position_embedding_type: PositionEmbedding = PositionEmbedding.rope
    rotary_base: int = 10000
    normalization: Normalization = Normalization.RMSNorm
    norm_epsilon: float = 1e-5
    activation: Activation = Activation.swiglu
    add_bias_linear: bool = False
    untie_embeddings_and_output_weights: bool = True
    num_experts: Optional[int] = None
    """Experts per MoE layer; None for a dense model."""
    moe_router_topk: int = 2
    """Experts each token is routed to (MoE only)."""
    init_method_std: float = 0.02


@dataclass
class ParallelConfig:
    """How the model is split over GPUs. dp is derived: world / (tp * pp * cp)."""

    tp: int = 1
    """Tensor parallel size; stays inside a node (NVLink)."""
    pp: int = 1
    """Pipeline parallel size."""
    vpp: int = 1
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B); 1 = off."""
    cp: int = 1
    """Context parallel size: splits the sequence."""
    ep: int = 1
    """Expert parallel size (MoE)."""
    etp: Optional[int] = None
    """Tensor parallel size inside experts; None means tp (Megatron's default)."""
    micro_batch_size: int = 1
    sequence_parallel: Any = "auto"
    """auto | true | false; auto is on when tp > 1 (Megatron only), except fp32 (CPU) runs. The one mode
    that is not an Enum: users write true/false, which YAML and Hydra read as bools, and OmegaConf 2.3
    refuses a bool for an Enum field (``rules.sequence_parallel_setting`` checks the value instead)."""
    recompute: Recompute = Recompute.selective
    distributed_optimizer: bool = True
    """Megatron: shard optimizer state over dp. Ignored on deepspeed."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage 0-3. Ignored on megatron."""
    offload_optimizer: Offload = Offload.none
    """DeepSpeed: where optimizer state lives."""
    offload_params: Offload = Offload.none
    """DeepSpeed ZeRO-3: where parameters live."""
    num_layers_in_first_pipeline_stage: Optional[int] = None
    """Uneven split (Megatron --decoder-first-pipeline-num-layers)."""
    num_layers_in_last_pipeline_stage: Optional[int] = None
    """Uneven split (Megatron --decoder-last-pipeline-num-layers)."""
    account_for_embedding_in_pipeline_split: bool = False
    """Count the embedding as one layer of the first stage (Megatron flag)."""
    account_for_loss_in_pipeline_split: bool = False
    """Count the output layer and loss as one layer of the last stage."""
    allow_tp_across_nodes: bool = False
    """Permit tp > GPUs per node (TP traffic then crosses InfiniBand)."""


@dataclass
class DataSource:
    path: str = MISSING
    """Local file or directory: .jsonl, .parquet or .txt."""
    weight: float = MISSING
    """Relative sampling weight; normalised over the mixture."""
    text_key: str = "text"


@dataclass
class DataConfig:
    """A mixture of weighted sources, tokenized with one tokenizer."""

    name: str = MISSING
    sources: Dict[str, DataSource] = field(default_factory=dict)
    """Keyed by source name: data.sources.web.weight=0.7 overrides one."""
    tokenizer: str = MISSING
    """Path to a Hugging Face tokenizer.json."""
    split: List[float] = field(default_factory=lambda: [0.98, 0.01, 0.01])
    """Train / validation / test fractions of each source."""
    prepared_dir: str = "data/prepared"
    """Where `trainctl prepare` writes the indexed shards."""
    prepare_on: PrepareOn = PrepareOn.here
    """here: `trainctl prepare` tokenizes in this process; slurm: it submits a job array with one task
    per shard to the cluster (cluster.scheduler=slurm) and returns at once."""


@dataclass
class RolloutConfig:
    """Where an RL stage's completions are generated (``stage.rollout.*``)."""

    engine: RolloutEngine = RolloutEngine.hf
    nodes: int = 0
    """vllm_server: nodes of the job's allocation that run the vLLM server (the rest train)."""
    tensor_parallel: int = 1
    """vLLM's tensor parallelism (vllm_server: GPUs per server replica)."""
    gpu_memory_utilization: float = 0.3
    """vllm_colocate: the share of each GPU vLLM reserves for weights and KV cache (TRL's default). A
    vllm_server node is vLLM's alone: it takes ``trl vllm-serve``'s default, 0.9."""
    port: int = 8000
    """vllm_server: the server's port on its node."""
    server_timeout_s: int = 900
    """vllm_server: how long the job script waits for the server's ``/health`` before it gives up (loading an 8B
    model and capturing CUDA graphs takes minutes; a 70B from a slow file system longer)."""


@dataclass
class StageConfig:
    """An alignment stage. Fields a stage does not use keep their defaults."""

    kind: StageKind = MISSING
    init_checkpoint: Optional[str] = None
    """Checkpoint to start from; required after pretraining unless from_scratch."""
    from_scratch: bool = False
    """Start a post-training stage from random weights (tests, ablations)."""
    lr: Optional[float] = None
    """Replaces optim.lr for this stage when set."""
    mask_prompt: bool = False
    """SFT/DPO: no loss on prompt tokens."""
    dpo_beta: float = 0.1
    """DPO: strength of the KL constraint (Rafailov et al. 2023)."""
    dpo_loss: DpoLoss = DpoLoss.sigmoid
    """DPO loss variant, as in TRL's DPOConfig.loss_type."""
    reference_checkpoint: Optional[str] = None
    """DPO/RLHF reference policy; None means init_checkpoint."""
    reward_model: Optional[str] = None
    """RLHF: a reward model (a Hugging Face sequence-classification model directory), beside or instead
    of ``rewards``."""
    rl_algorithm: RlAlgorithm = RlAlgorithm.grpo
    """RLHF: GRPO or RLOO (TRL's trainers); PPO is refused with the reason."""
    rewards: List[str] = field(default_factory=list)
    """RLHF: reward functions, each a shipped name (``exact_match``: the completion's answer equals the
    sample's; ``format``: the completion follows the answer format) or a ``module:function`` import path."""
    num_generations: int = 8
    """RLHF: completions sampled per prompt (GRPO's group; TRL's default)."""
    max_completion_length: int = 256
    """RLHF: tokens generated per completion at most (TRL's default)."""
    temperature: float = 1.0
    """RLHF: sampling temperature of the rollouts."""
    kl_coef: float = 0.05
    """RLHF: KL penalty against the reference policy (TRL's ``beta``); 0 loads no reference model."""
    clip_eps: float = 0.2
    """RLHF: the policy-ratio clip (PPO's epsilon, which GRPO and RLOO keep)."""
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig())


@dataclass
class OptimConfig:
    """AdamW with warmup and a decay schedule."""

    name: str = MISSING
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    schedule: Schedule = Schedule.cosine
    warmup_steps: int = 2000
    decay_fraction: float = 0.2
    """WSD only: share of the steps spent decaying at the end."""
    z_loss: float = 0.0
    """Auxiliary loss z_loss * log(Z)^2 per token on the output softmax's normaliser Z, which keeps the
    logits from drifting (PaLM, Chowdhery et al. 2022, sec. 5: 1e-4). 0 = off. DeepSpeed backend only."""


@dataclass
class BackendConfig:
    name: BackendName = MISSING


@dataclass
class GPUSpec:
    """One accelerator. Peak numbers are vendor datasheet figures."""

    name: str = MISSING
    peak_bf16_tflops: float = MISSING
    """Dense BF16 tensor-core peak (H100 SXM: 989)."""
    peak_fp8_tflops: float = MISSING
    """Dense FP8 peak (H100 SXM: 1979)."""
    hbm_gib: float = MISSING
    """Usable memory as the driver reports it, in GiB (H100 80 GB: 79.6)."""
    hbm_bandwidth_tbps: float = MISSING
    nvlink_gbps: float = MISSING
    """NVLink bandwidth per GPU per direction, GB/s (H100 SXM: 450, half of the 900 GB/s datasheet figure,
    which counts both directions). The rank check holds a node's all-reduce bus bandwidth against it."""
    ib_gbps: float = MISSING
    """InfiniBand bandwidth per GPU per direction, GB/s (NDR 400 Gb/s = 50). The rank check expects
    gpus_per_node x this (at most nvlink_gbps) as the all-reduce bus bandwidth across nodes."""
    power_w: float = MISSING
    """Board power at full load, W."""
    mtbf_hours: float = MISSING
    """Mean hours between job-interrupting failures, per GPU."""


@dataclass
class ClusterConfig:
    """Where the job runs. A site's own profile lives on Hydra's search path."""

    name: str = MISSING
    scheduler: Scheduler = MISSING
    nodes: int = 1
    gpus_per_node: int = 8
    """GPUs per node; on cluster=local, processes on this machine."""
    gpu: GPUSpec = MISSING
    usd_per_gpu_hour: float = 0.0
    pue: float = 1.0
    """Data-centre power usage effectiveness applied to GPU energy."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_limit: str = "04:00:00"
    """Per-job wall-clock limit (HH:MM:SS or D-HH:MM:SS)."""
    container_image: Optional[str] = None
    """Run inside this image (pyxis/enroot); None is bare metal."""
    container_mounts: List[str] = field(default_factory=list)
    """Extra pyxis mounts, ``SRC:DST[:FLAGS]``, kept as given; every path the config names, the run and
    checkpoint directories are mounted without them (launch/executors/container.py)."""
    setup: List[str] = field(default_factory=list)
    """Bare metal: shell lines run before launch (modules, venv)."""
    network: Network = Network.infiniband
    """The inter-node fabric: the NCCL/libfabric variables the job exports (launch/executors/network.py)."""
    env: Dict[str, str] = field(default_factory=dict)
    """Environment for the job, over trainctl's and ``network``'s defaults; never put secrets here."""
    export_env: Optional[List[str]] = None
    """Names of the submitting shell's variables the job gets (``#SBATCH --export=NAME,...``, values never
    written: list secrets such as WANDB_API_KEY and HF_TOKEN here by name), for sites that want a job's
    environment to be only what it names. None: Slurm's default, the whole submitting environment.
    Either way every srun step gets the batch script's environment (``srun --export=ALL``)."""
    node_overhead_w: float = 0.0
    """Power per GPU beyond the GPU board (CPUs, NICs, fans), W."""
    grid_kgco2_per_kwh: float = 0.0
    """Carbon intensity of the site's electricity, kg CO2 per kWh (0 = not reported)."""
    checkpoint_write_gbps: float = 100.0
    """Aggregate write bandwidth from the job to checkpoint storage, GB/s."""
    calibration: Optional[str] = None
    """A calibration.json from `trainctl tune tune.probe=true` on this cluster: measured/predicted step
    time and memory, applied to every estimate (launch/estimate/calibration.py)."""
    # --- the sbatch script (slurm/job.sbatch.j2) ---
    exclusive: bool = True
    """``#SBATCH --exclusive``: whole nodes (what a multi-GPU training job wants)."""
    cpus_per_node: Optional[int] = None
    """``--cpus-per-task`` of the one task (torchrun) per node, in #SBATCH and srun. None: with ``exclusive``
    srun takes every CPU of the node (``--cpus-per-task=$SLURM_CPUS_ON_NODE``; the site default is often
    1 CPU, which starves the data loaders); without it, the site's default."""
    mem: Optional[str] = None
    """``--mem`` per node (``0`` = all of it, ``500G``); None leaves it to the site."""
    mpi: SrunMpi = SrunMpi.none
    python: str = "python3"
    """The interpreter on the nodes (inside the container, or after ``setup``) that has trainctl[train];
    on bare metal without ``setup``, submit checks it has the backend's engines (launch/executors/interpreter.py)."""
    shared_paths: List[str] = field(default_factory=list)
    """File systems every node mounts at the same path (``/lustre``, ``/shared``): submit refuses a run
    directory, or a bare-metal interpreter, outside them, which the nodes could not see. Empty: not checked."""
    rdzv_port: int = 20000
    """Base of torchrun's c10d rendezvous port on the first node; a job adds its job id mod 10000."""
    directives: Dict[str, str] = field(default_factory=dict)
    """Extra ``#SBATCH --KEY=VALUE`` lines (constraint, reservation, ...); an empty value renders ``--KEY``."""
    signal_lead_s: Optional[int] = None
    """Seconds before the time limit that SIGUSR1 asks the job to checkpoint and requeue;
    None: one step + twice the estimated checkpoint write + 60 s (Slurm's signal timer granularity)."""
    max_requeues: Optional[int] = None
    """The job is requeued at most this many times in all (SLURM_RESTART_COUNT: time limits, crashes,
    preemptions). None: from the plan, (jobs_needed - 1 + expected_failures) x 1.25 + 10
    (launch/executors/requeue_limit.py says why); a number below the plan's need is refused at plan."""
    max_crash_requeues: int = 3
    """A crash (an unexpected error, or a step that ended without an outcome record) is requeued while it
    is at most the Nth in a row without a new checkpoint between them; a crash after a new checkpoint
    counts 1 again, so a long run survives its expected hardware faults as long as it makes progress.
    0: never requeue a crash. Counted in RUN_DIR/job.crashes.JOBREF (the streak and the ``latest`` it saw)."""
    max_excluded_nodes: int = 8
    """A job requeued after a ``node`` outcome (its health check failed, or torch saw no GPU) or a crash
    leaves that node out (``scontrol update ExcNodeList``), at most this many nodes at once: the oldest
    exclusion falls off, and so does any that would leave the partition fewer usable nodes than the job
    needs, so a long run cannot exclude itself out of nodes. 0: never exclude. Kept in
    RUN_DIR/job.excluded.JOBREF ("NODE<TAB>why" a line, oldest first)."""


@dataclass
class GuardConfig:
    """Bad numbers during training (launch/train/guard.py): non-finite steps skipped, spikes rewound,
    divergence stopped with the outcome ``diverged`` (no requeue)."""

    max_consecutive_skips: int = 5
    """Non-finite steps (loss or gradient norm) in a row that end the run ``diverged``; each one before is
    skipped without an optimizer update. A transient overflow passes in a step or two; five in a row is a
    run that will not recover by itself."""
    max_skipped_steps: int = 50
    """Non-finite steps in the whole run (across requeues) that end it ``diverged``."""
    spike_zscore: Optional[float] = 6.0
    """A step's loss this many standard deviations above the mean of the last ``spike_window`` losses is
    a spike: rewind to the last checkpoint and skip the data (OLMo-core's skip-step optimizers use 6).
    null: no spike detection."""
    spike_window: int = 50
    """Finite losses the spike test compares against; no test until that many steps have run (after a
    start, a resume or a rewind)."""
    spike_skip_batches: int = 200
    """Global batches skipped past the spike's own after a rewind (PaLM skipped 200-500)."""
    max_rewinds: int = 10
    """Rewinds per run (across requeues); the next spike ends the run ``diverged`` (PaLM saw ~20 spikes
    in 780B tokens)."""


@dataclass
class TrainConfig:
    global_batch_size: int = MISSING
    """Sequences per optimizer step."""
    tokens: Optional[int] = None
    """Tokens to train on; steps are derived. Set exactly one of tokens, steps."""
    steps: Optional[int] = None
    rampup_batch_size: Optional[List[int]] = None
    """[START, INCREMENT, SAMPLES]: grow the global batch from START by INCREMENT over the first
    SAMPLES sequences, as Megatron-LM's --rampup-batch-size (launch/config/rampup.py)."""
    precision: Precision = Precision.bf16
    grad_reduce_in_fp32: bool = True
    """Under bf16/fp8, accumulate and reduce gradients in FP32 (Megatron-LM's choice and Llama 3's, sec.
    3.3.4): Megatron keeps a 4 B/param fp32 gradient buffer, 6 + 12/dp B per parameter in all with the
    distributed optimizer. false: bf16 gradients, half the data-parallel traffic, 4 + 16/dp B (the
    distributed optimizer keeps an fp32 copy of its gradient shard), as NVIDIA's tuned H100 recipes run
    (NeMo and Megatron-Bridge performance configs; it is what fits Llama 3.1 405B at TP 8 PP 8 CP 2
    without recompute). DeepSpeed: the dtype of the gradient reduction (communication_data_type).
    No effect at precision=fp32."""
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 10
    checkpoint_interval: Optional[int] = None
    """Steps between checkpoints; None lets the estimator choose (Young/Daly)."""
    checkpoint_dir: Optional[str] = None
    """None means RUN_DIR/checkpoints."""
    keep_checkpoints: int = 3
    """Good checkpoints (sealed marker with a manifest) kept; older step directories are deleted at each
    save. 3: one damaged newest checkpoint still leaves two to fall back to, at three checkpoints'
    space. At least 1; damaged ones never count, so the newest good one is never pruned
    (launch/record/checkpoints.py)."""
    save_final: bool = True
    """Save a checkpoint (and the Hugging Face export) when the run ends. false: a measurement run
    (``trainctl tune``'s probes) that keeps nothing."""
    rank_check_s: float = 0.0
    """> 0: the job trains nothing; every rank joins the process group, measures the all-reduce bus
    bandwidth inside each node and across nodes (rank 0 prints one line per node and names the slowest
    against cluster.gpu.nvlink_gbps), then all-reduces for this many seconds and exits (checks an
    allocation, its links, the rendezvous and the stop signals: launch/train/rankcheck.py)."""
    rank_check_min_busbw_gbps: Optional[float] = None
    """The rank check's floor, GB/s of NCCL-tests' all-reduce bus bandwidth inside a node: the slowest
    node below it ends the job with the ``node`` outcome (so it can be excluded). None: half of
    cluster.gpu.nvlink_gbps (225 GB/s on H100 SXM), no floor on a cpu profile; 0: report only. Set
    your own nodes' figure (nccl-tests' all_reduce_perf at 256 MiB) times a margin to tighten it."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """Non-finite steps, loss spikes and divergence (launch/train/guard.py)."""
    hang_timeout_s: float = 480.0
    """Seconds without training progress (a step, or the start of a build, checkpoint save or load, or
    validation) after which every rank's watchdog dumps its Python stacks to RUN_DIR/hangs/, the job
    step ends with the outcome ``hang`` and the job script requeues it as a crash (launch/train/watchdog.py).
    Below torch's 10-minute NCCL collective timeout (Megatron-Core's process group), which would
    otherwise end a stuck collective first, as a crash with no stacks; above a healthy step, checkpoint
    save or validation pass (those end in a barrier bounded by that timeout anyway). 0: no watchdog."""


@dataclass
class EstimateConfig:
    """The estimator's assumptions, each overridable (estimate.mfu=0.4 replaces the step-time model)."""

    mfu: Optional[float] = None
    """Model FLOPs utilisation to assume instead of the step-time model's prediction."""
    mfu_basis: MfuBasis = MfuBasis.bf16
    """Which peak MFU is quoted against."""
    achievable_fraction_dense: float = 0.55
    """Share of BF16 peak a dense transformer's matmuls reach on H100 (before communication)."""
    achievable_fraction_moe: float = 0.45
    """The same for MoE layers (grouped GEMMs, routing)."""
    achievable_fraction_fp8: float = 0.40
    """Share of FP8 peak reached when train.precision=fp8."""
    achievable_fraction_hbm: float = 0.7
    """Share of HBM bandwidth an RL stage's decode steps reach (vLLM's "model bandwidth utilization"; the
    roofline bound is 1.0). An assumption: calibrate it against a measured rollout (launch/estimate/rollout.py)."""
    dp_comm_exposed_fraction: float = 0.2
    """Share of the data-parallel reduce-scatter/all-gather not hidden behind compute."""
    tp_comm_exposed_fraction: float = 0.3
    """Share of tensor/sequence-parallel collectives not hidden behind compute."""
    ep_comm_exposed_fraction: float = 0.5
    """Share of the MoE all-to-all not hidden behind compute."""
    pp_comm_exposed_fraction: float = 0.1
    """Share of the pipeline's point-to-point sends not hidden behind compute. Megatron-Core overlaps
    them with the next chunk's work under interleaving (overlap_p2p_comm); what shows is the warm-up,
    the cool-down and the waits for a late peer. 0.1 is an assumption, chosen as the largest share
    with which `trainctl tune` still picks NVIDIA's published H100 layouts (tests/test_tune.py)."""
    cuda_context_gib: float = 0.5
    nccl_buffers_gib: float = 1.0
    allocator_fragmentation: float = 0.07
    """Extra share of the estimate lost to the caching allocator's fragmentation."""
    flash_attention: bool = True
    """Attention scores are never stored (FlashAttention / cuDNN fused attention)."""
    scaling_law: ScalingLaw = ScalingLaw.chinchilla
    allow_oom: bool = False
    """Let render/submit go ahead when the memory estimate exceeds HBM."""


@dataclass
class WandbConfig:
    """Where the trainers log to wandb. Offline by default (files under RUN_DIR/wandb, `wandb sync` later)."""

    mode: WandbMode = WandbMode.offline
    """offline | online | disabled; WANDB_MODE in the environment wins."""
    project: str = "trainctl"
    entity: Optional[str] = None
    group: Optional[str] = None
    """None: the run's name, so a sweep's points share a group."""
    tags: List[str] = field(default_factory=list)
    """Added to the automatic tags: stage, backend, and each override of a sweep point."""


@dataclass
class PipelineStage:
    """One stage of a pipeline: a name and the overrides that make its config (usually ``recipe=...``)."""

    name: str = MISSING
    overrides: List[str] = field(default_factory=list)


@dataclass
class SubmitConfig:
    """What ``trainctl submit`` does besides rendering."""

    preflight: bool = False
    """Ask the scheduler (``sbatch --test-only``) whether the request can be met, and queue nothing."""


@dataclass
class TuneConfig:
    """What ``trainctl tune`` searches (launch/verbs/tune.py) and how it probes (launch/verbs/probe.py)."""

    top_k: int = 5
    """Layouts printed, and probed with tune.probe=true."""
    max_micro_batch_size: int = 8
    """Largest micro batch size tried."""
    min_tokens_per_cp_rank: int = 4096
    """Context parallel sizes tried keep at least this many tokens of a sequence on each rank. NVIDIA's
    tuned H100 layouts keep 4K or more (Llama 3 8B/70B/405B at 8K: cp 2; Meta's 128K: cp 16); below that,
    ring steps get short and attention blocks small, costs the step-time model does not see."""
    layout_name: Optional[str] = None
    """The parallel/ option tune writes for the best layout; None: NAME_tuned."""
    probe: bool = False
    """Submit the top K layouts as a job array of short runs and compare measured with predicted."""
    probe_steps: int = 20
    """Training steps per probe run (the first logging window is left out of the measurement)."""


@dataclass
class Config:
    name: str = "run"
    """The run's name: job name and run directory (runs/NAME)."""
    model: ModelConfig = MISSING
    parallel: ParallelConfig = MISSING
    data: DataConfig = MISSING
    stage: StageConfig = MISSING
    optim: OptimConfig = MISSING
    backend: BackendConfig = MISSING
    cluster: ClusterConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    pipeline: List[PipelineStage] = field(default_factory=list)
    """Stages run one after another (pretrain -> sft -> dpo), each from its own overrides; each
    starts from the previous stage's final checkpoint. Empty: a single run."""


def register_schemas() -> None:
    """Store the schema as ``trainctl_schema``, the first entry of ``conf/config.yaml``.

    Every option YAML then merges into a typed node: every key exists with its
    default (``parallel.etp=2`` needs no ``+``), and a misspelt key or a wrong
    type fails while Hydra composes.
    """
    # Here, not at the top: the schema is also read where nothing composes (the trainers, `status`,
    # the run record), and Hydra adds ~0.1 s to their start.
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="trainctl_schema", node=Config)


# --- bounds: the one place that says which numbers make sense, and why ----------------------------

@dataclass(frozen=True)
class Bound:
    low: float
    high: float
    why: str
    open_low: bool = False
    """``low`` itself is out (the value must be above it: a positive float)."""
    open_high: bool = False
    """``high`` itself is out (Adam's betas must stay below 1)."""


_EXACT = 2 ** 53
"""The largest count a float holds exactly: JSON readers, metrics and the estimator see counts as floats."""
_COUNT = Bound(1, _EXACT, "a count of at least one, small enough to be counted exactly")
_PARALLEL = Bound(1, 2 ** 20, "a parallel size: 1 turns that dimension off")
_SHAPE = Bound(1, 2 ** 24, "a model dimension")
_FIGURE = Bound(0, 1e9, "a datasheet figure the estimator divides by", open_low=True)
_FRACTION = Bound(0, 1, "a fraction")
_EFFICIENCY = Bound(0, 1, "a share of the peak actually reached", open_low=True)
_NEVER_NEGATIVE = Bound(0, _EXACT, "a count where 0 means none")
_PORT = Bound(1, 65535, "a TCP port")

BOUNDS: dict[str, Bound] = {
    **{f"parallel.{k}": _PARALLEL for k in ("tp", "pp", "vpp", "cp", "ep", "etp", "micro_batch_size")},
    "parallel.zero_stage": Bound(0, 3, "DeepSpeed's ZeRO stages are 0 to 3"),
    **{f"parallel.num_layers_in_{k}_pipeline_stage": Bound(0, 2 ** 24, "layers on that pipeline stage (null: an "
                                                           "even split)") for k in ("first", "last")},
    "cluster.nodes": Bound(1, 100_000, "nodes of the allocation"),
    "cluster.gpus_per_node": Bound(1, 64, "GPUs (or CPU processes) per node"),
    "train.global_batch_size": Bound(1, 2 ** 32, "sequences per optimizer step"),
    **{f"model.{k}": _SHAPE for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                       "num_query_groups", "kv_channels", "seq_length", "max_position_embeddings",
                                       "num_experts", "moe_router_topk")},
    "model.vocab_size": Bound(1, 2 ** 31 - 1, "token ids are stored as int32 (int16 below 65,500)"),
    "model.rotary_base": Bound(1, 1e12, "RoPE's base: its frequencies are base^(-2i/d)", open_low=True),
    "model.norm_epsilon": Bound(0, 1, "added to the variance under a square root: 0 divides by zero on a "
                                "constant input, 1 or more swamps the variance", open_low=True, open_high=True),
    "model.init_method_std": Bound(0, 1, "the weights' initial standard deviation: above 1 the first forward "
                                   "pass overflows (a hidden size of 4096 multiplies it by 64 per layer)",
                                   open_low=True),
    "optim.lr": Bound(0, 1, "a learning rate above 1 moves every weight further than its own size in a step",
                      open_low=True),
    "optim.min_lr": Bound(0, 1, "the schedule's floor (0: decay to zero)"),
    "optim.weight_decay": Bound(0, 1, "decoupled decay shrinks each weight by lr x weight_decay per step"),
    "optim.beta1": Bound(0, 1, "Adam's first-moment decay: 1 never updates the moment", open_high=True),
    "optim.beta2": Bound(0, 1, "Adam's second-moment decay: 1 never updates the moment, above 1 it grows "
                         "without bound", open_high=True),
    "optim.eps": Bound(0, 1, "Adam divides by sqrt(v) + eps: 0 divides by zero where a gradient is 0",
                       open_low=True),
    "optim.clip_grad": Bound(0, 1e9, "the gradient-norm clip (0: no clipping)"),
    "optim.warmup_steps": _NEVER_NEGATIVE,
    "optim.decay_fraction": _FRACTION,
    "optim.z_loss": Bound(0, 1, "the z-loss coefficient (0: off)"),
    "stage.lr": Bound(0, 1, "the stage's learning rate (null: optim.lr)", open_low=True),
    "stage.dpo_beta": Bound(0, 1000, "DPO's beta scales the log-ratio margin: 0 makes every loss log 2",
                            open_low=True),
    "stage.num_generations": Bound(2, 2 ** 14, "GRPO/RLOO compare a prompt's completions with each other: "
                                   "one completion has nothing to be compared with"),
    "stage.max_completion_length": _SHAPE,
    "stage.temperature": Bound(0, 100, "sampling temperature: 0 is not sampling", open_low=True),
    "stage.kl_coef": Bound(0, 1000, "the KL penalty's coefficient (0: none)"),
    "stage.clip_eps": Bound(0, 1, "the policy ratio's clip range", open_low=True),
    "stage.rollout.nodes": Bound(0, 100_000, "nodes for a vLLM server (0: generation colocated)"),
    "stage.rollout.tensor_parallel": Bound(1, 64, "vLLM's tensor-parallel size"),
    "stage.rollout.gpu_memory_utilization": Bound(0, 1, "the share of GPU memory vLLM takes", open_low=True),
    "stage.rollout.port": _PORT,
    "stage.rollout.server_timeout_s": Bound(1, 2 ** 31, "seconds to wait for the vLLM server"),
    **{f"cluster.gpu.{k}": _FIGURE for k in ("peak_bf16_tflops", "peak_fp8_tflops", "hbm_gib",
                                              "hbm_bandwidth_tbps", "nvlink_gbps", "ib_gbps", "power_w",
                                              "mtbf_hours")},
    "cluster.usd_per_gpu_hour": Bound(0, 1e6, "a price (0 when you do not know it)"),
    "cluster.pue": Bound(1, 10, "power usage effectiveness: facility power over IT power, 1 at best"),
    "cluster.node_overhead_w": Bound(0, 1e6, "watts a node draws besides its GPUs"),
    "cluster.grid_kgco2_per_kwh": Bound(0, 10, "the grid's carbon intensity (0 when unknown)"),
    "cluster.checkpoint_write_gbps": _FIGURE,
    "cluster.cpus_per_node": Bound(1, 2 ** 20, "CPUs per node"),
    "cluster.rdzv_port": _PORT,
    "cluster.signal_lead_s": Bound(0, 2 ** 31, "seconds before the time limit that Slurm signals the job"),
    "cluster.max_requeues": Bound(0, 1_000_000, "requeues of one job (0: never requeue)"),
    "cluster.max_crash_requeues": Bound(0, 1_000_000, "crashes in a row that are requeued (0: none)"),
    "cluster.max_excluded_nodes": Bound(0, 100_000, "nodes a requeued job may leave out (0: never exclude one)"),
    "train.tokens": _COUNT,
    "train.steps": _COUNT,
    "train.seed": Bound(0, 2 ** 32 - 1, "numpy's and torch's seeds are 32-bit"),
    "train.log_interval": _COUNT,
    "train.eval_interval": _NEVER_NEGATIVE,
    "train.eval_iters": _COUNT,
    "train.checkpoint_interval": Bound(1, _EXACT, "steps between checkpoints (null: from the failure rate); "
                                       "a resume needs a checkpoint to load"),
    "train.keep_checkpoints": Bound(1, 1_000_000, "at least one checkpoint must be kept to resume from"),
    "train.rank_check_s": Bound(0, 1e6, "seconds of the allocation check (0: train)"),
    "train.rank_check_min_busbw_gbps": Bound(0, 1e9, "a bus-bandwidth floor (0: only report)"),
    "train.guard.max_consecutive_skips": _COUNT,
    "train.guard.max_skipped_steps": _COUNT,
    "train.guard.spike_zscore": Bound(1, 1e6, "a spike threshold of 1 standard deviation or less flags "
                                      "ordinary steps (a sixth of them)", open_low=True),
    "train.guard.spike_window": Bound(2, 1_000_000, "a standard deviation needs two losses"),
    "train.guard.spike_skip_batches": _NEVER_NEGATIVE,
    "train.guard.max_rewinds": _NEVER_NEGATIVE,
    "train.hang_timeout_s": Bound(0, 1e7, "seconds without progress before the watchdog fires (0: off)"),
    "estimate.mfu": Bound(0, 1, "a model FLOPs utilization (null: modelled)", open_low=True),
    **{f"estimate.achievable_fraction_{k}": _EFFICIENCY for k in ("dense", "moe", "fp8", "hbm")},
    **{f"estimate.{k}_comm_exposed_fraction": _FRACTION for k in ("dp", "tp", "ep", "pp")},
    "estimate.cuda_context_gib": Bound(0, 1000, "GiB per GPU"),
    "estimate.nccl_buffers_gib": Bound(0, 1000, "GiB per GPU"),
    "estimate.allocator_fragmentation": Bound(0, 1, "a share of the allocated memory", open_high=True),
    "tune.top_k": Bound(1, 10_000, "layouts to show or probe"),
    "tune.max_micro_batch_size": _PARALLEL,
    "tune.min_tokens_per_cp_rank": Bound(1, 2 ** 30, "tokens per context-parallel rank"),
    "tune.probe_steps": Bound(2, 1_000_000, "a probe's first logging window is start-up and is not measured"),
}
"""Every numeric key's sensible range, with the reason; ``launch.config.rules.values_within_bounds``
checks them all (a null optional key is not checked). Rules that relate keys to each other live in
``launch.config.rules``."""
