"""Every device decision lives in the platform: the engine's generic modules name no
device and call no CUDA API; they use what the platform hands over."""

import ast
from pathlib import Path

import pytest
import torch

from microvllm.platform import PLATFORMS, platform_for
from microvllm.platform.base import AUTO_ATTENTION_BACKENDS

ENGINE = Path(__file__).resolve().parent.parent / "microvllm" / "engine"
DEVICE_NAMES = set(PLATFORMS)


def device_branches(path: Path) -> list[str]:
    """`torch.cuda` uses, `.type` comparisons and device names as strings in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "cuda" and ast.unparse(node.value) == "torch":
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Compare) and any(isinstance(side, ast.Attribute) and side.attr == "type"
                                                   for side in [node.left, *node.comparators]):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and node.value in DEVICE_NAMES:
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


@pytest.mark.parametrize("path", sorted(ENGINE.glob("*.py")), ids=lambda p: p.name)
def test_engine_module_does_not_branch_on_the_device(path):
    assert not device_branches(path), f"{path.name} decides by device: {device_branches(path)}"


def test_every_platform_has_its_auto_attention_backends():
    assert set(AUTO_ATTENTION_BACKENDS) == set(PLATFORMS)
    for name, platform in PLATFORMS.items():
        assert platform.name == name
        assert AUTO_ATTENTION_BACKENDS[name][-1] == "sdpa"  # the one that runs everywhere


def test_auto_on_the_cpu_takes_the_first_backend_that_runs(monkeypatch):
    platform = platform_for(torch.device("cpu"))
    monkeypatch.setattr(type(platform), "cannot_run",
                        lambda self, name, dtype: None if name == "sdpa" else "not here")
    assert platform.attention_backend("auto", torch.float32).name == "sdpa"
