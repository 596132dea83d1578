"""SLURM time limits (sbatch --time), read once here for the validator, estimator and executor."""

from __future__ import annotations

import math
import re

_SLURM_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<rest>\d+(?::\d+){0,2})$")
_NO_LIMIT = {"unlimited", "infinite"}


def parse_time_limit(text: str) -> float:
    """Seconds in a SLURM time limit (sbatch --time): "MM", "MM:SS", "HH:MM:SS",
    "D-HH", "D-HH:MM" or "D-HH:MM:SS"; "UNLIMITED"/"INFINITE" is math.inf.
    Raises ValueError otherwise."""
    if text.strip().lower() in _NO_LIMIT:
        return math.inf
    match = _SLURM_TIME.match(text.strip())
    if not match:
        raise ValueError(f"not a SLURM time limit: {text!r} (use HH:MM:SS or D-HH:MM:SS)")
    parts = [int(x) for x in match["rest"].split(":")]
    if match["days"] is not None:
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return ((int(match["days"]) * 24 + hours) * 60 + minutes) * 60.0 + seconds
    if len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return (hours * 60 + minutes) * 60.0 + seconds
