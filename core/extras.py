"""Optional dependencies: which extra of pyproject.toml provides each, and a one-line error.

Training and sampling need JAX alone. The evaluator runs Inception in PyTorch and ONNX Runtime
(extra ``eval``); text-to-image runs T5 and CLIP through transformers (extra ``t2i``). A module
imports such a package where it uses it, through :func:`require`, so that a missing one stops
the command with one ``error:`` line naming the extra to install (docs/install.md), not a
traceback.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from core.errors import UserError, first_line

# The pip extra that provides each optional top-level module (pyproject.toml).
EXTRA_OF = {
    "torch": "eval",
    "onnx": "eval",
    "onnxruntime": "eval",
    "transformers": "t2i",
    "tokenizers": "t2i",
    "sentencepiece": "t2i",
    "huggingface_hub": "t2i",
}


def require(module: str, what: str, extra: str | None = None) -> ModuleType:
  """Imports ``module``; when that fails, a :class:`UserError` saying that ``what`` needs it and
  which extra installs it."""
  extra = extra or EXTRA_OF[module.split(".", 1)[0]]
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise UserError(
        f"{what} needs the {module.split('.', 1)[0]} package ({first_line(e)}): install the "
        f"'{extra}' extra, pip install -e '.[{extra}]', or run make setup "
        f"(docs/install.md)") from None
