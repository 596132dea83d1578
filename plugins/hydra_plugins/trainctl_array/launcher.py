"""``hydra/launcher=trainctl_array``: submit a sweep as ONE Slurm job array.

Why it exists: with Hydra's basic launcher, each point of ``trainctl submit -m``
is its own job with its own resources; fine for a sweep over layouts, but a
seed or learning-rate sweep on the same allocation shape then fills the queue
with N separate entries. An array is one scheduler entry with N tasks, for a
sweep whose points share resources.

How: every point runs exactly as under Hydra's BasicLauncher (its own config,
run directory and records), but while this launcher runs, ``launch.verbs.submit.ARRAY``
is a list, so trainctl's ``submit`` collects each rendered point there instead of
calling sbatch. After the last point, ``launch.verbs.submit.submit_array`` checks that
all points ask for the same resources, writes SWEEP_DIR/array.sbatch and calls
sbatch once. If any point failed, nothing is submitted.

    trainctl submit -m hydra/launcher=trainctl_array recipe=tiny_slurm train.seed=1,2,3
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in
# sys.modules, and @dataclass then cannot resolve string annotations.
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class TrainctlArrayLauncherConf:
    _target_: str = "hydra_plugins.trainctl_array.launcher.TrainctlArrayLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="trainctl_array", node=TrainctlArrayLauncherConf,
                             provider="trainctl")


class TrainctlArrayLauncher(Launcher):
    def __init__(self) -> None:
        super().__init__()
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import launch.verbs.submit  # here, not at the top: Hydra imports every plugin in any app it runs
        from launch.errors import UserError

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Rendering {len(job_overrides)} points for one job array")
        launch.verbs.submit.ARRAY = []
        try:
            runs = [self._run_point(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]
            points = list(launch.verbs.submit.ARRAY)
            if any(r.status == JobStatus.FAILED for r in runs):
                return runs  # a point raised more than a UserError: Hydra re-raises it; nothing is submitted
            if not points:
                # plan and render never submit; and if every point of a submit failed,
                # each already said why and the CLI exits 2 for them.
                return runs
            if len(points) < len(job_overrides):
                failed = len(job_overrides) - len(points)
                raise UserError(f"{failed} of {len(job_overrides)} points of this sweep failed (see above), so no "
                                "job array was submitted\n  fix: correct the failing points and submit the sweep "
                                "again")
            launch.verbs.submit.submit_array(points, sweep_dir)
            return runs
        finally:
            launch.verbs.submit.ARRAY = None

    def _run_point(self, idx: int, overrides: Sequence[str]) -> JobReturn:
        """One point, as Hydra's BasicLauncher runs it."""
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret
