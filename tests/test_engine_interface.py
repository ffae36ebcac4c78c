"""One declared engine interface: one engine and a replica pool implement it, and its
drivers (the facade, beam search, the server, the nanochat adapter) reach the engine
through it only, asking for capabilities instead of testing types; no module calls
another object's private names."""

import ast
from pathlib import Path

import pytest

from microvllm import LLM
from microvllm.engine.forks import SequenceForks
from microvllm.engine.interface import Engine, Forks
from microvllm.engine.llm_engine import LLMEngine

PACKAGE = Path(__file__).resolve().parent.parent / "microvllm"
DRIVERS = ["llm.py", "nanochat.py", "engine/beam_search.py", "serve/async_engine.py", "serve/engine_process.py"]


def test_one_engine_implements_the_whole_interface():
    assert issubclass(LLMEngine, Engine) and not LLMEngine.__abstractmethods__
    assert issubclass(SequenceForks, Forks) and not SequenceForks.__abstractmethods__


def test_the_replica_pool_implements_the_whole_interface():
    pool = pytest.importorskip("microvllm.distributed.pool")
    assert issubclass(pool.ReplicaPool, Engine) and not pool.ReplicaPool.__abstractmethods__
    assert pool.ReplicaPool.forks is None and pool.ReplicaPool.streams is False


def test_one_engine_streams_and_forks(checkpoint_dir):
    llm = LLM(checkpoint_dir)
    assert llm.engine.streams and isinstance(llm.engine.forks, Forks)


@pytest.mark.parametrize("driver", DRIVERS)
def test_drivers_test_no_engine_type(driver):
    tree = ast.parse((PACKAGE / driver).read_text())
    type_tests = [ast.unparse(node) for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance"
                  and any(word in ast.unparse(node.args[1]) for word in ("Engine", "Pool"))]
    assert not type_tests, f"{driver} tests the engine's type: {type_tests}"


def private_names_defined(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


TREES = {p: ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}
PRIVATE = set().union(*map(private_names_defined, TREES.values()))


def private_uses(tree: ast.Module) -> list[str]:
    """The package's private names reached through another object than self, cls or a
    class of the module, or imported from another module."""
    own_classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    used = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in PRIVATE
                and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls", *own_classes})):
            used.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom):
            used += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name in PRIVATE]
    return used


@pytest.mark.parametrize("path", sorted(TREES), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_object_is_reached_into_for_private_names(path):
    assert not private_uses(TREES[path]), f"{path.name} uses others' private names: {private_uses(TREES[path])}"
