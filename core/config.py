"""Gin configuration: parse files and command-line bindings with one-line errors.

Every command takes ``gin_file=...`` (repeatable) plus bindings like
``UViT.num_transformer_blocks=2``. Parsing happens before anything is compiled, and gin's errors
(unknown configurable, unknown parameter, syntax) become a :class:`core.errors.UserError` that
names the binding and the fix. After a run has built everything, :func:`operative_config` is the
text written next to it as ``config.gin`` (the t5x convention: the exact values a run used).
"""
from __future__ import annotations

import difflib
import importlib
import os
import re
from typing import Sequence

import gin

from core.errors import UserError

# Modules whose configurables gin files may name. Imported before parsing so every name resolves.
CONFIGURABLE_MODULES = (
    "core.schedules", "core.diffusion", "core.sampling", "core.sharding", "core.models",
    "core.trainer",
)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_REGISTERED = []


def register_configurables() -> None:
  """Imports every module with configurables; also makes ``@schedule_range()`` usable in gin files
  (the U-ViT's 'linear' logSNR embedding spans the shifted schedule's range, appendix A)."""
  for name in CONFIGURABLE_MODULES:
    importlib.import_module(name)
  if not _REGISTERED:
    from core import schedules  # pylint: disable=import-outside-toplevel
    gin.external_configurable(schedules.schedule_range, "schedule_range", denylist=["schedule", "num"])
    _REGISTERED.append(True)


def resolve_gin_file(path: str) -> str:
  """Finds a gin file as given, relative to the repository, or under ``gin/``."""
  candidates = [path, os.path.join(REPO_ROOT, path), os.path.join(REPO_ROOT, "gin", path)]
  candidates += [c + ".gin" for c in candidates if not c.endswith(".gin")]
  for c in candidates:
    if os.path.isfile(c):
      return c
  available = sorted(os.path.relpath(os.path.join(d, f), REPO_ROOT)
                     for d, _, fs in os.walk(os.path.join(REPO_ROOT, "gin")) for f in fs if f.endswith(".gin"))
  close = difflib.get_close_matches(path, available, n=3, cutoff=0.4)
  hint = f"; did you mean {', '.join(close)}?" if close else f"; gin files live under gin/ ({len(available)} files)"
  raise UserError(f"gin file {path!r} not found{hint}")


def _registry_items():
  return list(gin.config._REGISTRY.items())  # pylint: disable=protected-access


def _known_configurables() -> list[str]:
  return sorted({selector.split(".")[-1] for selector, _ in _registry_items()})


def _explain(err: Exception, bindings: Sequence[str]) -> str:
  msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  if "No configurable matching" in msg:
    name = msg.split("'")[1] if "'" in msg else ""
    close = difflib.get_close_matches(name.split(".")[-1], _known_configurables(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown gin configurable {name!r}{hint}; known: {', '.join(_known_configurables())}"
  m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", msg)
  if m:
    cfg, param = m.group(1), m.group(2)
    try:
      params = [p for p in _signature_params(cfg)]
    except Exception:  # pylint: disable=broad-except
      params = []
    close = difflib.get_close_matches(param, params, n=2)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"gin configurable {cfg!r} has no parameter {param!r}{hint}; valid: {', '.join(params) or '?'}"
  return f"bad gin configuration: {msg}"


def _signature_params(configurable: str) -> list[str]:
  import inspect
  for selector, info in _registry_items():
    if selector.split(".")[-1] == configurable.split(".")[-1]:
      fn = info.wrapped
      target = fn.__init__ if isinstance(fn, type) else fn
      if isinstance(fn, type) and hasattr(fn, "__dataclass_fields__"):
        return list(fn.__dataclass_fields__)
      return [p for p in inspect.signature(target).parameters if p not in ("self", "args", "kwargs")]
  return []


def parse(gin_files: Sequence[str], bindings: Sequence[str], *, clear: bool = True) -> None:
  """Parses gin files then bindings (later ones win); raises UserError on any mistake."""
  register_configurables()
  if clear:
    gin.clear_config()
  files = [resolve_gin_file(f) for f in gin_files]
  for b in bindings:
    if "=" not in b:
      raise UserError(f"gin binding {b!r} must look like Configurable.parameter=value")
  try:
    gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False,
                                        skip_unknown=False)
  except (ValueError, SyntaxError, TypeError, KeyError, gin.config_parser.ParseError if hasattr(gin.config_parser, "ParseError") else ValueError) as e:  # noqa: E501
    raise UserError(_explain(e, bindings)) from None
  except IOError as e:
    raise UserError(f"cannot read gin file: {e}") from None


def query(name: str, default=None):
  """The bound value of ``Configurable.param`` or ``default`` when unbound."""
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


def operative_config() -> str:
  """The values the run actually used (gin's operative config), for ``config.gin``."""
  return gin.operative_config_str()

