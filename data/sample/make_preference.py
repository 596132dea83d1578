"""Build data/sample/preference.jsonl, the tiny DPO sample (run once; output is committed; deterministic).

One pair per conversation of chat.jsonl (made by make_chat.py): the prompt is every turn before
the last reply, ``chosen`` the true last reply (read off the quoted code or prose), ``rejected``
either the last reply of another conversation (a wrong name or sentence) or a refusal ("I cannot
tell from this."). Chosen is learnably different from rejected: it copies from the prompt.
Every tenth line is in TRL's standard format (strings: the last user turn, the replies) instead
of the conversational one (message lists). Each line: {"prompt": ..., "chosen": ..., "rejected": ...}.
"""

import json
import sys
from pathlib import Path

REFUSAL = "I cannot tell from this."
OTHER = 7  # the wrong reply is the one of conversation i + 7 (an odd step: the other kind of question too)


def main(folder: Path) -> None:
    with open(folder / "chat.jsonl") as f:
        chats = [json.loads(line)["messages"] for line in f if line.strip()]
    pairs = []
    for i, messages in enumerate(chats):
        prompt, reply = messages[:-1], messages[-1]["content"]
        wrong = chats[(i + OTHER) % len(chats)][-1]["content"] if i % 2 == 0 else REFUSAL
        if wrong == reply:
            wrong = REFUSAL
        if i % 10 == 9:
            pairs.append({"prompt": prompt[-1]["content"], "chosen": reply, "rejected": wrong})
        else:
            pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": reply}],
                          "rejected": [{"role": "assistant", "content": wrong}]})
    with open(folder / "preference.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    print(len(pairs), "pairs")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent))
