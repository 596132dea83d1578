"""Numbers as people read them in a table: 70.6B params, 16.8M tokens, 1.02k tokens/s."""


def si(x: float, unit: str = "") -> str:
    """3 significant digits with a k/M/B/T/P suffix (B, not G: billions, as parameter counts are written)."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"
