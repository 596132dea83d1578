"""A Hydra callback that notes which run directories a command is about to create.

Hydra makes the run (or sweep) directory before the task runs; when every point
of the command then fails, trainctl removes what this command created and
nothing else (``cleanup``). ``conf/config.yaml`` names the callback under
``hydra.callbacks``; Hydra calls ``on_run_start``/``on_multirun_start`` before it
creates anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from hydra.experimental.callback import Callback

HYDRA_RECORDS = ("multirun.yaml",)
"""Files Hydra itself writes into a sweep directory."""


class RunDirectories(Callback):
    created: ClassVar[list[Path]] = []
    """The outermost directories this process's commands will create (cleared by ``cleanup``)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._note(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._note(Path(config.hydra.sweep.dir))

    @classmethod
    def _note(cls, path: Path) -> None:
        """Note each directory that making ``path`` will create, outermost first.

        The path is walked as written: Hydra's mkdir of ``runs/../x`` creates
        ``runs`` on the way, besides ``x``.
        """
        current = Path(path.absolute().parts[0])
        for part in path.absolute().parts[1:]:
            current = current / part
            real = Path(os.path.normpath(current))
            if part != ".." and not real.exists() and not any(real.is_relative_to(c) for c in cls.created):
                cls.created.append(real)


def cleanup() -> None:
    """Remove the directories noted since the last call, if they hold only Hydra's records and empty folders."""
    for top in RunDirectories.created:
        if top.is_dir():
            for path in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [top]:
                if path.is_file() and path.name in HYDRA_RECORDS:
                    path.unlink()
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
    RunDirectories.created.clear()


def forget() -> None:
    """The command succeeded (at least one point): keep what it created."""
    RunDirectories.created.clear()
