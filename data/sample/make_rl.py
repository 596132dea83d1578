"""Writes data/sample/rl.jsonl: the tiny RL stage's prompts (recipes/tiny_grpo.yaml, conf/data/tiny_rl.yaml).

Small sums with a verifiable answer, one JSON object per line: {"prompt": ..., "answer": ...}.
The answer is what the shipped ``exact_match`` reward compares with (launch/train/rewards.py); the
prompt asks for the ``Answer: N`` line its ``format`` reward looks for. Deterministic (seed 0):
run it again and the file is the same.

    python data/sample/make_rl.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("rl.jsonl")
COUNT = 256


def main() -> None:
    rng = random.Random(0)
    lines = []
    for _ in range(COUNT):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        lines.append(json.dumps({"prompt": f"What is {a} + {b}? Reply with one line, Answer: N.\n",
                                 "answer": str(a + b)}))
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
