"""Chat data for SFT: conversations in JSONL, read as they are, into prompt-masked samples.

Each line of a source is ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``
(the list under ``data.sources.NAME.text_key``). A sample is shaped exactly like an item
of megatron-core's ``GPTDataset`` (``tokens``, ``labels``, ``loss_mask``, ``position_ids``,
each ``model.seq_length`` long), so ``launch.train.data.micro_batch`` and both trainers'
loss code take it unchanged. ``labels`` are the tokens shifted by one; ``loss_mask`` is 1
where the label is an assistant token (with ``stage.mask_prompt=false``: every token of
the conversation) and 0 on the prompt and on padding.

The tokens and the mask come from Hugging Face transformers:
``PreTrainedTokenizerFast(tokenizer_file=data.tokenizer).apply_chat_template(...,
return_assistant_tokens_mask=True)``, which marks the characters a template renders inside
``{% generation %}...{% endgeneration %}`` and maps them to tokens. The template is the
tokenizer's own when the ``tokenizer_config.json`` beside ``data.tokenizer`` holds a
``chat_template`` with generation tags (a ``chat_template.jinja`` there counts too); else
``DEFAULT_TEMPLATE`` below: ``<|role|>\\n{content}\\n`` per message, the assistant's
content and the end-of-document token inside the generation tags, so the model learns to
stop. A token that straddles a generation boundary (say content starting with a newline
the BPE merges with the template's) counts as an assistant token.

Length: a rendered conversation longer than ``seq_length + 1`` tokens is cut at the end
(its first ``seq_length + 1`` tokens are kept, so the later turns are lost); one shorter is
padded with the end-of-document id, masked. A conversation whose first reply starts past
the cut trains nothing (its loss_mask is all 0; the loss counts at least one token). One
conversation per sample: no packing.

Split and order: each source's conversations (in file order) are split train/valid/test by
``data.split`` as megatron-core splits documents (``round(fraction * n)`` bookends). A
source's split is read in epochs, each a permutation drawn from ``(train.seed, source
number, split, epoch)``, as long as the blend asks. The mixture is megatron-core's own
``BlendedDataset`` over these per-source datasets (it needs only their ``index_split``,
``unique_identifiers``, length and items): the same exact greedy index as pretraining
(weights 0.7/0.3 give 700/300 of the first 1,000 samples), cached in ``RUN_DIR/data_cache``
(rank 0 builds it, the others load it after a barrier). Lines are read by byte offset on
demand, tokenized when a sample is asked for: nothing is tokenized ahead, and no
``trainctl prepare`` is needed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from launch.train.data_common import Datasets, MissingData, eod_id

DEFAULT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)
"""The template used when the tokenizer brings none with generation tags."""


def chat_template(tokenizer_path: str) -> tuple[str, str]:
    """(the Jinja chat template, where it came from) for ``data.tokenizer``."""
    folder = Path(tokenizer_path).parent
    candidates = []
    config = folder / "tokenizer_config.json"
    if config.is_file():
        found = json.loads(config.read_text()).get("chat_template")
        if isinstance(found, list):  # named templates: [{"name": "default", "template": ...}, ...]
            found = {t.get("name"): t.get("template") for t in found}.get("default")
        if isinstance(found, str):
            candidates.append((found, str(config)))
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        candidates.append((jinja.read_text(), str(jinja)))
    for template, source in candidates:
        if re.search(r"{%-?\s*generation\s*-?%}", template) and "endgeneration" in template:
            return template, source
    return DEFAULT_TEMPLATE, "trainctl's default template (launch/train/chat.py)"


class ChatEncoder:
    """Conversation -> one sample: the tokenizer, the template, the length, the padding id."""

    def __init__(self, tokenizer_path: str, *, seq_length: int, mask_prompt: bool = True):
        from transformers import PreTrainedTokenizerFast

        _, self.eod = eod_id(tokenizer_path)
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path))
        self.tokenizer.eos_token = self.tokenizer.convert_ids_to_tokens(self.eod)
        self.template, self.template_source = chat_template(tokenizer_path)
        self.seq_length, self.mask_prompt = seq_length, mask_prompt

    def ids_and_mask(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """The whole rendered conversation's token ids and its assistant mask (1 = assistant token)."""
        out = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=True,
                                                 return_dict=True, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])

    def __call__(self, messages: list[dict]) -> dict:
        ids, assistant = self.ids_and_mask(messages)
        return self.sample(ids, assistant if self.mask_prompt else [1] * len(ids))

    def sample(self, ids: list[int], weight: list[int]) -> dict:
        """Rendered ids and their loss weights, cut or padded to ``seq_length + 1``, as one sample."""
        import torch

        keep = self.seq_length + 1  # tokens and labels are two views of seq_length + 1 ids
        ids, weight = ids[:keep], weight[:keep]
        pad = keep - len(ids)
        ids, weight = ids + [self.eod] * pad, weight + [0] * pad
        return {
            "tokens": torch.tensor(ids[:-1], dtype=torch.int64),
            "labels": torch.tensor(ids[1:], dtype=torch.int64),
            "loss_mask": torch.tensor(weight[1:], dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }


def line_offsets(path: str) -> list[int]:
    """Byte offsets of the non-blank lines of a JSONL file (one conversation each)."""
    offsets, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return offsets


class ChatSource:
    """One source's conversations ``[begin, end)`` of one split, read in seeded epochs, ``size`` samples long."""

    def __init__(self, *, name: str, number: int, path: str, key: str, offsets: list[int], begin: int, end: int,
                 split, size: int, seed: int, encoder: ChatEncoder):
        self.name, self.path, self.key, self.encoder = name, path, key, encoder
        self.offsets, self.begin, self.count = offsets, begin, end - begin
        self.index_split, self.size, self.seed, self.number = split, size, seed, number
        self._epoch, self._perm = None, None
        # What makes this dataset (BlendedDataset hashes it into its cache key).
        self.unique_identifiers = {
            "class": type(self).__name__, "path": str(Path(path).absolute()), "key": key, "begin": begin,
            "end": end, "split": split.name, "size": size, "seed": seed, "number": number,
            "seq_length": encoder.seq_length, "mask_prompt": encoder.mask_prompt,
            "template": hashlib.sha256(encoder.template.encode()).hexdigest()[:16]}

    def __len__(self) -> int:
        return self.size

    def _order(self, epoch: int):
        """The permutation of this split's conversations for ``epoch`` (the last one kept)."""
        import numpy as np

        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, self.number, self.index_split.value, epoch])
            self._epoch, self._perm = epoch, rng.permutation(self.count)
        return self._perm

    def conversation(self, idx: int) -> list[dict]:
        epoch, pos = divmod(int(idx), self.count)
        with open(self.path, "rb") as f:
            f.seek(self.offsets[self.begin + int(self._order(epoch)[pos])])
            record = json.loads(f.readline())
        if self.key not in record:
            raise KeyError(f"{self.path}: a line has no {self.key!r} (data.sources.{self.name}.text_key)")
        return record[self.key]

    def __getitem__(self, idx: int) -> dict:
        return self.encoder(self.conversation(idx))


def check_sources(cfg) -> None:
    """Raise MissingData naming the chat files that are not there."""
    missing = [f"data.sources.{name}.path={s.path}" for name, s in cfg.data.sources.items()
               if not Path(s.path).expanduser().is_file()]
    if missing:
        raise MissingData(f"the chat data is missing ({', '.join(missing)}): post-training stages read the "
                          "JSONL files themselves, no `trainctl prepare` needed")


def build_chat_datasets(cfg, *, train_samples: int, valid_samples: int, cache_dir: Path, encoder=None,
                        source_class=None):
    """The blended train and validation chat datasets (call on every rank; torch.distributed may be initialised).

    ``encoder`` and ``source_class`` (default ``ChatEncoder``, ``ChatSource``): what reads a line and makes it
    a sample; ``launch.train.preference`` passes its own for preference pairs, the machinery is this one."""
    import torch
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
    from megatron.core.datasets.utils import Split


    distributed = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    names = list(cfg.data.sources)
    sources = [cfg.data.sources[n] for n in names]
    paths = [str(Path(s.path).expanduser()) for s in sources]
    weights = [float(s.weight) for s in sources]
    config = BlendedMegatronDatasetConfig(
        random_seed=int(cfg.train.seed), sequence_length=int(cfg.model.seq_length), blend=(paths, weights),
        split=",".join(str(float(x)) for x in cfg.data.split),
        path_to_cache=str(cache_dir) if distributed else None)  # one process: no cache, nothing to share
    encoder = encoder or ChatEncoder(cfg.data.tokenizer, seq_length=int(cfg.model.seq_length),
                                     mask_prompt=bool(cfg.stage.mask_prompt))
    source_class = source_class or ChatSource
    offsets = [line_offsets(p) for p in paths]

    has_valid = float(cfg.data.split[1]) > 0 and valid_samples > 0
    splits = [Split.train, Split.valid] if has_valid else [Split.train]
    bounds = {}  # (source number, split) -> [begin, end): checked on every rank before any barrier
    for number, name in enumerate(names):
        n = len(offsets[number])
        for split in splits:
            lo, hi = config.split_matrix[split.value]
            begin, end = int(round(lo * n)), int(round(hi * n))
            if end <= begin:
                raise ValueError(f"data.sources.{name}: {n} conversations leave none for the {split.name} split "
                                 f"(data.split={list(cfg.data.split)} gives [{begin}, {end}))")
            bounds[number, split] = begin, end

    def blended(split: Split, size: int):
        parts = [source_class(name=name, number=number, path=path, key=source.text_key, offsets=offsets[number],
                            begin=bounds[number, split][0], end=bounds[number, split][1], split=split, size=size,
                            seed=int(cfg.train.seed), encoder=encoder)
                 for number, (name, source, path) in enumerate(zip(names, sources, paths))]
        return parts[0] if len(parts) == 1 else BlendedDataset(parts, weights, size, config)

    if rank == 0 and distributed:
        cache_dir.mkdir(parents=True, exist_ok=True)
    built = None
    for turn in (0, 1):  # rank 0 builds and caches the blend indices; the others load them afterwards
        if (rank == 0) == (turn == 0):
            built = Datasets(train=blended(Split.train, train_samples),
                             valid=blended(Split.valid, valid_samples) if has_valid else None)
        if distributed:
            torch.distributed.barrier()
    return built
