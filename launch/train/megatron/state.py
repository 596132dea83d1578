"""Megatron-Core checkpoints: ``dist_checkpointing`` of the model chunks and the distributed optimizer.

A step saved with one layout loads with another (tp, pp, vpp, dp may change on
resume; the world size too): ``torch_dist`` format, the distributed optimizer saved
``fully_reshardable`` (``dp_reshardable`` cannot change tp: DESIGN, "What is real
here"). Keys are Megatron-LM's (the GPTModels', not their DDP wrappers'). The
sequence around these calls (temporary directory, RNG states, marker, ``latest``)
is the skeleton's (``launch.train.loop``).

Three megatron-core 0.16 traps are worked around here, each through an attribute
``launch.compat`` declares (``MegatronModule`` checks them when it starts): a fresh optimizer has no Adam state to load
into (``create_adam_state``); loading a ``fully_reshardable`` state into torch's
AdamW drops its per-parameter ``step`` (``torch_adam_step_kept``), which must not end
up one tensor shared by every parameter (``unshare_adam_steps``); and the checkpoint writer's
results queue lives in a Manager process that a preemption's SIGTERM kills (``prepare_saves``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

OPTIMIZER_SHARDING = "fully_reshardable"


def _metadata(sharding: str) -> dict:
    return {"distrib_optim_sharding_type": sharding, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True, "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}


def sharded_state_dict(chunks, optimizer, *, loading: bool, with_optimizer: bool = True,
                       sharding: str = OPTIMIZER_SHARDING) -> dict:
    metadata = _metadata(sharding)
    # The GPTModels, not their DDP wrappers (whose keys gain a "module." prefix): Megatron-LM's keys.
    state = {f"model{i}": chunk.module.sharded_state_dict(metadata=metadata) for i, chunk in enumerate(chunks)}
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=loading, metadata=metadata)
    return state


def save(chunks, optimizer, directory: Path, client_state: dict) -> None:
    state = sharded_state_dict(chunks, optimizer, loading=False)
    state["trainctl"] = client_state
    dist_checkpointing.save(state, str(directory), content_metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING})


def _ignore_stop_signals() -> None:
    """The Manager's start: deaf to the stop signals, and killed with the rank that started it (no orphan)."""
    from launch.train.stop import die_with_parent

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)


def prepare_saves() -> None:
    """megatron-core's checkpoint writer keeps its results queue in a Manager process it spawns on the first
    save (``filesystem_async._get_write_results_queue``). Slurm's SIGTERM at a preemption reaches every
    process of the job, that one too: it died, and the stop save after the signal failed (BrokenPipeError),
    losing the job step's work (tests/test_faults_slurm.py caught it). So trainctl starts that Manager
    itself, ignoring the stop signals (the rank decides when to stop), and hands megatron-core its queue;
    at start-up, since spawning it after a stop signal may not finish before Slurm's kill. (Spawned, as
    megatron-core spawns its own: a script that builds the trainer needs a ``__main__`` guard, as
    ``python -m launch.train`` has.)"""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from multiprocessing.managers import SyncManager
    import multiprocessing as mp

    if filesystem_async._results_queue is not None:
        return  # already made (by us)
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_ignore_stop_signals)
    filesystem_async._results_queue = manager.Queue()
    filesystem_async._trainctl_manager = manager  # kept alive with the process


def saved_sharding(step_dir: Path) -> str:
    """How a checkpoint's distributed-optimizer state was saved (ours: fully_reshardable; Megatron-LM's may differ)."""
    content = dist_checkpointing.load_content_metadata(str(step_dir)) or {}
    return content.get("distrib_optim_sharding_type", OPTIMIZER_SHARDING)


def load(chunks, optimizer, step_dir: Path, *, weights_only: bool, sharding: str = OPTIMIZER_SHARDING) -> None:
    """Load the model chunks (and, unless ``weights_only``, the optimizer) from ``step_dir``."""
    if not weights_only:
        create_adam_state(optimizer)
    state = sharded_state_dict(chunks, optimizer, loading=True, with_optimizer=not weights_only, sharding=sharding)
    loaded = dist_checkpointing.load(state, str(step_dir))
    for i, chunk in enumerate(chunks):
        chunk.module.load_state_dict(loaded[f"model{i}"], strict=True)
    if weights_only:
        return
    with torch_adam_step_kept(optimizer):
        optimizer.load_state_dict(loaded["optimizer"])
    unshare_adam_steps(optimizer)


def load_weights(models, step_dir: Path) -> None:
    """The weights of ``step_dir`` (any layout) into bare GPTModels (no DDP wrapper): a frozen reference."""
    state = {f"model{i}": m.sharded_state_dict(metadata=_metadata(saved_sharding(step_dir)))
             for i, m in enumerate(models)}
    loaded = dist_checkpointing.load(state, str(step_dir))
    for i, m in enumerate(models):
        m.load_state_dict(loaded[f"model{i}"], strict=True)


def publish(step_dir: Path, directory: Path) -> None:
    """``step_dir``'s files into ``directory``, hard-linked where the file system allows (no second copy)."""
    shutil.copytree(step_dir, directory, copy_function=_link_or_copy, dirs_exist_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _optimizers(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def create_adam_state(optimizer) -> None:
    """A fresh optimizer has no Adam state for a checkpoint to load into (DESIGN trap): create it.

    megatron-core's own routine: one step with zero gradients. It leaves the weights as they
    are (a zero Adam update; the decay is scaled by the scheduler's rate before step 1, 0) and
    everything it creates is overwritten by the load.
    """
    for opt in _optimizers(optimizer):
        if len(opt.optimizer.state) == 0:
            if hasattr(opt, "_init_optimizer_states_with_dummy_values"):  # DistributedOptimizer
                opt._init_optimizer_states_with_dummy_values()
            elif opt.init_state_fn is not None:
                opt.init_state_fn(opt.optimizer, opt.config)


@contextlib.contextmanager
def torch_adam_step_kept(optimizer):
    """Work around megatron-core 0.16.1 loading a ``fully_reshardable`` state into torch's Adam.

    Without TransformerEngine or Apex its DistributedOptimizer uses torch.optim.AdamW, whose
    per-parameter state holds ``step``; ``load_parameter_state_from_fully_reshardable`` hands
    over every state tensor but ``step`` (restored apart, from the param groups) and the copy
    then fails on the missing key. Here each copy leaves ``step`` aside and puts back a tensor of
    the parameter's own (the loaded one is shared by all parameters: DESIGN trap).
    """
    patched = []
    for opt in _optimizers(optimizer):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None or opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue

        def set_states(model_param, tensors, _opt=opt, _setter=setter):
            group, order = _opt.model_param_group_index_map[model_param]
            state = _opt.optimizer.state[_opt.optimizer.param_groups[group]["params"][order]]
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                _setter(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step.clone()

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # the class's method again


def unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor (DESIGN trap: a loaded, shared one advances per param)."""
    for opt in _optimizers(optimizer):
        for state in opt.optimizer.state.values():
            if "step" in state and hasattr(state["step"], "clone"):
                state["step"] = state["step"].clone()
