"""Gin configuration: parse files and command-line bindings with one-line errors.

Every command takes ``gin_file=...`` (repeatable) plus bindings like
``UViT.num_transformer_blocks=2``. Parsing happens before anything is compiled, and gin's errors
(unknown configurable, unknown parameter, syntax) become a :class:`core.errors.UserError` that
names the binding and the fix; so does a value of the wrong type (``Train.learning_rate='fast'``,
``Train.batch_size='8'``), checked against the configurable's type annotations. After a run has
built everything, :func:`operative_config` is the
text written next to it as ``config.gin`` (the t5x convention: the exact values a run used).
"""
from __future__ import annotations

import ast
import collections.abc
import contextlib
import difflib
import importlib
import inspect
import os
import re
import tokenize
import types
import typing
from typing import Any, Iterator, Sequence

import gin

from core import schedules
from core.errors import UserError, first_line

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
    gin.external_configurable(schedules.schedule_range, "schedule_range",
                              denylist=["schedule", "num"])
    _REGISTERED.append(True)


@contextlib.contextmanager
def scratch() -> Iterator[None]:
  """A scope for parsing and querying a configuration that leaves no gin state behind (gin's
  configuration is global): cleared on entry and on exit."""
  register_configurables()
  gin.clear_config()
  try:
    yield
  finally:
    gin.clear_config()


def parse_text(text: str, what: str) -> None:
  """Replaces gin's configuration with ``text`` (a run's config.gin); one-line error if broken."""
  register_configurables()
  gin.clear_config()
  try:
    gin.parse_config(text)
  except (ValueError, SyntaxError) as e:
    raise UserError(f"cannot parse {what}: {first_line(e)}") from None


def resolve_gin_file(path: str) -> str:
  """Finds a gin file as given, relative to the repository, or under ``gin/``."""
  candidates = [path, os.path.join(REPO_ROOT, path), os.path.join(REPO_ROOT, "gin", path)]
  candidates += [c + ".gin" for c in candidates if not c.endswith(".gin")]
  for c in candidates:
    if os.path.isfile(c):
      return c
  available = sorted(os.path.relpath(os.path.join(d, f), REPO_ROOT)
                     for d, _,
                     fs in os.walk(os.path.join(REPO_ROOT,
                                                "gin")) for f in fs if f.endswith(".gin"))
  close = difflib.get_close_matches(path, available, n=3, cutoff=0.4)
  hint = (f"; did you mean {', '.join(close)}?" if close
          else f"; gin files live under gin/ ({len(available)} files)")
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
    return (f"gin configurable {cfg!r} has no parameter {param!r}{hint}; valid: "
            f"{', '.join(params) or '?'}")
  return f"bad gin configuration: {msg}"


def _signature_params(configurable: str) -> list[str]:
  for selector, info in _registry_items():
    if selector.split(".")[-1] == configurable.split(".")[-1]:
      fn = info.wrapped
      target = fn.__init__ if isinstance(fn, type) else fn
      if isinstance(fn, type) and hasattr(fn, "__dataclass_fields__"):
        return list(fn.__dataclass_fields__)
      return [p for p in inspect.signature(target).parameters if p not in ("self", "args",
                                                                           "kwargs")]
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
  errors = (ValueError, SyntaxError, TypeError, KeyError, tokenize.TokenError)
  for f in files:
    try:
      gin.parse_config_file(f, skip_unknown=False)
    except errors as e:
      raise UserError(f"{os.path.relpath(f, REPO_ROOT)}: {_explain(e, bindings)}") from None
    except IOError as e:
      raise UserError(f"cannot read gin file: {e}") from None
  for b in bindings:
    try:
      gin.parse_config(b, skip_unknown=False)
    except errors as e:
      raise UserError(f"gin binding {b!r}: {_explain_binding(e, b)}") from None
  check_types()


def _explain_binding(err: Exception, binding: str) -> str:
  """Why one command-line binding does not parse."""
  value = binding.split("=", 1)[1].strip()
  if isinstance(err, tokenize.TokenError) or value.count("[") != value.count("]") or (
      value.count("(") != value.count(")")):
    return "unbalanced brackets or quotes in the value; e.g. UNet.num_res_blocks=[2,2]"
  if isinstance(err, SyntaxError) and "Failed to parse token" in str(err):
    return (f"{value} is not a value gin reads (a number, a list like [2,2], true/false, or "
            f"quoted text like '{value}')")
  return _explain(err, [binding])


def _type_name(hint: Any) -> str:
  return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _conforms(value: Any, hint: Any) -> bool:
  """Whether a bound ``value`` fits the annotation ``hint`` (True where the hint is not simple)."""
  if hint is Any or type(value).__module__.startswith("gin"):  # references, macros
    return True
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    return any(_conforms(value, a) for a in args)
  if hint is type(None):
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is str:
    return isinstance(value, str)
  if origin in (list, tuple, typing.Sequence, collections.abc.Sequence):
    if not isinstance(value, (list, tuple)):
      return False
    inner = [a for a in args if a is not Ellipsis]
    return len(inner) != 1 or all(_conforms(v, inner[0]) for v in value)
  return True


def _hints(fn: Any) -> dict[str, Any]:
  try:
    return typing.get_type_hints(fn.__init__ if isinstance(fn, type) and not hasattr(
        fn, "__dataclass_fields__") else fn)
  except Exception:  # pylint: disable=broad-except  (unresolvable annotations: nothing to check)
    return {}


def check_types() -> None:
  """Every bound parameter must fit its annotation: ``Train.batch_size='8'`` is refused here."""
  for (_, selector), params in list(gin.config._CONFIG.items()):  # pylint: disable=protected-access
    try:
      fn = gin.config._REGISTRY[selector].wrapped  # pylint: disable=protected-access
    except KeyError:
      continue
    hints = _hints(fn)
    for param, value in params.items():
      if param in hints and not _conforms(value, hints[param]):
        name = f"{selector.split('.')[-1]}.{param}"
        fix = ""
        if isinstance(value, str):
          try:
            bare = ast.literal_eval(value)
            if _conforms(bare, hints[param]):
              fix = f"; drop the quotes: {name}={value}"
          except (ValueError, SyntaxError):
            pass
        raise UserError(f"{name}={value!r} must be {_type_name(hints[param])}, not "
                        f"{type(value).__name__}{fix}")


def query(name: str, default=None):
  """The bound value of ``Configurable.param`` or ``default`` when unbound."""
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


def operative_config() -> str:
  """The values the run actually used (gin's operative config), for ``config.gin``."""
  return gin.operative_config_str()

