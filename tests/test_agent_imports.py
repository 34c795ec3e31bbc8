"""The agent runs on small boards: it may import only the standard library, paho and itself."""

import ast
import sys
from pathlib import Path

import pytest

AGENT_DIR = Path(__file__).resolve().parents[1] / "agent"
ALLOWED = set(sys.stdlib_module_names) | {"paho", "agent"}


def top_level_imports(path: Path) -> set[str]:
    """Top-level module names of every absolute import in one file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


AGENT_FILES = sorted(AGENT_DIR.glob("*.py"))


def test_the_agent_package_has_modules():
    expected = {"protocol.py", "settings.py", "head.py", "job_signature.py", "link.py", "journal.py", "runner.py",
                "daemon.py"}
    assert expected <= {p.name for p in AGENT_FILES}


@pytest.mark.parametrize("path", AGENT_FILES, ids=lambda p: p.name)
def test_agent_module_imports_only_stdlib_paho_and_agent(path):
    assert top_level_imports(path) - ALLOWED == set()


@pytest.mark.parametrize("path", AGENT_FILES, ids=lambda p: p.name)
def test_only_the_link_talks_to_paho(path):
    """agent/link.py owns the broker: no other agent module imports paho."""
    assert ("paho" in top_level_imports(path)) == (path.name == "link.py")


def test_the_import_check_catches_a_third_party_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import json\nfrom pydantic import BaseModel\nfrom . import protocol\n")
    assert top_level_imports(bad) - ALLOWED == {"pydantic"}
