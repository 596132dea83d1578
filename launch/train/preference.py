"""Preference data for DPO: (prompt, chosen, rejected) pairs in JSONL, read like SFT's chat data.

Each line is TRL's preference format, conversational or standard::

    {"prompt": [{"role": "user", "content": ...}, ...], "chosen": [{"role": "assistant", ...}],
     "rejected": [{"role": "assistant", ...}]}
    {"prompt": "a question", "chosen": "a good answer", "rejected": "a bad one"}

A string prompt is one user message and a string completion one assistant message (both are then
rendered with the chat template, unlike TRL, which concatenates standard-format text as it is).
Without ``prompt`` (TRL's *implicit prompt*), or with a ``prompt`` of the other kind than the
completions (``HuggingFaceH4/ultrafeedback_binarized``: a string prompt beside full
conversations), the prompt is the longest run of turns the chosen and the rejected conversations
share, and each completion the rest: TRL's ``maybe_extract_prompt`` rule.

A sample is ``launch.train.chat``'s sample for ``prompt + chosen`` and for ``prompt + rejected``,
stacked: ``tokens``, ``labels``, ``loss_mask`` each ``[2, model.seq_length]`` (row 0 chosen, row 1
rejected), so ``launch.train.data.micro_batch`` gives ``[micro_batch_size, 2, seq_length]`` and
``launch.train.dpo.split_pairs`` one batch of both. Same template, same cut at ``seq_length + 1``
tokens and padding. ``loss_mask`` is 1 on the completion's assistant tokens only (the tokens
past the rendered prompt; with ``stage.mask_prompt=false`` on every token of the conversation, as
SFT's): the sequence log-probability DPO compares is the completion's.

Split, order and the blend are ``launch.train.chat``'s (``build_chat_datasets``, with this
module's encoder and source): each source split by ``data.split`` in file order, read in seeded
epochs, blended by megatron-core's ``BlendedDataset``. ``data.sources.NAME.text_key`` is unused.
Hugging Face datasets are read as JSONL: ``datasets.load_dataset(...)["train_prefs"].to_json(path)``
writes one (``conf/data/ultrafeedback.yaml``).

``launch.data.pairs`` reads a line into (prompt, chosen, rejected) messages, and checks the files at submit
on the login node (no torch): they exist and their first lines are pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

from launch.data.pairs import PairError, pair
from launch.train.chat import ChatEncoder, ChatSource, build_chat_datasets

__all__ = ["PairError", "PreferenceEncoder", "PreferenceSource", "build_preference_datasets", "pair"]

class PreferenceEncoder:
    """A pair -> one sample of ``[2, seq_length]`` tensors (chosen, rejected)."""

    def __init__(self, tokenizer_path: str, *, seq_length: int, mask_prompt: bool = True):
        self.chat = ChatEncoder(tokenizer_path, seq_length=seq_length, mask_prompt=mask_prompt)
        self.seq_length, self.mask_prompt = seq_length, mask_prompt
        self.template = self.chat.template  # for ChatSource's cache key

    def completion(self, prompt: list[dict], completion: list[dict]) -> dict:
        """The sample of ``prompt + completion``, weighted on the completion's assistant tokens."""
        ids, assistant = self.chat.ids_and_mask(prompt + completion)
        if not self.mask_prompt:
            return self.chat.sample(ids, [1] * len(ids))
        prompt_ids, _ = self.chat.ids_and_mask(prompt)
        shared = 0  # the prompt's tokens: where its own rendering and the whole one agree
        while shared < min(len(ids), len(prompt_ids)) and ids[shared] == prompt_ids[shared]:
            shared += 1
        return self.chat.sample(ids, [0] * shared + assistant[shared:])

    def __call__(self, record) -> dict:
        import torch

        prompt, chosen, rejected = pair(record)
        both = [self.completion(prompt, chosen), self.completion(prompt, rejected)]
        return {key: torch.stack([s[key] for s in both]) for key in both[0]}


class PreferenceSource(ChatSource):
    """One source's pairs of one split (``ChatSource``'s order and epochs): a line is the whole record."""

    def conversation(self, idx: int):
        epoch, pos = divmod(int(idx), self.count)
        line = self.begin + int(self._order(epoch)[pos])
        with open(self.path, "rb") as f:
            f.seek(self.offsets[line])
            return json.loads(f.readline())

    def __getitem__(self, idx: int) -> dict:
        record = self.conversation(idx)
        try:
            return self.encoder(record)
        except PairError as exc:
            raise PairError(f"{self.path}: {exc} (data.sources.{self.name})") from None


def build_preference_datasets(cfg, *, train_samples: int, valid_samples: int, cache_dir: Path):
    """The blended train and validation preference datasets (``chat.build_chat_datasets``' machinery)."""
    encoder = PreferenceEncoder(cfg.data.tokenizer, seq_length=int(cfg.model.seq_length),
                                mask_prompt=bool(cfg.stage.mask_prompt))
    return build_chat_datasets(cfg, train_samples=train_samples, valid_samples=valid_samples, cache_dir=cache_dir,
                               encoder=encoder, source_class=PreferenceSource)
