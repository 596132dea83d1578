"""CPU smoke mode: run megatron-core's CUDA-only code paths on a CPU-only torch, for tests.

**Real runs need GPUs.** megatron-core 0.16 writes ``device="cuda"``,
``torch.cuda.current_device()``, ``tensor.cuda()`` and ``torch.cuda.Stream`` into
its models, pipeline schedules, DDP buffers and optimizers. On a machine without
a GPU (CI, a laptop) those calls fail, so the Megatron-Core trainer could not be
tested at all. ``install()`` redirects them to the CPU inside the calling process
and nowhere else; the trainer calls it only when ``torch.cuda.is_available()`` is
False, so nothing here runs on a GPU node. The numerics are megatron-core's own:
the same ops on CPU tensors (fp32 on CPU runs), collectives over gloo.

What it patches, and why:

- **Device arguments** (a ``TorchFunctionMode``, pushed for good on the calling
  thread: the training loop; megatron's checkpoint writer threads only move bytes): any
  ``device=`` that names CUDA (``"cuda"``, ``"cuda:0"``, an int, a CUDA
  ``torch.device``) becomes ``"cpu"`` and ``pin_memory=True`` becomes False, in
  every torch factory call (``torch.empty/zeros/tensor/...``) and in
  ``Tensor.to(...)``. megatron allocates its DDP grad and param buffers,
  pipeline p2p buffers, optimizer scalars and loss accumulators this way.
- ``Tensor.cuda()`` returns the tensor itself (the optimizers' state loading, the
  distributed optimizer's gather).
- ``Tensor.type()`` (no argument) answers ``torch.cuda.FloatTensor`` for a CPU
  float tensor: megatron's optimizers sort parameters by that string and refuse
  ``torch.FloatTensor``.
- ``torch.cuda.current_device`` returns 0 (which the device rewrite maps to the
  CPU); ``synchronize``, ``empty_cache``, ``nvtx.range_push/pop`` do nothing;
  ``Stream``, ``Event``, ``stream()``, ``current_stream()``, ``default_stream()``
  are inert stand-ins (overlapped communication is off on CPU runs anyway; the MoE alltoall
  dispatcher's device-to-host copies are plain CPU tensors already).
- The CUDA RNG (``torch.cuda.get_rng_state/set_rng_state/manual_seed`` and
  megatron's ``tensor_parallel.random._get/_set_cuda_rng_state``) is the CPU
  generator: megatron's model-parallel RNG tracker forks "CUDA" states for
  dropout and initialisation, and here those are CPU states (its warning that the
  CPU state moved inside a fork is filtered: here that is expected).
- Activation recompute (``parallel.recompute=full|selective``): megatron's
  ``tensor_parallel.CheckpointFunction.backward`` reruns the layer's (or the
  attention core's) forward during the backward pass, and that forward allocates
  on ``device="cuda"`` (the causal mask). The device rewrite is not active there:
  backward starts inside the mode's own handler for ``torch.autograd.backward``,
  and a ``TorchFunctionMode`` is popped while its handler runs. The wrapped
  ``backward`` pushes the same mode again around the recomputation. Only this
  autograd function: it is the one ``tensor_parallel.checkpoint`` uses, the path
  of both recompute settings trainctl writes (``recompute_modules: [core_attn]``
  for selective; ``CheckpointWithoutOutput``, for other modules, is not patched).

- MoE routing: megatron-core 0.16.1's router gate (``moe_utils.RouterGatingLinearFunction``)
  tests ``te_general_gemm is not None``, a name its module binds only when TransformerEngine
  imports: without TE (every CPU run) the first MoE forward raises ``NameError``. It is bound
  to None here, the value megatron's own TE extension gives it when TE's GEMM is missing, so
  the gate takes its ``torch.mm`` path.

``torch.cuda.is_available()`` stays False, so code that asks (the trainer's
choice of gloo, peak-memory reporting) still sees a CPU machine.
"""

from __future__ import annotations

import contextlib
import logging

from launch.compat import MEGATRON_CUDA_RNG, MEGATRON_CUDA_RNG_GET, MEGATRON_RECOMPUTE, require

_installed = False


def install() -> None:
    """Redirect torch.cuda to the CPU in this process (idempotent). Refuses on a machine with a GPU."""
    global _installed
    import torch

    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError("launch.train.cuda_on_cpu is for machines without a GPU; this one has CUDA")
    for patch in (MEGATRON_CUDA_RNG_GET, MEGATRON_CUDA_RNG, MEGATRON_RECOMPUTE):
        require(patch)
    _patch_cuda_module(torch)
    _patch_megatron_rng()
    mode = _device_to_cpu_mode()
    _patch_megatron_recompute(mode)
    _patch_megatron_router()
    mode.__enter__()  # never exited
    _installed = True


def _is_cuda(device) -> bool:
    import torch

    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA device
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _device_to_cpu_mode():
    """A ``TorchFunctionMode`` that rewrites CUDA devices to the CPU in every torch call made under it."""
    import torch
    from torch.overrides import TorchFunctionMode

    tensor_type, tensor_cuda, tensor_to = torch.Tensor.type, torch.Tensor.cuda, torch.Tensor.to

    class DeviceToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is tensor_cuda:
                return args[0]
            if func is tensor_type and len(args) == 1 and not kwargs:
                name = func(*args)  # "torch.FloatTensor" -> "torch.cuda.FloatTensor"
                return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
            if "device" in kwargs and _is_cuda(kwargs["device"]):
                kwargs["device"] = "cpu"
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            if func is tensor_to and len(args) > 1 and _is_cuda(args[1]):
                args = (args[0], "cpu", *args[2:])
            return func(*args, **kwargs)

    return DeviceToCpu()


class _Inert:
    """A stand-in for torch.cuda.Stream / Event: accepts every call, does nothing, and returns another
    stand-in (``stream.record_event()`` is an event the MoE token dispatcher then synchronizes)."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: _Inert()

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _patch_cuda_module(torch) -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _Inert
    cuda.Event = _Inert
    cuda.current_stream = lambda *a, **k: _Inert()
    cuda.default_stream = lambda *a, **k: _Inert()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state


class _NotCpuRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron_rng() -> None:
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    # The tracker warns when the CPU generator moves inside a fork: here the "GPU" generator is the CPU's.
    logging.getLogger(mrandom.__name__).addFilter(_NotCpuRngWarning())

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_megatron_recompute(mode) -> None:
    """Run megatron's checkpoint recomputation under the device rewrite (module docstring)."""
    from megatron.core.tensor_parallel import random as mrandom

    backward = mrandom.CheckpointFunction.backward  # autograd looks it up on the class at each call

    def backward_on_cpu(ctx, *grads):
        with mode:
            return backward(ctx, *grads)

    mrandom.CheckpointFunction.backward = staticmethod(backward_on_cpu)


def _patch_megatron_router() -> None:
    """Bind ``moe_utils.te_general_gemm`` to None where TransformerEngine is absent (module docstring)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
