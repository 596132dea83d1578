"""Building a Megatron-Core model: parallel state, one GPTModel per virtual stage, the same weights in every layout.

Everything is megatron-core's own object, built from the rendered ``megatron.yaml``
(``launch.backends.megatron.resolve``): ``parallel_state.initialize_model_parallel``
(tp, pp, vpp, cp, ep, expert tp); one ``GPTModel`` per virtual pipeline stage
(TransformerEngine layers when the spec says so, megatron-core's local layers
otherwise); ``DistributedDataParallel`` (distributed optimizer, overlapped
reduce/gather as the yaml says); ``get_megatron_optimizer``;
``OptimizerParamScheduler``; the schedule from ``get_forward_backward_func``
(interleaved 1F1B when vpp > 1) and ``finalize_model_grads`` for the
data-parallel and embedding reductions.

Weights: every parameter is drawn from a generator seeded by its *global* name
(the key and layer/expert offsets of its sharded-state-dict entry), then sliced to
this rank's shard, so every layout starts from the same model (``init_by_name``).

The learning rate of optimizer step ``s`` (0-based) is ``OptimizerParamScheduler``'s
value after ``s + 1`` increments, so the first update already moves (Megatron-LM's
first update runs at ``init_lr`` = 0) and the warmup is ``launch.train.schedule``'s.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig

from launch.backends import megatron as mb


@dataclass
class Built:
    chunks: list
    """The DDP-wrapped GPTModel of each virtual stage on this rank."""
    optimizer: object
    scheduler: object
    forward_backward: object
    vpp: int
    n_params_local: int
    """This rank's parameters, a tied output layer counted once."""
    overlap_param_gather: bool


def build(doc: dict, device) -> Built:
    """Parallel state, model chunks, DDP, optimizer, scheduler, schedule from the rendered megatron.yaml."""
    ps.initialize_model_parallel(**mb.resolve(doc, "model_parallel"))
    seed = int(doc["training"]["seed"])
    model_parallel_cuda_manual_seed(seed)
    # megatron-core initialises, then init_by_name overwrites every value (the same weights in every
    # layout). Not perform_initialization=False: it also skips tagging the weights tensor-parallel, and
    # the optimizer's grad norm then counts only tp rank 0's shards (silently, a wrong clip).
    tc = TransformerConfig(**mb.resolve(doc, "transformer_config"))
    vpp = doc["model_parallel"]["virtual_pipeline_model_parallel_size"] or 1
    chunks = _gpt_chunks(doc, tc, device)
    n_local = sum(p.numel() for c in chunks for p in c.parameters()  # a tied output layer once
                  if not (getattr(p, "shared_embedding", False) and not c.pre_process))
    init_by_name(chunks, seed=seed, config=tc, device=device)

    ddp_config = DistributedDataParallelConfig(**doc["ddp_config"])
    model = [DistributedDataParallel(config=tc, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
             for i, c in enumerate(chunks)]
    optimizer = get_megatron_optimizer(OptimizerConfig(**mb.resolve(doc, "optimizer_config")), model)
    # Its steps are optimizer steps. Its state is not checkpointed: the run's length may change on
    # resume, so this run's values hold and a resume advances it to the step (MegatronModule.load).
    scheduler = OptimizerParamScheduler(optimizer, **doc["scheduler"])
    # Megatron-LM's wiring of the schedule (training.py: setup_model_and_optimizer, train).
    tc.finalize_model_grads_func = finalize_model_grads
    tc.grad_scale_func = optimizer.scale_loss
    one = (lambda fns: fns[0]) if len(model) == 1 else (lambda fns: fns)
    if ddp_config.overlap_grad_reduce:
        tc.no_sync_func = one([m.no_sync for m in model])
        tc.grad_sync_func = one([m.start_grad_sync for m in model])  # align_grad_reduce
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        tc.param_sync_func = one([m.start_param_sync for m in model])
    return Built(chunks=model, optimizer=optimizer, scheduler=scheduler,
                 forward_backward=get_forward_backward_func(), vpp=vpp, n_params_local=n_local,
                 overlap_param_gather=ddp_config.overlap_param_gather)


def _gpt_chunks(doc: dict, tc, device) -> list:
    """One GPTModel per virtual pipeline stage of this rank (parallel state initialised)."""
    vpp = doc["model_parallel"]["virtual_pipeline_model_parallel_size"] or 1
    spec = mb.resolve(doc, "gpt_model")
    chunks = []
    for vp in range(vpp):
        vp_stage = vp if vpp > 1 else None
        chunks.append(GPTModel(
            tc, **spec, vp_stage=vp_stage,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)).to(device))
    return chunks


def build_frozen(doc: dict, device) -> list:
    """A second model sharded like the trained one (the same tp x pp x vpp chunks on this rank), frozen:
    DPO's reference policy. No DDP wrapper, no gradients, no optimizer state: weights only, in eval mode.

    Its own ``TransformerConfig``: the trained model's carries the schedule's gradient hooks
    (``no_sync_func``, ``finalize_model_grads_func``), which a forward-only pass over this one must
    not call; activation recompute is off (nothing to recompute without a backward pass). Its
    weights start as ``init_by_name`` draws them, the trained model's starting point when the
    stage starts from scratch; a reference checkpoint overwrites them (``state.load_weights``).
    """
    tc = TransformerConfig(**{k: v for k, v in mb.resolve(doc, "transformer_config").items()
                              if not k.startswith("recompute_")})
    chunks = _gpt_chunks(doc, tc, device)
    init_by_name(chunks, seed=int(doc["training"]["seed"]), config=tc, device=device)
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return chunks


# --- deterministic initialisation ---------------------------------------------------------------

def _seed_of(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2 ** 63 - 1)


def _initial_value(key: str, shape, generator, device, config):
    """A full (unsharded) tensor for the parameter ``key``, as megatron-core initialises it.

    Norm weights 1, biases 0, the residual-branch outputs (``linear_proj``, ``linear_fc2``)
    N(0, std / sqrt(2 * layers)), every other matrix N(0, std) (TransformerConfig's
    ``init_method`` and ``output_layer_init_method``).
    """
    leaf = key.rsplit(".", 1)[-1]
    if "norm" in key:
        return (torch.ones if "weight" in leaf else torch.zeros)(shape, device=device)
    if "bias" in leaf:
        return torch.zeros(shape, device=device)
    std = config.init_method_std
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std /= math.sqrt(2.0 * config.num_layers)
    return torch.randn(shape, generator=generator, device=device) * std


def init_by_name(chunks, *, seed: int, config, device) -> int:
    """Give every parameter the same values in every layout; the number of shards written.

    Each global tensor (``fill_by_name``) is drawn whole from a generator seeded by (train.seed, its
    global name: the key and its layer/expert numbers), so every rank slices the same values.
    """
    def draw(key: str, index: tuple, shape) -> torch.Tensor:
        name = key + "".join(f"[{o}]" for o in index)
        gen = torch.Generator(device=device).manual_seed(_seed_of(name, seed))
        return _initial_value(key, shape, gen, device, config)

    return fill_by_name(chunks, draw)


def fill_by_name(chunks, value_of) -> int:
    """Set every parameter shard of ``chunks`` from the global tensors ``value_of(key, index, shape)`` gives;
    the number of shards written.

    The model's sharded state dict names each local tensor by its global key, its layer (and
    expert) numbers (``index``: the offsets on its prepended axes), and where its slice sits in
    the full tensor of ``shape`` (gated MLPs' fc1 as two slices, tied output weights under the
    embedding's key): this rank copies its slice of each. Used for the seeded initialisation and
    for importing Hugging Face weights (``launch.train.megatron.hf``).
    """
    written = 0
    with torch.no_grad():
        for chunk in chunks:
            for item in nested_values(chunk.sharded_state_dict()):
                shards = nested_values(item.build()) if isinstance(item, ShardedTensorFactory) else [item]
                for sh in shards:
                    if not isinstance(sh, ShardedTensor):
                        continue  # _extra_state objects
                    p = sh.prepend_axis_num
                    full = value_of(sh.key, tuple(sh.global_offset[:p]), sh.global_shape[p:])
                    index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[p:], sh.data.shape))
                    sh.data.copy_(full[index].to(sh.data.device, sh.data.dtype))
                    written += 1
    return written
