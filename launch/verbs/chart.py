"""plan.png: memory per GPU on each pipeline stage, stacked by kind, against HBM.

Drawn by ``render`` when matplotlib is installed (``pip install trainctl[chart]``):
the login-node install stays light, ``plan`` stays fast (matplotlib takes seconds
to import), and the plan table carries the same numbers.
"""

from __future__ import annotations

import io
from importlib.util import find_spec

PARTS = ("weights", "grads", "optimizer", "activations", "overhead")
COLORS = ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#b0b0b0")


def matplotlib_available() -> bool:
    return find_spec("matplotlib") is not None


def memory_chart_png(stages: list[dict], hbm_gib: float, title: str) -> bytes:
    """PNG bytes of stacked bars, one per stage; ``stages`` hold GiB under the names in PARTS."""
    import matplotlib

    matplotlib.use("Agg")  # no display on login nodes
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 0.45 * len(stages) + 2), 3.6), dpi=110)
    ax = fig.add_subplot()
    x = range(len(stages))
    bottom = [0.0] * len(stages)
    for part, color in zip(PARTS, COLORS):
        heights = [stage.get(part, 0.0) for stage in stages]
        ax.bar(x, heights, bottom=bottom, color=color, label=part, width=0.7)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.axhline(hbm_gib, color="black", linestyle="--", linewidth=1)
    ax.text(len(stages) - 0.5, hbm_gib, f" HBM {hbm_gib:.1f} GiB", va="bottom", ha="right", fontsize=8)
    ax.set_xticks(list(x), [str(i) for i in x], fontsize=7)
    ax.set_xlabel("pipeline stage")
    ax.set_ylabel("GiB per GPU")
    ax.set_ylim(0, max(max(bottom), hbm_gib) * 1.15)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncols=len(PARTS), loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
