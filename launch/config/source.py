"""A Hydra config source that serves ``conf/`` with ``recipes/`` as its ``recipe`` group.

Recipes are complete experiments and live in the top-level ``recipes/`` folder,
yet are selected like any group (``recipe=NAME``). Hydra maps a group to a
sub-folder of a search-path root, so this source presents one virtual tree:
``recipe/*`` comes from ``recipes/``, everything else from ``conf/``. It is
registered under the scheme ``trainctl://`` and used as the primary config path.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from launch.config.schema import register_schemas
from launch.errors import UserError
from launch.paths import asset_dir

RECIPE_GROUP = "recipe"
USER_PATH_ENV = "TRAINCTL_CONFIG_PATH"


class TrainctlConfigSource(ConfigSource):
    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)
        self._conf = FileConfigSource(provider, str(asset_dir("conf")))
        self._recipes = FileConfigSource(provider, str(asset_dir("recipes")))

    @staticmethod
    def scheme() -> str:
        return "trainctl"

    def _route(self, config_path: str) -> tuple[FileConfigSource, str]:
        """The real source and its relative path for a virtual ``config_path``."""
        head, _, rest = config_path.partition("/")
        if head == RECIPE_GROUP or head == f"{RECIPE_GROUP}.yaml":
            return self._recipes, rest
        return self._conf, config_path

    def load_config(self, config_path: str) -> ConfigResult:
        source, path = self._route(config_path)
        return source.load_config(path)

    def available(self) -> bool:
        return self._conf.available()

    def is_group(self, config_path: str) -> bool:
        if config_path == RECIPE_GROUP:
            return self._recipes.available()
        source, path = self._route(config_path)
        return source.is_group(path)

    def is_config(self, config_path: str) -> bool:
        source, path = self._route(config_path)
        return bool(path) and source.is_config(path)

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        source, path = self._route(config_path)
        found = source.list(path, results_filter)
        if config_path == "" and results_filter in (None, ObjectType.GROUP):
            found = sorted(set(found) | {RECIPE_GROUP})
        return found


class TrainctlSearchPath(SearchPathPlugin):
    """Puts trainctl's configs on Hydra's search path, after the user's own.

    Directories in ``TRAINCTL_CONFIG_PATH`` (``:``-separated) come first, so a
    site's ``cluster/h100.yaml`` or ``recipe/my_run.yaml`` adds to the shipped
    options and wins over a shipped file of the same name.
    """

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # hydra.main(config_path=None) adds the app's own package (pkg://launch) as
        # "main": its sub-packages (launch/train, launch/config) would pass for
        # config groups (`~train` would mean the package). It holds no configs.
        path = search_path.get_path()
        path[:] = [e for e in path if not (e.provider == "main" and e.path == "pkg://launch")]
        for directory in user_config_dirs():
            search_path.append("trainctl-user", f"file://{directory}")
        search_path.append("trainctl", "trainctl://")


def user_config_dirs() -> list[str]:
    """The absolute directories of ``TRAINCTL_CONFIG_PATH``; an entry that is not a directory is a
    UserError (Hydra would skip it without a word, and the site's recipes would silently be missing)."""
    found = []
    for directory in os.environ.get(USER_PATH_ENV, "").split(os.pathsep):
        if not directory:
            continue
        if not os.path.isdir(directory):
            what = "is a file, not a directory" if os.path.exists(directory) else "does not exist"
            raise UserError(f"{USER_PATH_ENV}: {directory} {what}\n  fix: name directories that hold config groups "
                            f"(recipe/, cluster/, ...), separated by '{os.pathsep}', or unset {USER_PATH_ENV}")
        found.append(os.path.abspath(directory))
    return found


def group_options() -> dict[str, list[str]]:
    """Each config group and its options, shipped and from TRAINCTL_CONFIG_PATH, without composing."""
    sources: list[ConfigSource] = [TrainctlConfigSource("trainctl", "trainctl://")]
    sources += [FileConfigSource("trainctl-user", d) for d in user_config_dirs()]
    found: dict[str, set[str]] = {}
    for source in sources:
        if not source.available():
            continue
        for group in source.list("", ObjectType.GROUP):
            found.setdefault(group, set()).update(source.list(group, ObjectType.CONFIG))
    return {group: sorted(options) for group, options in sorted(found.items())}


def register() -> None:
    """Make trainctl's configs visible to Hydra in this process only.

    Also registers two resolvers: ``${asset:data/sample/x.jsonl}``, the absolute
    path of a file shipped with trainctl (checkout or wheel), and ``${python:}``,
    the interpreter running trainctl (for a test cluster on this machine, where
    the nodes share it).

    Registered explicitly by the CLI (not discovered as a plugin), so other
    Hydra apps in the same environment never see trainctl's groups.
    """
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda path: str(asset_dir(path.split("/")[0]) / path.partition("/")[2]))
    if not OmegaConf.has_resolver("python"):
        OmegaConf.register_new_resolver("python", lambda: sys.executable)
    plugins = Plugins.instance()
    plugins.register(TrainctlConfigSource)
    plugins.register(TrainctlSearchPath)
    register_schemas()
