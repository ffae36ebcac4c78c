"""The package imports only downward: the server, then the facade, then the engine, then the platform and
its CPU code, then the model, then what everything shares; and no module imports itself
back through others. Imports inside functions count too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "microvllm"
# lower layers first; a module may import its own layer and the layers before it
LAYERS = [
    ("shared", ["arithmetic", "outputs", "sampling_params", "validation", "unsupported", "extras", "tokenizer",
                "tokenizer_json", "tools", "structured"]),
    ("model", ["model"]),
    ("cpu", ["cpu"]),
    ("platform", ["platform"]),
    ("engine", ["engine", "speculative"]),
    ("scale-out", ["distributed"]),
    ("facade", ["llm", "prompts", "inputs", "ray_data", "nanochat", "core_eval", "convert", "__init__"]),
    ("server", ["serve"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports_of(path: Path) -> set[str]:
    """The microvllm modules `path` imports, wherever in it."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "microvllm"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "microvllm":
                continue
            for alias in node.names:  # `from pkg import module` imports the module
                found.add(f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
    return found - {here}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for rank, (_, tops) in enumerate(LAYERS):
        if top in tops:
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_only_downward(module):
    upward = [m for m in GRAPH[module] if layer_of(m) > layer_of(module)]
    assert not upward, f"{module} ({LAYERS[layer_of(module)][0]}) imports a higher layer: {upward}"


def test_no_import_cycles():
    done, active = set(), []

    def visit(module):
        if module in active:
            raise AssertionError("import cycle: " + " -> ".join(active[active.index(module):] + [module]))
        if module in done:
            return
        active.append(module)
        for dependency in GRAPH.get(module, ()):
            visit(dependency)
        active.pop()
        done.add(module)

    for module in GRAPH:
        visit(module)
