"""What the docs promise is backed by a test: every test they cite exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
CITED = re.compile(r"`(test_[a-z_0-9]+\.py)::(test_[a-z_0-9]+\*?)")  # test_drop_*: a prefix


def test_every_test_the_docs_cite_exists() -> None:
    cited = {
        (doc.name, module, name)
        for doc in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
        for module, name in CITED.findall(doc.read_text())
    }
    assert len(cited) > 40  # the fault tables cite dozens
    missing = []
    for doc, module, name in sorted(cited):
        tree = ast.parse((ROOT / "tests" / module).read_text())
        defined = {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        if not any(d == name or (name.endswith("*") and d.startswith(name[:-1])) for d in defined):
            missing.append(f"{doc}: {module}::{name}")
    assert missing == []
