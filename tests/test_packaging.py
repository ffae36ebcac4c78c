"""What setup.py's extras install is enough for the commands the README gives with them."""

import ast
import re
import sys
from pathlib import Path

import setuptools

REPO = Path(__file__).resolve().parent.parent


def setup_arguments(monkeypatch) -> dict:
    given = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: given.update(kwargs))
    monkeypatch.chdir(REPO)  # setup.py reads README.md
    exec(compile((REPO / "setup.py").read_text(), "setup.py", "exec"), {"__name__": "__main__"})
    return given


def distribution_modules(requirements: list[str]) -> set[str]:
    """The import names of requirements such as "uvicorn[standard]" or "ray[data]>=2.40,<3"."""
    return {re.match(r"[\w-]+", r).group().replace("-", "_").lower() for r in requirements}


def source_of(module: str) -> Path | None:
    """The file of a module of this repository, or None."""
    path = REPO.joinpath(*module.split("."))
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def required_imports(module: str) -> set[str]:
    """Top-level names of the packages a benchmarks module imports, wherever in it, and those
    the benchmarks modules it imports need, leaving out what it imports only if it can
    (under `except ImportError`), the standard library, microvllm and benchmarks."""
    tree = ast.parse(source_of(module).read_text())
    optional = {id(node) for handler in ast.walk(tree) if isinstance(handler, ast.Try)
                if any(isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in handler.handlers)
                for stmt in handler.body for node in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            # `from benchmarks import local_server` imports the module benchmarks.local_server
            names |= {f"{node.module}.{a.name}" if source_of(f"{node.module}.{a.name}") else node.module
                      for a in node.names}
    needed = set()
    for name in names:
        top = name.split(".")[0]
        if top == "benchmarks":
            needed |= required_imports(name)
        elif top not in sys.stdlib_module_names and top != "microvllm":
            needed.add(top)
    return needed


def test_the_serve_extra_brings_what_the_load_benchmark_imports(monkeypatch):
    arguments = setup_arguments(monkeypatch)
    installed = distribution_modules(arguments["install_requires"] + arguments["extras_require"]["serve"])
    assert "python -m benchmarks.serve_load" in (REPO / "README.md").read_text()
    assert required_imports("benchmarks.serve_load") <= installed
