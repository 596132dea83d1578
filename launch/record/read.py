"""The run directory's records, read in one place: ``config.yaml``, ``plan.json``, ``meta.json``.

Both sides of the login/node boundary read a run through here (torchtitan reads
its ``JobConfig`` once the same way): ``submit``, ``status`` and ``tune`` on the
login node, the trainers and the rank check on the nodes. What comes back is
typed: the schema's dataclasses with real enums (``RunConfig.cfg``), the derived
numbers (``RunConfig.derived``, ``launch.config.derive``) and frozen dataclasses
for the plan's blocks (``PlanNumbers``), so nobody re-parses YAML or reads a
number by a string key and hedges with ``hasattr``.

**Versions.** ``plan.json`` carries ``record_version``. A multi-week run outlives
its virtualenv: a job requeued after an upgrade reads the records an older
trainctl wrote, so every version in ``READABLE`` is still read (records written
before versions existed read as version 0, the same files). A record newer than
this trainctl, or older than it can honour, is refused with the command that
re-creates it; ``submit`` checks the run's checkpoint the same way
(``launch.record.checkpoints.resume_problem``), so that refusal comes on the login
node, not inside a requeued job.

**Damage.** A file that is not valid YAML/JSON, lacks a key or holds a value of
the wrong type raises ``RecordError`` (a ``UserError``: exit 2, one line, no
traceback) naming the file, the key, and the command that writes it again
(``meta.json``'s ``command``).

Writing stays with ``launch.record.write`` (``write_run``: every file staged, ``plan.json``
last), whose ``plan.json`` text comes from ``plan_json`` here.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launch.backends import checkpoint_steps
from launch.config.derive import Derived, derive
from launch.config.schema import Config
from launch.errors import UserError

RECORD_VERSION = 1
"""The version of the run records this trainctl writes (``plan.json``'s ``record_version``)."""
READABLE = range(0, RECORD_VERSION + 1)
"""Versions this trainctl reads: 0 is a record written before ``record_version`` existed."""

CONFIG, PLAN, META = "config.yaml", "plan.json", "meta.json"


class RecordError(UserError):
    """A run record that is missing, damaged, or of a version this trainctl cannot read."""


# --- the plan's numbers ----------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    ep: int
    vpp: int
    dp: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int


@dataclass(frozen=True)
class ModelSize:
    params_total: int
    params_active: int


@dataclass(frozen=True)
class Flops:
    per_token: float
    """Megatron-LM's model FLOPs per token (no recompute): the MFU numerator."""
    per_step: float
    total: float
    per_token_6nd: float


@dataclass(frozen=True)
class Memory:
    """GiB per GPU on the heaviest pipeline stage."""
    per_gpu_peak: float
    weights: float
    grads: float
    optimizer: float
    activations: float
    hbm: float
    fits: bool


@dataclass(frozen=True)
class Throughput:
    step_time_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: float


@dataclass(frozen=True)
class RunCost:
    tokens: int
    steps: int
    wall_clock_days: float
    gpu_hours: float
    cost_usd: float
    energy_mwh: float
    co2_tonnes: float
    expected_failures: float
    mtbf_cluster_min: float
    checkpoint_interval_min: float
    jobs_needed: int


@dataclass(frozen=True)
class Scaling:
    tokens_per_param: float
    predicted_loss: float | None


@dataclass(frozen=True)
class PlanNumbers:
    """``plan.json`` (DESIGN.md, "plan.json"), typed."""
    world_size: int
    nodes: int
    gpus_per_node: int
    parallel: Layout
    model: ModelSize
    flops: Flops
    memory_gib: Memory
    throughput: Throughput
    run: RunCost
    scaling: Scaling
    memory_stages_gib: tuple[float, ...]
    record_version: int = RECORD_VERSION

    def save_interval(self, checkpoint_interval: int | None) -> int | None:
        """Steps between checkpoints: ``train.checkpoint_interval``, else the plan's Young/Daly interval."""
        return checkpoint_steps(checkpoint_interval, self.run.checkpoint_interval_min, self.throughput.step_time_s)


def plan_json(numbers: dict) -> str:
    """The text of ``plan.json`` for the estimator's blocks, with this trainctl's record version."""
    return json.dumps({**numbers, "record_version": RECORD_VERSION}, indent=2) + "\n"


# --- readers -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunConfig:
    """``config.yaml``: the resolved config as ``render`` wrote it."""
    cfg: Config
    """Typed: the schema's dataclasses, enums as enums."""
    raw: dict
    """The same as plain data (what a checkpoint records and a resume compares)."""
    derived: Derived


def read_config(run_dir: Path) -> RunConfig:
    """``RUN_DIR/config.yaml``, typed and derived; ``RecordError`` if it is missing or damaged."""
    path = run_dir / CONFIG
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise _damaged(run_dir, CONFIG, "missing: this is not a rendered run directory") from None
    except Exception as exc:  # noqa: BLE001 - yaml's parser errors have no common public base in OmegaConf
        raise _damaged(run_dir, CONFIG, f"not valid YAML ({_first_line(exc)})") from None
    if not OmegaConf.is_dict(loaded):
        raise _damaged(run_dir, CONFIG, "not a mapping of config groups")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(Config), loaded)
        cfg = OmegaConf.to_object(typed)
        raw = OmegaConf.to_container(loaded, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise _damaged(run_dir, CONFIG, f"key {key}: {_first_line(exc.msg if hasattr(exc, 'msg') else exc)}") \
            from None
    return RunConfig(cfg=cfg, raw=raw, derived=derive(cfg))


def read_plan(run_dir: Path) -> PlanNumbers:
    """``RUN_DIR/plan.json``, typed; ``RecordError`` if it is missing, damaged, or of another version."""
    path = run_dir / PLAN
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise _damaged(run_dir, PLAN, "missing: this run was never planned") from None
    except (OSError, ValueError) as exc:  # unreadable, not JSON, not UTF-8
        raise _damaged(run_dir, PLAN, f"not valid JSON ({exc})") from None
    return parse_plan(data, run_dir)


def parse_plan(data: object, run_dir: Path = Path(".")) -> PlanNumbers:
    """``PlanNumbers`` from plan.json's content (``launch.verbs.plan.plan_numbers``'s dict, or a file's)."""
    if not isinstance(data, dict):
        raise _damaged(run_dir, PLAN, "not a JSON object")
    version = data.get("record_version", 0)
    if not isinstance(version, int) or version not in READABLE:
        raise _damaged(run_dir, PLAN, f"record_version {version!r}: this trainctl reads versions "
                                      f"{READABLE.start}..{READABLE.stop - 1}"
                                      f"{' (written by a newer trainctl)' if isinstance(version, int) and version > RECORD_VERSION else ''}")
    return _parse(PlanNumbers, {**data, "record_version": version}, run_dir, PLAN, "")


def read_backend_file(run_dir: Path, name: str) -> dict:
    """A backend file ``render`` wrote (``ds_config.json``, ``megatron.yaml``) as a mapping; ``RecordError``
    naming it when it is missing or damaged (the engine would otherwise fail inside the process group)."""
    try:
        text = (run_dir / name).read_text()
        data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except FileNotFoundError:
        raise _damaged(run_dir, name, "missing: the run was planned but not rendered") from None
    except Exception as exc:  # noqa: BLE001 - json's and yaml's parser errors
        raise _damaged(run_dir, name, f"not valid {'JSON' if name.endswith('.json') else 'YAML'} "
                                      f"({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise _damaged(run_dir, name, "not a mapping")
    return data


def read_overrides(run_dir: Path) -> list[str]:
    """``RUN_DIR/overrides.yaml``: the command-line overrides of this run (a sweep point's own), or []."""
    try:
        loaded = OmegaConf.load(run_dir / "overrides.yaml")
    except FileNotFoundError:
        return []
    except Exception as exc:  # noqa: BLE001 - yaml's parser errors
        raise _damaged(run_dir, "overrides.yaml", f"not valid YAML ({_first_line(exc)})") from None
    if not OmegaConf.is_list(loaded):
        raise _damaged(run_dir, "overrides.yaml", "not a list of overrides")
    return [str(o) for o in loaded]


def read_meta(run_dir: Path) -> dict | None:
    """``RUN_DIR/meta.json`` (what ran: versions, git state, the command), or None if absent or damaged.

    Only ever informational, so damage here is not an error: it is what the error messages
    of the other records quote for their fix.
    """
    try:
        data = json.loads((run_dir / META).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def recreate_command(run_dir: Path) -> str:
    """The command that writes this run's records again (from ``meta.json``), for error messages."""
    command = (read_meta(run_dir) or {}).get("command")
    if isinstance(command, str) and command.startswith("trainctl "):
        verb, _, rest = command.partition(" ")[2].partition(" ")
        if verb in ("plan", "render", "submit"):
            return f"trainctl render {rest}".strip()
    return "trainctl render <the run's overrides> (or re-submit it)"


# --- parsing -----------------------------------------------------------------------------------

def _parse(cls, data, run_dir: Path, file: str, prefix: str):
    """``cls`` (a frozen dataclass) from ``data``, every field checked: a missing key or wrong type names it."""
    if not isinstance(data, dict):
        raise _damaged(run_dir, file, f"key {prefix.rstrip('.')}: expected an object, found {data!r}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if f.name not in data:
            if f.default is not dataclasses.MISSING:
                continue
            raise _damaged(run_dir, file, f"key {key} is missing")
        values[f.name] = _value(hints[f.name], data[f.name], run_dir, file, key)
    return cls(**values)


def _value(hint, value, run_dir: Path, file: str, key: str):
    if dataclasses.is_dataclass(hint):
        return _parse(hint, value, run_dir, file, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:  # tuple[float, ...]
        if not isinstance(value, list):
            raise _damaged(run_dir, file, f"key {key}: expected a list, found {value!r}")
        return tuple(_value(args[0], v, run_dir, file, f"{key}[{i}]") for i, v in enumerate(value))
    if type(None) in args:  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}[hint](value)
    if not ok:
        raise _damaged(run_dir, file, f"key {key}: expected {hint.__name__}, found {value!r}")
    return float(value) if hint is float else value


def _damaged(run_dir: Path, file: str, problem: str) -> RecordError:
    return RecordError(f"{run_dir / file}: {problem}\n  fix: write the run's records again: "
                       f"{recreate_command(run_dir)}")


def _first_line(exc) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
