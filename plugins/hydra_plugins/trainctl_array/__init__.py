"""trainctl's job-array launcher: ``hydra/launcher=trainctl_array`` (see launcher.py)."""
