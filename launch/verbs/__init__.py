"""The commands, one module each, with what only they use (the CLI's verb table is ``launch/cli.py``).

``plan`` (compose -> typed -> derive -> validate -> estimate), ``records`` (what plan, render
and submit write into a run directory), ``report`` and ``chart`` (the printed plan and
plan.png), ``oom`` (render's memory check), ``pipeline`` (a config of several stages),
``submit``, ``status`` (and cancel), ``size``, ``tune`` (the layout search), ``tune_run``
(the verb around it) and ``probe`` (tune's short real runs).
"""
