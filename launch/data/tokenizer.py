"""The tokenizer a mixture is prepared with: a local Hugging Face ``tokenizer.json``.

Megatron's GPT datasets concatenate documents into fixed-length samples, so each
document must end with the end-of-document (EOD) token the model learns as a
boundary (Megatron-LM's ``preprocess_data.py --append-eod``). A ``tokenizer.json``
does not say which of its tokens that is, so ``find_eod`` looks, in order:

1. ``eos_token`` in a ``tokenizer_config.json`` beside it (what ``transformers``
   would use; a Hugging Face model directory ships one);
2. the first of ``EOD_NAMES`` that is a special token of the tokenizer, then the
   first that is in its vocabulary at all.

No EOD found is a user error naming ``data.tokenizer``: guessing would silently
glue documents together.

The token dtype follows megatron-core's own rule (``DType.optimal_dtype``):
uint16 while the vocabulary has fewer than 65,500 entries, int32 above; the
``.idx`` header records it and ``IndexedDataset`` reads it from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end▁of▁sentence|>",
             "<｜end▁of▁sentence｜>", "<end_of_text>", "<|end|>")
"""End-of-document tokens of common tokenizers: GPT-2/NeoX/Qwen/Phi, Llama 3, Llama 2/Mistral/T5, Gemma, ..., DeepSeek.
Chat end-of-turn tokens (``<|eot_id|>``, ``<|im_end|>``) are not document ends and are not guessed."""

UINT16_LIMIT = 65500
"""megatron-core's ``DType.optimal_dtype``: uint16 below this cardinality, int32 from it."""


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path
    vocab_size: int
    """Entries including added tokens (the cardinality the dtype must hold)."""
    eod_id: int
    eod_token: str
    eod_from: str
    """How the EOD was found: ``tokenizer_config.json`` or ``by name``."""

    @property
    def dtype_name(self) -> str:
        return "uint16" if self.vocab_size < UINT16_LIMIT else "int32"


def load(path: Path):
    """The ``tokenizers.Tokenizer`` in ``path``; raises ValueError with the library's reason."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
        raise ValueError(f"not a Hugging Face tokenizer.json: {str(exc).splitlines()[0] if str(exc) else exc!r}")


def inspect(path: Path) -> TokenizerInfo:
    """The tokenizer's size and EOD token; raises ValueError when it does not load or has no EOD."""
    tok = load(path)
    vocab_size = max(tok.get_vocab_size(with_added_tokens=True), 1 + max(tok.get_vocab(with_added_tokens=True).values()))
    eod_token, how = find_eod(tok, path)
    return TokenizerInfo(path=path, vocab_size=vocab_size, eod_id=tok.token_to_id(eod_token),
                         eod_token=eod_token, eod_from=how)


def find_eod(tok, path: Path) -> tuple[str, str]:
    """(EOD token, how it was found) for the tokenizer ``tok`` loaded from ``path``."""
    configured = _config_eos(path.parent / "tokenizer_config.json")
    if configured is not None and tok.token_to_id(configured) is not None:
        return configured, "tokenizer_config.json eos_token"
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for pool, how in ((special, "a special token by name"), (tok.get_vocab(with_added_tokens=True), "by name")):
        for name in EOD_NAMES:
            if name in pool:
                return name, how
    raise ValueError(f"no end-of-document token: none of {', '.join(EOD_NAMES)} is in its vocabulary"
                     + (f" (tokenizer_config.json's eos_token {configured!r} is not either)" if configured else ""))


def _config_eos(config: Path) -> str | None:
    """``eos_token`` of a ``tokenizer_config.json`` (a string or an AddedToken dict), or None."""
    try:
        eos = json.loads(config.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None
