"""Build data/sample/chat.jsonl, the tiny SFT sample (run once; output is committed).

Short conversations made from the two shipped sources, no download: for a function of
code.jsonl, "what is it called and what does it take?" (some with a second turn, "how
many lines?"); for a docstring of prose.jsonl, "give its first sentence". Answers are
read off the text (Python's ast, the first sentence), so a model can learn them.
Each line: {"messages": [{"role": ..., "content": ...}, ...]}.
"""

import ast
import json
import re
import sys
from pathlib import Path

PER_SOURCE = 150
SNIPPET = 240  # characters of the code or prose quoted in the question
SYSTEM = "You are a concise assistant for Python's standard library."


def code_chat(i: int, text: str) -> dict | None:
    try:
        node = ast.parse(text).body[0]
    except SyntaxError:
        return None
    if not isinstance(node, ast.FunctionDef):
        return None
    args = [a.arg for a in node.args.args]
    took = ", ".join(f"`{a}`" for a in args) if args else "no arguments"
    messages = [{"role": "user", "content": f"What is this function called, and what does it take?\n\n"
                                            f"{text[:SNIPPET].rstrip()}"},
                {"role": "assistant", "content": f"It is `{node.name}`, taking {took}."}]
    if i % 3 == 0:
        messages += [{"role": "user", "content": "How many lines is it?"},
                     {"role": "assistant", "content": f"{len(text.splitlines())} lines."}]
    if i % 2 == 0:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def prose_chat(i: int, text: str) -> dict | None:
    first = re.split(r"(?<=[.!?])\s", " ".join(text.split()), maxsplit=1)[0]
    if not 20 <= len(first) <= 200:
        return None
    messages = [{"role": "user", "content": f"Give the first sentence of this documentation.\n\n"
                                            f"{text[:SNIPPET].rstrip()}"},
                {"role": "assistant", "content": first}]
    if i % 2 == 1:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": messages}


def main(folder: Path) -> None:
    chats = []
    for name, make in (("code", code_chat), ("prose", prose_chat)):
        with open(folder / f"{name}.jsonl") as f:
            texts = [json.loads(line)["text"] for line in f]
        made = [c for c in (make(i, t) for i, t in enumerate(texts)) if c][:PER_SOURCE]
        chats += made
        print(name, len(made), "conversations")
    chats = [c for pair in zip(chats[:PER_SOURCE], chats[PER_SOURCE:]) for c in pair]  # interleaved
    with open(folder / "chat.jsonl", "w") as f:
        for chat in chats:
            f.write(json.dumps(chat) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent))
