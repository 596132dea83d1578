"""Build the tiny sample mixture shipped in data/sample/ (run once; output is committed).

prose.jsonl: module and class docstrings of Python's standard library (English prose).
code.jsonl:  function sources from the same modules (Python code).
Both are under the PSF licence and need no download.
"""

import ast
import json
import sys
import sysconfig
from pathlib import Path

MODULES = ["argparse", "asyncio/base_events", "calendar", "collections/__init__", "csv", "dataclasses",
           "datetime", "difflib", "email/message", "fractions", "functools", "heapq", "http/client",
           "inspect", "ipaddress", "json/decoder", "logging/__init__", "pathlib", "pickle", "random",
           "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing",
           "unittest/case", "urllib/parse", "uuid", "zipfile"]
LIMIT = 400


def main(out_dir: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prose, code = [], []
    for name in MODULES:
        source = (stdlib / f"{name}.py").read_text()
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 300:
                    prose.append(doc)
            if isinstance(node, ast.FunctionDef):
                text = ast.get_source_segment(source, node)
                if text and 300 < len(text) < 3000:
                    code.append(text)
    for name, texts in (("prose", prose), ("code", code)):
        with open(out_dir / f"{name}.jsonl", "w") as f:
            for text in texts[:LIMIT]:
                f.write(json.dumps({"text": text}) + "\n")
        print(name, min(len(texts), LIMIT), "records")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent))
