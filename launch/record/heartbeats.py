"""Node heartbeats: ``RUN_DIR/heartbeats/NODE.json``, one file per node, read by ``trainctl status``.

The local-rank-0 watchdog of each node writes them (``launch.train.watchdog``); no torch here.
``time``/``unix`` is the time of the node's last training progress, not of the write, so a file
older than its ``hang_timeout_s`` plus one write period names a node that stopped making progress
and whose watchdog did not end it (the node is gone, frozen, or the watchdog is off).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

DIR = "heartbeats"
PERIOD_S = 15.0
"""A node writes at most one heartbeat this often while it makes progress (plus one per phase change)."""
DEFAULT_TIMEOUT_S = 480.0
"""The stall threshold where a heartbeat says the watchdog was off (train.hang_timeout_s=0)."""


@dataclass(frozen=True)
class Heartbeat:
    node: str
    job: str
    restart: int
    step: int | None
    phase: str
    unix: float
    hang_timeout_s: float

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.unix)

    def stalled(self, now: float | None = None) -> bool:
        """No progress for longer than the watchdog allows (plus one write period): it should have ended."""
        limit = self.hang_timeout_s if self.hang_timeout_s > 0 else DEFAULT_TIMEOUT_S
        return self.phase != "ended" and self.age(now) > limit + PERIOD_S


def read_all(run_dir: Path) -> list[Heartbeat]:
    """Every node's last heartbeat, by node name; a damaged or foreign file is skipped."""
    found = []
    for path in sorted((run_dir / DIR).glob("*.json")):
        try:
            d = json.loads(path.read_text())
            found.append(Heartbeat(node=str(d["node"]), job=str(d["job"]), restart=int(d["restart"]),
                                   step=d.get("step"), phase=str(d["phase"]), unix=float(d["unix"]),
                                   hang_timeout_s=float(d.get("hang_timeout_s") or 0)))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found
