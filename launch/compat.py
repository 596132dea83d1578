"""Every use of a private API of Hydra, DeepSpeed, megatron-core or torch, with the versions it was tested on.

A private attribute can vanish or change its signature in any release, and a
multi-week run meets new versions (NGC images ship newer torch and megatron-core
than CI). So each such use is declared here as a ``Patch``: the package, the
version range it was tested on, the attribute, and why we touch it. Before the
code relies on one it calls ``require(patch)``:

- the attribute is missing, or no longer takes the arguments we pass: ``CompatError``
  (a ``UserError``: exit 2, no traceback) naming the package, the version found and
  what is missing, so the job stops before its first step instead of failing (or
  silently doing the wrong thing) later;
- the attribute is there but the version is outside the tested range: one warning,
  and the run goes on.

The code that uses each patch stays where it is used; this module only declares and checks.
The engines (DeepSpeed, megatron-core, transformers), whose versions vary between clusters, are
checked at run time before first use; Hydra and OmegaConf, pinned in pyproject.toml and used on
every command line where a check would cost start-up time, are checked by
``tests/test_compat.py``, which runs ``require`` on every entry of ``PATCHES``.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from dataclasses import dataclass
from importlib import metadata

from launch.errors import UserError


class CompatError(UserError):
    """An installed package lacks a private attribute trainctl relies on."""


@dataclass(frozen=True)
class Patch:
    package: str
    """The distribution's name on the package index."""
    tested: tuple[str, str]
    """[lowest, first untested) versions, as in ``>=lowest,<first``."""
    module: str
    attribute: str
    """Dotted inside ``module`` (``Class.method``)."""
    parameters: tuple[str, ...] = ()
    """Parameters the attribute must accept (a callable's signature check)."""
    why: str = ""


HYDRA_MODE_PROBE = Patch(
    "hydra-core", ("1.3", "1.4"), "hydra._internal.hydra", "Hydra.get_mode",
    ("config_name", "overrides"),
    "trainctl's CLI skips the composition hydra.main runs only to read hydra.mode (launch/cli.py).")
MEGATRON_ADAM_DUMMY_STATE = Patch(
    "megatron-core", ("0.16", "0.17"), "megatron.core.optimizer.distrib_optimizer",
    "DistributedOptimizer._init_optimizer_states_with_dummy_values", (),
    "a fresh optimizer has no Adam state for a checkpoint to load into (launch/train/megatron/state.py).")
MEGATRON_ADAM_SET_STATES = Patch(
    "megatron-core", ("0.16", "0.17"), "megatron.core.optimizer.distrib_optimizer",
    "DistributedOptimizer._set_main_param_and_optimizer_states", ("model_param", "tensors"),
    "0.16.1 drops torch AdamW's per-parameter 'step' when loading a fully_reshardable state; wrapped per "
    "optimizer during the load (launch/train/megatron/state.py).")
HYDRA_FILE_SOURCE = Patch(
    "hydra-core", ("1.3", "1.4"), "hydra._internal.core_plugins.file_config_source", "FileConfigSource",
    ("provider", "path"),
    "conf/, recipes/ and TRAINCTL_CONFIG_PATH are served as one Hydra config source (launch/config/source.py).")
OMEGACONF_NODE = Patch(
    "omegaconf", ("2.3", "2.4"), "omegaconf.dictconfig", "DictConfig._get_node", ("key",),
    "a composed group that is absent or ??? is found without resolving it (launch/config/hydra_errors.py).")
MEGATRON_CUDA_RNG_GET = Patch(
    "megatron-core", ("0.16", "0.17"), "megatron.core.tensor_parallel.random", "_get_cuda_rng_state", (),
    "the CPU test mode points megatron's CUDA RNG tracker at the CPU generator (launch/train/cuda_on_cpu.py).")
MEGATRON_CUDA_RNG = Patch(
    "megatron-core", ("0.16", "0.17"), "megatron.core.tensor_parallel.random", "_set_cuda_rng_state", (),
    "the CPU test mode points megatron's CUDA RNG tracker at the CPU generator (launch/train/cuda_on_cpu.py).")
MEGATRON_RECOMPUTE = Patch(
    "megatron-core", ("0.16", "0.17"), "megatron.core.tensor_parallel.random", "CheckpointFunction.backward",
    ("ctx",), "the CPU test mode reruns recomputed layers under its device rewrite (launch/train/cuda_on_cpu.py).")
TRANSFORMERS_INIT_WEIGHTS = Patch(
    "transformers", ("5.0", "6.0"), "transformers.modeling_utils", "PreTrainedModel._init_weights", ("module",),
    "under ZeRO-3 the model's own init is re-run on gathered parameters (launch/train/model.py).")
DEEPSPEED_ZERO3_GATHER = Patch(
    "deepspeed", ("0.19", "0.20"), "deepspeed.runtime.engine",
    "DeepSpeedEngine._zero3_consolidated_16bit_state_dict", (),
    "the Hugging Face export gathers ZeRO-3 shards into one state dict on rank 0 "
    "(launch/train/deepspeed_trainer.py); save_16bit_model, the public wrapper, writes a .bin instead.")
DEEPSPEED_MICRO_STEPS = Patch(
    "deepspeed", ("0.19", "0.20"), "deepspeed.runtime.engine",
    "DeepSpeedEngine.set_gradient_accumulation_boundary", ("is_boundary",),
    "said explicitly per micro-batch: DeepSpeed's own count breaks when a batch ramp-up changes the "
    "accumulation steps (launch/train/deepspeed_trainer.py).")
MEGATRON_WRITE_RESULTS_QUEUE = Patch(
    "megatron-core", ("0.16", "0.17"), "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "_get_write_results_queue", (),
    "its checkpoint writer's results queue lives in a Manager process it spawns on the first save, kept in "
    "the module global _results_queue that this function reads; trainctl sets that global at build time to "
    "a Manager deaf to the stop signals, or a preemption's SIGTERM kills it and fails the stop save "
    "(launch/train/megatron/state.py).")

PATCHES = (HYDRA_MODE_PROBE, HYDRA_FILE_SOURCE, OMEGACONF_NODE, MEGATRON_ADAM_DUMMY_STATE,
           MEGATRON_ADAM_SET_STATES, MEGATRON_CUDA_RNG_GET, MEGATRON_CUDA_RNG, MEGATRON_RECOMPUTE,
           DEEPSPEED_ZERO3_GATHER, DEEPSPEED_MICRO_STEPS, TRANSFORMERS_INIT_WEIGHTS, MEGATRON_WRITE_RESULTS_QUEUE)

_checked: set[Patch] = set()


def version_tuple(text: str) -> tuple[int, ...]:
    """``"0.16.1rc2+cu12"`` -> (0, 16, 1): the leading release numbers."""
    numbers = []
    for part in text.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
        if digits.end() < len(part):  # "1rc2": a pre-release of 1
            break
    return tuple(numbers)


def require(patch: Patch) -> object:
    """The patched attribute, after checking it exists with the parameters we use (once per process)."""
    try:
        found = metadata.version(patch.package)
    except metadata.PackageNotFoundError:
        found = "not installed"
    target = importlib.import_module(patch.module)
    for name in patch.attribute.split("."):
        target = getattr(target, name, None)
        if target is None:
            raise CompatError(
                f"{patch.package} {found}: {patch.module}.{patch.attribute} is missing; trainctl uses it "
                f"because {patch.why}\n  fix: install {patch.package}>={patch.tested[0]},<{patch.tested[1]} "
                "(the versions it was tested on)")
    if patch.parameters:
        accepted = inspect.signature(target).parameters
        missing = [p for p in patch.parameters if p not in accepted]
        if missing:
            raise CompatError(
                f"{patch.package} {found}: {patch.module}.{patch.attribute} no longer takes {missing}\n"
                f"  fix: install {patch.package}>={patch.tested[0]},<{patch.tested[1]}")
    if patch not in _checked:
        _checked.add(patch)
        low, high = map(version_tuple, patch.tested)
        if found != "not installed" and not low <= version_tuple(found) < high:
            warnings.warn(f"trainctl: {patch.package} {found} is outside the versions {patch.module}."
                          f"{patch.attribute} was tested on ({patch.tested[0]} <= v < {patch.tested[1]}); its "
                          "feature check passed, so the run goes on", stacklevel=2)
    return target
