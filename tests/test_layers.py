"""Imports run one way: the bus and the agents never import the daemon.

The daemon supervises the broker and the agents, so it may import agentd.bus
and agentd.agents; the reverse would make the lower layers drag in the daemon
(and its config, tree and runtime) wherever they run. The check parses every
module with ast, so a string or a comment that mentions agentd.daemon is not an
import and an import written any way (absolute, relative, `from agentd import
daemon`, importlib) is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The lower layers: folder → package (pyproject.toml's package-dir).
LOWER = {"bus": "agentd.bus", "agents": "agentd.agents"}
UPPER = "agentd.daemon"


def module_name(path: Path, folder: str) -> str:
    """The dotted name of `path` (agents/examples/jobs.py → agentd.agents.examples.jobs)."""
    parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([LOWER[folder], *parts])


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a `from <level dots><target> import` inside `module`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, target] if target else base)


def _is_upper(name: str) -> bool:
    return name == UPPER or name.startswith(UPPER + ".")


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """Every import of agentd.daemon in `source`, as 'LINE: name'."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module
            if node.level:
                target = _absolute(module, is_package, node.level, node.module)
            assert target is not None
            # `from agentd import daemon` imports agentd.daemon as well.
            names = [target, *(f"{target}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if called in ("import_module", "__import__") and isinstance(first, ast.Constant):
                names = [str(first.value)]
        found += [f"{getattr(node, 'lineno', 0)}: {name}" for name in names if _is_upper(name)]
    return found


def lower_modules() -> list[tuple[str, Path]]:
    return [
        (folder, path)
        for folder in LOWER
        for path in sorted((ROOT / folder).rglob("*.py"))
        if ".venv" not in path.parts
    ]


def test_the_lower_layers_are_all_found() -> None:
    names = {module_name(path, folder) for folder, path in lower_modules()}
    # The modules that once imported the daemon are among those checked.
    assert {"agentd.bus.broker", "agentd.agents.sdk", "agentd.agents.examples.workers"} <= names


@pytest.mark.parametrize(
    ("folder", "path"),
    lower_modules(),
    ids=[str(path.relative_to(ROOT)) for _, path in lower_modules()],
)
def test_no_lower_module_imports_the_daemon(folder: str, path: Path) -> None:
    module = module_name(path, folder)
    found = upward_imports(path.read_text(), module, is_package=path.name == "__init__.py")
    assert not found, f"{path.relative_to(ROOT)} imports the daemon layer: {found}"


@pytest.mark.parametrize(
    "line",
    [
        "import agentd.daemon",
        "import agentd.daemon.keys as keys",
        "from agentd.daemon.log import get_logger",
        "from agentd import daemon",
        "from ..daemon import keys",
        "from .. import daemon",
        "from ..daemon.keys import client_curve",
        "importlib.import_module('agentd.daemon.spec')",
    ],
)
def test_the_check_sees_every_spelling(line: str) -> None:
    found = upward_imports(f"def f():\n    {line}\n", "agentd.bus.client")
    assert found, line
    assert all(hit.startswith("2: agentd.daemon") for hit in found), found


@pytest.mark.parametrize(
    "line",
    [
        "from .keys import client_curve",
        "from agentd.bus.log import get_logger",
        "import agentd.daemonic",
        "x = 'agentd.daemon'  # a string, not an import",
        "from . import daemon_names",
    ],
)
def test_the_check_passes_what_is_not_the_daemon(line: str) -> None:
    assert upward_imports(line + "\n", "agentd.bus.client") == []
