"""Optional dependencies (setup.py's extras), imported with an error that says how to get them."""

import importlib


def import_hf(name: str):
    """An optional package of the `hf` extra, or an ImportError that says how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f"loading Hugging Face hub ids and the transformers format needs {name}: "
                          'pip install -e ".[hf]"') from None


def import_xgrammar():
    """xgrammar (the `structured` extra), or an ImportError that says how to get it."""
    try:
        return importlib.import_module("xgrammar")
    except ImportError:
        raise ImportError("structured outputs need xgrammar: "
                          'pip install -e ".[structured]"') from None
