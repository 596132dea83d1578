"""The login node's checks of an RL stage (``stage=rlhf``): reward names, reward model, group size, prompt data.

No torch, no import of a user's reward module: a ``module:function`` path resolves
when Python finds the module (``importlib.util.find_spec``, which imports only its
parent packages) and its source defines ``function`` at top level (read with
``ast``, not run). A module without source (compiled) only needs to be found.

- ``stage_rl`` (a validation rule: plan, render, submit): every name in
  ``stage.rewards`` resolves; ``stage.reward_model`` is a Hugging Face model
  directory; ``stage.num_generations`` >= 2 and divides ``train.global_batch_size``
  (completions per optimizer step: TRL's generation batch, which it splits into
  groups of ``num_generations``).
- ``prompt_data_problem`` (``submit``): every line of each source (the first
  ``LINES`` of a long file) is a JSON object with a non-empty prompt field
  (``data.sources.*.text_key``) and, when a reward reads it, an ``answer``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import Iterator

from launch.config.derive import Derived
from launch.config.problem import Problem
from launch.config.schema import Config, StageKind
from launch.train.rewards import ANSWER_FIELD, NEEDS_ANSWER, SHIPPED

LINES = 10_000
"""Lines of each prompt file read at submit (a check, not a pass over a large data set)."""


def reward_problem(name: str) -> str | None:
    """Why ``name`` is no reward function, or None."""
    if name in SHIPPED:
        return None
    module, sep, function = name.partition(":")
    if not sep or not module or not function.isidentifier():
        return f"not a shipped reward ({', '.join(SHIPPED)}) nor a module:function import path"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        return f"its module cannot be found ({type(exc).__name__}: {exc})"
    if spec is None:
        return f"no module {module} on this Python path"
    origin = spec.origin
    if not origin or not origin.endswith(".py"):
        return None  # compiled or namespace: found, nothing to read
    try:
        tree = ast.parse(Path(origin).read_text(), filename=origin)
    except (OSError, SyntaxError, ValueError) as exc:
        return f"{origin} cannot be read ({type(exc).__name__}: {exc})"
    if function not in _top_level_names(tree):
        return f"{origin} defines no {function} at top level"
    return None


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names.update(t.id for t in ast.walk(target) if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def stage_rl(cfg: Config, d: Derived) -> Iterator[Problem]:
    """Validation rule: what an RL stage names exists, and its group size fits the batch."""
    s = cfg.stage
    if s.kind != StageKind.rlhf:
        return
    for i, name in enumerate(s.rewards):
        why = reward_problem(str(name))
        if why:
            yield Problem({f"stage.rewards[{i}]": name}, why,
                          f"one of {', '.join(SHIPPED)}, or package.module:function (a function "
                          "f(prompts, completions, **columns) -> list[float] on the job's Python path)")
    if s.reward_model and not Path(s.reward_model, "config.json").expanduser().is_file():
        yield Problem({"stage.reward_model": s.reward_model},
                      "no Hugging Face model there (config.json): TRL loads it as a sequence-classification model",
                      "stage.reward_model=/path/to/reward_model_dir (save_pretrained's output), or null")
    if s.reference_checkpoint and s.reference_checkpoint != s.init_checkpoint:
        yield Problem({"stage.reference_checkpoint": s.reference_checkpoint, "stage.init_checkpoint": s.init_checkpoint},
                      "TRL's GRPO and RLOO trainers take their KL reference from the initial policy; another "
                      "reference model is not supported", "stage.reference_checkpoint=null")
    gbs = cfg.train.global_batch_size
    if s.num_generations < 2:
        yield Problem({"stage.num_generations": s.num_generations},
                      "a group needs at least 2 completions: its advantages are relative to the group",
                      "stage.num_generations=8")
    elif gbs % s.num_generations:
        yield Problem({"train.global_batch_size": gbs, "stage.num_generations": s.num_generations},
                      f"an RL step's batch is {gbs} completions, which do not split into groups of "
                      f"{s.num_generations} (one group per prompt)",
                      f"train.global_batch_size={max(gbs // s.num_generations, 1) * s.num_generations}")
    if s.max_completion_length < 1:
        yield Problem({"stage.max_completion_length": s.max_completion_length},
                      "completions need at least one token", "stage.max_completion_length=256")


def prompt_data_problem(cfg: Config) -> str | None:
    """Why the prompt data of an RL stage would fail on the node, or None (other stages: None)."""
    if cfg.stage.kind != StageKind.rlhf:
        return None
    need_answer = any(str(r) in NEEDS_ANSWER for r in cfg.stage.rewards)
    for name, source in cfg.data.sources.items():
        path = Path(source.path).expanduser()
        key = f"data.sources.{name}.path={source.path}"
        if not path.is_file():
            return f"{key}: no such file; an RL stage reads JSONL prompts\n  fix: point it at a JSONL file"
        fields = [source.text_key] + ([ANSWER_FIELD] if need_answer else [])
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if number > LINES:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    return f"{key}: line {number} is not JSON ({exc})\n  fix: one JSON object per line"
                missing = [k for k in fields if not isinstance(row, dict) or row.get(k) in (None, "")]
                if missing:
                    why = " (the exact_match reward compares with it)" if ANSWER_FIELD in missing else ""
                    return (f"{key}: line {number} has no {' or '.join(repr(m) for m in missing)} field{why}\n"
                            f"  fix: every line needs {' and '.join(repr(k) for k in fields)}; the prompt field is "
                            f"data.sources.{name}.text_key")
    return None
