"""Preference pairs, read without torch: a line -> (prompt, chosen, rejected) messages, and the submit-time check.

TRL's preference format (``launch.train.preference`` turns the messages into samples on the nodes):
``prompt`` a string or a message list, ``chosen``/``rejected`` the same; a string prompt is one user
message and a string completion one assistant message. Without ``prompt``, or with one of the other
kind than the completions (``HuggingFaceH4/ultrafeedback_binarized``: a string prompt beside full
conversations), the prompt is the longest run of turns both conversations start with: TRL's
``maybe_extract_prompt`` rule (``trl/data_utils.py``).

``sources_problem`` runs at submit and in the job's preflight: every file exists and its first
``CHECKED_LINES`` lines are pairs, so a wrong file fails on the login node, not after the queue.
"""

from __future__ import annotations

import json
from pathlib import Path

CHECKED_LINES = 200
"""Lines of each file ``sources_problem`` reads at submit (a whole 60k-pair file would take seconds)."""


class PairError(ValueError):
    """A line is not a preference pair."""


def _messages(value, role: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return list(value)
    raise PairError(f'"{field}" is neither a string nor a list of {{"role", "content"}} messages')


def pair(record) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages of one line (TRL's preference format); raises ``PairError``."""
    if not isinstance(record, dict):
        raise PairError("the line is not a JSON object")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise PairError(f"no {' or '.join(repr(k) for k in missing)} (a pair needs prompt, chosen, rejected)")
    chosen = _messages(record["chosen"], "assistant", "chosen")
    rejected = _messages(record["rejected"], "assistant", "rejected")
    conversational = not isinstance(record["chosen"], str)
    prompt = record.get("prompt")
    if prompt is not None and isinstance(prompt, str) != conversational:
        return _messages(prompt, "user", "prompt"), chosen, rejected
    shared = 0  # the implicit prompt: the turns both conversations start with
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if not shared:
        raise PairError('no "prompt", and chosen and rejected share no first turn to take as one')
    return chosen[:shared], chosen[shared:], rejected[shared:]


def sources_problem(cfg) -> str | None:
    """What is wrong with the preference files of ``cfg.data`` (missing, or first lines not pairs), or None."""
    missing, bad = [], []
    for name, source in cfg.data.sources.items():
        path = Path(source.path).expanduser()
        if not path.is_file():
            missing.append(f"data.sources.{name}.path={source.path}")
            continue
        problem = _first_lines_problem(path)
        if problem:
            bad.append(f"data.sources.{name}.path={source.path}: {problem}")
    if missing:
        return (f"the preference data is missing ({', '.join(missing)}): DPO reads the JSONL files themselves, "
                "no `trainctl prepare` needed")
    if bad:
        return (f"{'; '.join(bad)}\n  fix: one JSON object per line, "
                '{"prompt": ..., "chosen": ..., "rejected": ...} (TRL\'s preference format)')
    return None


def _first_lines_problem(path: Path) -> str | None:
    seen = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                pair(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return f"line {number} is not JSON"
            except PairError as exc:
                return f"line {number}: {exc}"
            seen += 1
            if seen >= CHECKED_LINES:
                break
    return None if seen else "no lines"
