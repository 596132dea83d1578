"""A fingerprint of a model's weights: the check that a stage starts from what the stage before exported.

sha256 over the tensors of a Hugging Face model directory's safetensors files, in name order: each
tensor's name, dtype, shape and bytes. Every trainer's export writes it into ``final/trainctl.json``
(``weights_sha256``, ``of_directory``); a trainer that starts from such a directory computes the same over
the tensors its model holds after loading (``of_model``: cast to the file's dtype, for the names the files
hold, so a tied output layer the files leave out is left out here too) and records it in metrics.jsonl (an
``init`` record). Equal fingerprints: the model holds exactly the exported weights, not a fresh init that
happened to load without complaint. The cost is one pass over the weights, next to the load itself.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from pathlib import Path

_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def of_directory(directory: Path) -> str | None:
    """The fingerprint of the safetensors weights in ``directory`` (None: it holds none)."""
    from safetensors import safe_open

    where = _where(directory)
    if not where:
        return None
    h = hashlib.sha256()
    for name in sorted(where):
        with safe_open(str(where[name]), framework="pt") as st:  # one tensor at a time: any size fits
            _update(h, name, st.get_tensor(name))
    return h.hexdigest()


def of_model(params: Mapping[str, object], directory: Path, gathered=None) -> str | None:
    """The fingerprint of a loaded model's weights as ``of_directory`` computes it for ``directory``.

    ``params``: the model's tensors by Hugging Face name; ``gathered(tensor)``: a context in which a
    partitioned tensor is whole (ZeRO-3's ``GatheredParameters``). None when a name the files hold is
    missing from the model (the two cannot be compared)."""
    import torch

    dtypes = _file_dtypes(directory)
    if not dtypes or not set(dtypes) <= set(params):
        return None
    h = hashlib.sha256()
    for name in sorted(dtypes):
        with (gathered(params[name]) if gathered else contextlib.nullcontext()):
            _update(h, name, params[name].detach().to(getattr(torch, dtypes[name])).cpu())
    return h.hexdigest()


def _where(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (headers only)."""
    from safetensors import safe_open

    where = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as st:
            where.update({name: path for name in st.keys()})
    return where


def _file_dtypes(directory: Path) -> dict[str, str]:
    """Tensor name -> torch dtype name, from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    dtypes = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as st:
            dtypes.update({name: _DTYPES.get(st.get_slice(name).get_dtype(), "float32") for name in st.keys()})
    return dtypes


def _update(h, name: str, t) -> None:
    import torch

    h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
