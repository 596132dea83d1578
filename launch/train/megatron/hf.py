"""Megatron-Core <-> Hugging Face weights, Llama and Mixtral families: the parameter mapping, export, import.

The mapping is Megatron-Bridge's (NVIDIA-NeMo/Megatron-Bridge, Apache-2.0), read from
``src/megatron/bridge/models/llama/llama_bridge.py`` (commit 067f987d, ``LlamaBridge.mapping_registry``),
``src/megatron/bridge/models/mixtral/mixtral_bridge.py`` (commit 1d5b919b, ``MixtralBridge.mapping_registry``)
and, for the fused QKV layout, ``src/megatron/bridge/models/conversion/param_mapping.py``
(``merge_qkv_weights`` / ``split_qkv_weights``). Written here by hand from those files: Megatron-Bridge
0.4+ needs Python 3.12 and trainctl runs on 3.11, so it cannot be installed.

- One-to-one names (Bridge's ``AutoMapping``): embedding, output layer, final norm, each layer's two
  norms (TransformerEngine's fused ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``,
  under which megatron-core's local layers save theirs too, or ``input_layernorm`` /
  ``pre_mlp_layernorm``), ``linear_proj`` -> ``o_proj``, ``linear_fc2`` -> ``down_proj``; Mixtral's
  router -> ``block_sparse_moe.gate`` and each expert's ``linear_fc2`` -> ``w2``.
- Fused QKV (``QKVMapping``): Megatron stores one matrix whose rows are, for each of the
  ``num_query_groups`` groups, that group's query heads then its one key head then its one value head
  (GQA interleaving); Hugging Face has separate ``q_proj``, ``k_proj``, ``v_proj``.
- Gated MLP (``GatedMLPMapping``): ``linear_fc1`` is ``[gate; up]`` (``gate_proj``, ``up_proj``; a
  Mixtral expert's ``w1``, ``w3``) concatenated on the output axis.

The Megatron side is the keys of megatron-core's sharded state dict, which name *global* tensors: a
layer's weight sits at its global layer number on a leading axis (an expert's at its global expert
number on the next), and tensor-parallel shards (fc1's gate and up halves included) are slices of the
tp = 1 tensor. So one mapping serves every layout: the export reads the distributed checkpoint's
global tensors (any tp, pp, vpp, ep), the import gives each rank the slices of its shards
(``launch.train.megatron.build.fill_by_name``). Megatron pads the vocabulary (to 128 x tp); the export
drops the padded rows, the import fills them with zeros (as Bridge pads).

The Hugging Face side is the published format (``model.safetensors`` or shards with
``model.safetensors.index.json``; Mixtral's ``block_sparse_moe.experts.E.w1/w2/w3``, which
transformers 5 still writes and reads).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

LAYERS = "decoder.layers."
EXPERTS = "decoder.layers.mlp.experts.experts."
_L, _E = "model.layers.{l}.", "model.layers.{l}.block_sparse_moe.experts.{e}."

DIRECT = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": _L + "input_layernorm.weight",
    "decoder.layers.input_layernorm.weight": _L + "input_layernorm.weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": _L + "post_attention_layernorm.weight",
    "decoder.layers.pre_mlp_layernorm.weight": _L + "post_attention_layernorm.weight",
    "decoder.layers.self_attention.linear_proj.weight": _L + "self_attn.o_proj.weight",
    "decoder.layers.mlp.linear_fc2.weight": _L + "mlp.down_proj.weight",
    "decoder.layers.mlp.router.weight": _L + "block_sparse_moe.gate.weight",
    EXPERTS + "linear_fc2.weight": _E + "w2.weight",
}
"""Megatron key -> Hugging Face name (``{l}``: the layer, ``{e}``: the expert)."""
QKV = {"decoder.layers.self_attention.linear_qkv.weight":
       (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight")}
GATED = {"decoder.layers.mlp.linear_fc1.weight": (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
         EXPERTS + "linear_fc1.weight": (_E + "w1.weight", _E + "w3.weight")}
VOCAB = frozenset({"embedding.word_embeddings.weight", "output_layer.weight"})
"""Rows per token: Megatron's padded vocabulary on one side, the tokenizer's on the other."""
SHARD_BYTES = 5 * 2**30
"""Safetensors files of at most this size (transformers' ``max_shard_size`` default is 5 GB too)."""


class MappingError(Exception):
    """A tensor the mapping does not know, or of the wrong shape: the model is not a Llama or a Mixtral."""


@dataclass(frozen=True)
class Shape:
    """What the QKV split and the vocabulary rows need from the model."""

    heads: int
    groups: int
    head_dim: int
    hidden: int
    vocab: int
    """The Hugging Face (tokenizer's) vocabulary; Megatron's may be padded beyond it."""

    @classmethod
    def of(cls, config) -> "Shape":
        """From a transformers ``LlamaConfig`` / ``MixtralConfig``."""
        heads = int(config.num_attention_heads)
        return cls(heads=heads, groups=int(config.num_key_value_heads or heads),
                   head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
                   hidden=int(config.hidden_size), vocab=int(config.vocab_size))


def stacked_axes(key: str) -> int:
    """Leading axes of a Megatron key's global tensor that index layers (1) and experts (2)."""
    return 2 if key.startswith(EXPERTS) else 1 if key.startswith(LAYERS) else 0


def _names(key: str, index: tuple) -> tuple[str, ...]:
    names = QKV.get(key) or GATED.get(key) or ((DIRECT[key],) if key in DIRECT else None)
    if names is None:
        raise MappingError(f"no Hugging Face name for the Megatron tensor {key} (Llama and Mixtral only)")
    fields = dict(zip("le", index))
    return tuple(n.format(**fields) for n in names)


def split_qkv(qkv: torch.Tensor, s: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused, group-interleaved QKV rows -> (q, k, v) as Hugging Face's projections hold them."""
    per = s.heads // s.groups
    grouped = qkv.reshape(s.groups, per + 2, s.head_dim, -1)
    q = grouped[:, :per].reshape(s.heads * s.head_dim, -1)
    k = grouped[:, per].reshape(s.groups * s.head_dim, -1)
    v = grouped[:, per + 1].reshape(s.groups * s.head_dim, -1)
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Shape) -> torch.Tensor:
    """The inverse of ``split_qkv``: per group, its query heads, then its key head, then its value head."""
    per = s.heads // s.groups
    cols = q.shape[-1]
    return torch.cat([q.reshape(s.groups, per, s.head_dim, cols), k.reshape(s.groups, 1, s.head_dim, cols),
                      v.reshape(s.groups, 1, s.head_dim, cols)], dim=1).reshape(-1, cols)


def to_hf(key: str, index: tuple, value: torch.Tensor, s: Shape) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of one Megatron tensor (``index``: its layer and expert numbers)."""
    names = _names(key, index)
    if key in QKV:
        parts = split_qkv(value, s)
    elif key in GATED:
        parts = value.chunk(2, dim=0)
    else:
        parts = (value[:s.vocab] if key in VOCAB else value,)
    return {n: p.contiguous() for n, p in zip(names, parts)}


def from_hf(key: str, index: tuple, read: Callable[[str], torch.Tensor], s: Shape, shape) -> torch.Tensor:
    """The global value of one Megatron tensor (of ``shape``, without its stacked axes) from Hugging Face's."""
    names = _names(key, index)
    parts = [read(n) for n in names]
    if key in QKV:
        value = merge_qkv(*parts, s)
    elif key in GATED:
        value = torch.cat(parts, dim=0)
    else:
        value = parts[0]
        if key in VOCAB and value.shape[0] < shape[0]:  # Megatron's padded rows: zeros, as Bridge pads
            value = torch.cat([value, value.new_zeros(shape[0] - value.shape[0], *value.shape[1:])])
    if tuple(value.shape) != tuple(shape):
        raise MappingError(f"{key}{list(index)}: Hugging Face's {', '.join(names)} give shape {tuple(value.shape)}, "
                           f"the Megatron model has {tuple(shape)}")
    return value


# --- export: a distributed checkpoint -> a Hugging Face model directory ---------------------------

def checkpoint_keys(step_dir: Path) -> dict[str, tuple]:
    """The model tensors of a Megatron-Core distributed checkpoint: {key: (global shape, dtype)} (no optimizer)."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(step_dir)).read_metadata()
    return {k: (tuple(m.size), m.properties.dtype) for k, m in meta.state_dict_metadata.items()
            if hasattr(m, "size") and k.startswith(("embedding.", "decoder.", "output_layer."))}


def read_global(step_dir: Path, keys: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The global tensors of ``keys`` (from ``checkpoint_keys``), read by this process alone: however
    many ranks wrote them, torch.distributed.checkpoint assembles each one whole."""
    import torch.distributed.checkpoint as dcp

    out = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in keys.items()}
    dcp.load(out, storage_reader=dcp.FileSystemReader(str(step_dir)), no_dist=True)
    return out


def export_share(step_dir: Path, out: Path, config, *, rank: int = 0, world: int = 1,
                 shard_bytes: int = SHARD_BYTES) -> dict[str, str]:
    """Rank ``rank``'s share of the export (every ``world``-th Megatron key): its Hugging Face tensors written
    into safetensors files of ``out``; returns {Hugging Face name: file}.

    One Megatron key at a time, all its layers: memory is the largest such tensor (all 32 layers' fc1
    of Llama 3 8B in bf16: 7.5 GB), not the model.
    """
    from safetensors.torch import save_file

    s = Shape.of(config)
    keys = checkpoint_keys(step_dir)
    mine = sorted(keys)[rank::world]
    weight_map, pending, size, part = {}, {}, 0, 0

    def flush():
        nonlocal pending, size, part
        if pending:
            name = f"model-rank{rank:05d}-{part:05d}.safetensors"
            save_file(pending, str(out / name), metadata={"format": "pt"})
            weight_map.update({n: name for n in pending})
            pending, size, part = {}, 0, part + 1

    for key in mine:
        value = read_global(step_dir, {key: keys[key]})[key]
        axes = stacked_axes(key)
        for index in _indices(value.shape[:axes]):
            for name, tensor in to_hf(key, index, value[index], s).items():
                if size and size + tensor.nbytes > shard_bytes:
                    flush()
                pending[name] = tensor.clone()  # its own storage: safetensors refuses shared ones
                size += tensor.nbytes
        del value
    flush()
    return weight_map


def _indices(shape) -> list[tuple]:
    """Every (layer[, expert]) index of a stacked tensor's leading ``shape``; ``[()]`` for none."""
    return list(itertools.product(*(range(n) for n in shape)))


def finish_export(out: Path, config, weight_map: dict[str, str], tokenizer: str | None) -> None:
    """After every rank's share: the index of the tensors, ``config.json``, and the tokenizer's files."""
    expected = set(_expected_names(config))
    missing, extra = sorted(expected - set(weight_map)), sorted(set(weight_map) - expected)
    if missing or extra:
        raise MappingError(f"the export does not match {type(config).__name__}: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}")
    total = 0
    for name in set(weight_map.values()):
        total += (out / name).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.save_pretrained(str(out))
    from launch.train.model import copy_tokenizer

    copy_tokenizer(tokenizer, out)


def _expected_names(config) -> list[str]:
    """Every tensor a Hugging Face ``*ForCausalLM`` of ``config`` loads (tied: no ``lm_head``)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    experts = int(getattr(config, "num_local_experts", 0) or 0)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        names += [p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                  "self_attn.o_proj.weight")]
        if experts:
            names.append(p + "block_sparse_moe.gate.weight")
            names += [f"{p}block_sparse_moe.experts.{e}.{w}.weight" for e in range(experts) for w in ("w1", "w2", "w3")]
        else:
            names += [p + n for n in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
    return names


# --- import: a Hugging Face model directory -> the Megatron model's shards -----------------------

class SafetensorsReader:
    """Reads single tensors of a Hugging Face model directory by name, opening only the files it needs."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open

            single = directory / "model.safetensors"
            with safe_open(str(single), "pt") as f:
                self.files = {n: single.name for n in f.keys()}
        self._open = {}

    def __call__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.files.get(name)
        if file is None:
            raise MappingError(f"{self.directory}: no tensor {name} in its safetensors files")
        if file not in self._open:
            self._open[file] = safe_open(str(self.directory / file), "pt")
        return self._open[file].get_tensor(name)


def load_hf(models: list, directory: Path, config) -> int:
    """Import the Hugging Face model in ``directory`` into ``models`` (this rank's ``GPTModel`` chunks, of the
    shape ``config`` describes): each shard gets its slice of the global tensors (``build.fill_by_name``),
    read from the files that hold them; the number of shards written. ``MappingError`` for a missing or
    misshapen tensor."""
    from launch.train.megatron.build import fill_by_name

    read, shape = SafetensorsReader(directory), Shape.of(config)
    return fill_by_name(models, lambda key, index, full: from_hf(key, index, read, shape, full))
