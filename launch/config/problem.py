"""What a validation rule returns, and the small helpers rules share.

A problem names the keys with their values, says what is wrong with the numbers
of the broken equation, and proposes a fix (torchtitan's ParallelDims._validate
is the model). The rules themselves live in ``rules`` (any backend) and
``backend_rules`` (one backend); ``validate`` lists and runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from launch.config.derive import Derived
from launch.config.schema import BackendName, Config


@dataclass(frozen=True)
class Problem:
    keys: dict[str, object]
    """The offending keys and their values, as the user would type them."""
    message: str
    fix: str

    def __str__(self) -> str:
        keys = ", ".join(f"{k}={_show(v)}" for k, v in self.keys.items())
        return f"{keys}: {self.message}\n  fix: {self.fix}"


def _show(value: object) -> str:
    name = getattr(value, "name", None)
    if name is not None and not isinstance(value, str):
        return str(name)  # enums as the user types them
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


Rule = Callable[[Config, Derived], Iterator[Problem]]
"""A validation rule: the config and its derived numbers in, every problem it finds out."""


def divisors(n: int) -> list[int]:
    small = [k for k in range(1, int(n**0.5) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


def split_evenly(count_key: str, count: int, what: str, size_key: str, size: int) -> Iterator[Problem]:
    """``count`` things (heads, experts) must divide evenly over a group of ``size``."""
    if size > 0 and count % size:
        name = size_key.split(".")[-1]
        yield Problem({count_key: count, size_key: size}, f"{count} {what} cannot be split evenly over {name}={size}",
                      f"choose {size_key} from {divisors(count)}")


def is_megatron(cfg: Config) -> bool:
    return cfg.backend.name == BackendName.megatron
