"""Optional dependencies (setup.py's extras), imported with an error that says how to get them."""

import importlib


def import_hf(name: str):
    """An optional package of the `hf` extra, or an ImportError that says how to get it."""
    return _import_extra(name, "hf", f"loading Hugging Face hub ids and the transformers format needs {name}")


def import_xgrammar():
    """xgrammar (the `structured` extra), or an ImportError that says how to get it."""
    return _import_extra("xgrammar", "structured", "structured outputs need xgrammar")


def import_serve(name: str):
    """An optional package of the `serve` extra (fastapi, uvicorn), or an ImportError that says how to get it."""
    return _import_extra(name, "serve", f"the OpenAI-compatible server needs {name}")


def _import_extra(name: str, extra: str, need: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f'{need}: pip install -e ".[{extra}]"') from None
