"""Reward functions of an RL stage (``stage.rewards``): the shipped ones, and ``module:function`` paths.

Each one is called as TRL's ``GRPOTrainer``/``RLOOTrainer`` call a reward function:
``f(prompts=[...], completions=[...], **columns)`` with the dataset's other columns
(``answer``) as keyword lists, one entry per completion, and returns one float (or
None: no score) per completion. Completions are plain strings here (the prompt data
is plain text, not conversations).

Shipped (pure Python: no torch, so the login node can check the names):

- ``exact_match``: 1.0 when the completion's answer equals the sample's ``answer``
  (after ``normalize``), else 0.0. The completion's answer is what follows its last
  ``Answer:`` marker, or else its last word: the verifiable-answer reward of
  DeepSeekMath/GRPO (Shao et al. 2024) in its simplest form.
- ``format``: 1.0 when the completion states its answer on an ``Answer: ...`` line,
  else 0.0 (the format reward of DeepSeek-R1, Guo et al. 2025, with this marker).
- ``digits``: the share of the completion's characters that are digits (0..1). A
  dense reward on characters for a tiny, barely trained model: its completions are
  near-random tokens, so a 0/1 reward is 0 for every completion of a group (every
  group-relative advantage is then 0 and nothing learns), while the digit share
  differs between any two completions from the first step.
"""

from __future__ import annotations

import re

ANSWER = re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE)
SHIPPED = ("exact_match", "format", "digits")
ANSWER_FIELD = "answer"
"""The prompt data's field a verifiable-answer reward compares with."""
NEEDS_ANSWER = frozenset({"exact_match"})
"""Shipped rewards that read the sample's ``answer`` field."""


def normalize(text: str) -> str:
    """Case, surrounding space and trailing punctuation do not count: "Answer: 7." equals "7"."""
    return text.strip().strip(".,;:!?\"'`").strip().lower()


def extracted_answer(completion: str) -> str | None:
    """What the completion answers: the text after its last ``Answer:`` (to the end of that line), else its
    last word; None for an empty completion."""
    found = ANSWER.findall(completion)
    if found:
        return found[-1].splitlines()[0] if found[-1].strip() else None
    words = completion.split()
    return words[-1] if words else None


def _text(completion) -> str:
    """A completion as text: a plain string, or a conversation's last message (TRL's conversational format)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def exact_match(completions: list, answer: list | None = None, **_) -> list[float]:
    if answer is None:
        raise KeyError("the exact_match reward needs an 'answer' field in every prompt sample")
    out = []
    for completion, want in zip(completions, answer):
        got = extracted_answer(_text(completion))
        out.append(1.0 if got is not None and normalize(got) == normalize(str(want)) else 0.0)
    return out


def format(completions: list, **_) -> list[float]:  # noqa: A001 -- the name users type in stage.rewards
    return [1.0 if ANSWER.search(_text(c)) and ANSWER.search(_text(c)).group(1).strip() else 0.0
            for c in completions]


def digits(completions: list, **_) -> list[float]:
    out = []
    for completion in completions:
        text = _text(completion)
        out.append(sum(ch.isdigit() for ch in text) / len(text) if text else 0.0)
    return out


def resolve(name: str):
    """The callable ``name`` stands for (on the node: a ``module:function`` path is imported here)."""
    if name in SHIPPED:
        return globals()[name]
    import importlib

    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)
