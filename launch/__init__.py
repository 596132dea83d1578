"""trainctl: compose, check, estimate, render and launch foundation-model training runs.

Imports sit at the top of each module, except the heavy ones named in ``LAZY``:
those are imported inside the functions that need them. The login path
(``trainctl plan``, ``render``, ``submit``, ``status``, ``size``, ``tune``) runs on a
login node that may have none of them installed (``pip install -e .`` without the
``train`` extras), and must start in well under a second; importing torch alone
takes seconds. ``tests/test_cli.py`` checks that the CLI up to ``submit`` imports
none of them, and ``benchmarks/cli_latency.py`` times ``trainctl plan``.

The launch modules that import these at their top (the trainers and the
engine-facing parts of ``launch.train``) are in turn imported lazily by whatever
the login path reaches (for example ``python -m launch.train`` is its own process).
Third-party packages that are light but only some commands use (``rich``'s
tables, ``omegaconf`` inside a loader) may also be imported where they are used.
"""

__version__ = "0.1.0"

LAZY: tuple[str, ...] = (
    "torch",  # seconds to import; absent on a login node
    "deepspeed",  # imports torch; the DeepSpeed trainer only
    "megatron",  # megatron-core: imports torch; the Megatron-Core trainer, data building, and prepare's shards
    "transformers",  # imports torch; the DeepSpeed trainer's model and the chat template
    "datasets",  # Hugging Face datasets: `trainctl prepare` reading sources only
    "tokenizers",  # `trainctl prepare` and the trainers' data only
    "wandb",  # the trainer's rank 0 only; optional
    "matplotlib",  # `render`'s plan.png only; optional
    "numpy",  # comes with torch; the data and trainer code only
)
"""Packages imported inside functions, never at the top of a module the login path imports."""
