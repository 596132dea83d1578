"""trainctl: compose, check, estimate, render and launch foundation-model training runs."""

__version__ = "0.1.0"
