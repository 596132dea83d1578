"""The seam between the trainer skeleton and an engine: ``TrainModule`` (OLMo-core's, STYLE.md 11).

The skeleton (``launch.train.loop.Trainer``) owns the loop, the data, the batch
ramp-up, logging, validation cadence, stop signals, and the checkpoint and export
*sequences*; an engine owns its model, optimizer and step behind these methods.
Its constructor builds it (process group, model, optimizer) from the run record and
sets the attributes below. Nothing here imports torch: an engine's own file does.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path


class TrainModule(ABC):
    rank: int
    world: int
    dp: int
    """Data-parallel replicas: the ranks that read different samples."""
    dp_rank: int
    device: object
    mbs: int
    """Sequences per micro-batch."""
    micro_batches: int
    """Micro-batches per step on each replica (smaller during a batch ramp-up)."""
    n_params: int
    stop_group = None
    """The process group stop flags are agreed on (None: the default group)."""
    export_kind = "model"
    """What ``export`` writes, for the closing line ("Hugging Face model", ...)."""
    step_loss: float = float("nan")
    """The last step's loss, the same on every rank (``train_step`` agrees it with one all-reduce):
    ``launch.train.guard`` judges the step from it."""
    init_fingerprint: str | None = None
    """``launch.record.fingerprint.of_model`` of the weights ``init_from`` (or the build) loaded from a Hugging
    Face model: recorded so a pipeline's stage can be checked to start from the previous stage's export."""
    step_skipped: bool = False
    """True when the last ``train_step`` applied no optimizer update (a non-finite loss or gradient)."""

    @abstractmethod
    def describe(self) -> str:
        """The layout and engine settings, e.g. "2 rank(s), ZeRO 3"."""

    def layout(self) -> dict:
        """The parallel layout a checkpoint records; a resume onto another layout restores no RNG states."""
        return {"world": self.world}

    def set_batch(self, micro_batches: int) -> None:
        """A batch ramp-up changed the micro-batches per step (the engine may need telling)."""
        self.micro_batches = micro_batches

    @abstractmethod
    def train_step(self, step: int, batches: list) -> tuple[object, float, float | None]:
        """Optimizer step ``step`` (0-based) over ``batches``: (a window item, its learning rate, the grad norm)."""

    @abstractmethod
    def params_finite(self) -> bool:
        """True on every rank when every rank's parameters are finite (one all-reduced flag)."""

    @abstractmethod
    def eval_step(self, batches: list) -> object:
        """The loss over ``batches`` as a window item (``mean_loss`` reduces a list of them)."""

    def evaluating(self):
        """A context in which ``eval_step`` runs (eval mode, no gradients)."""
        return contextlib.nullcontext()

    @abstractmethod
    def mean_loss(self, items: list) -> float:
        """The mean loss over ``items`` (from ``train_step`` or ``eval_step``) and every rank."""

    def window_metrics(self, items: list) -> dict[str, float]:
        """Figures beside the loss over ``items`` and every rank (DPO: rewards, margin, accuracy); every rank
        calls it (it may all-reduce); logged into metrics.jsonl with the step."""
        return {}

    @abstractmethod
    def save_shards(self, directory: Path, client_state: dict) -> None:
        """Write this rank's part of a checkpoint into ``directory`` (exists; every rank calls this)."""

    @abstractmethod
    def load(self, step_dir: Path, marker: dict, step: int) -> None:
        """Restore model and optimizer from ``step_dir`` (marker: its trainctl.json) to continue at ``step``."""

    def init_from(self, source) -> bool:
        """Load only the weights of ``stage.init_checkpoint`` after building (``source``: a
        ``launch.train.init_source.InitSource``, what preflight resolved); False if the build did it."""
        return False

    @abstractmethod
    def export(self, directory: Path, last_step: Path) -> None:
        """Write the end-of-run model into ``directory`` (empty, created on rank 0; every rank calls this);
        ``last_step`` is the committed step directory of the last step."""

    def close(self) -> None:
        """Leave the process group."""
