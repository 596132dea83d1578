"""What runs on the nodes: ``python -m launch.train RUN_DIR``, started by torchrun.

This package imports torch (and later deepspeed, megatron); nothing on the
login-node path (plan, render, submit) imports it.
"""
