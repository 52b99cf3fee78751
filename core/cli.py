"""``key=value`` command lines, as the paper-reproduction commands use them.

``python -m experiments.run table=5 scale=demo`` and
``python -m core.train gin_file=gin/demo.gin UViT.num_transformer_blocks=2 workdir=/tmp/run``
share this parser: each command declares its options (name, default, help); arguments whose key
contains a dot or a slash are gin bindings and are passed through untouched. ``--help`` prints
every option with its help text. Unknown options are a :class:`core.errors.UserError` that lists
the valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
from typing import Any, Callable, Sequence

from core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Option:
  """One ``name=value`` option of a command."""
  name: str
  default: Any
  help: str
  parse: Callable[[str], Any] = str
  choices: Sequence[str] | None = None
  repeated: bool = False  # may be given several times (values collected in a list)


def parse_bool(s: str) -> bool:
  """Parses true/false/1/0/yes/no."""
  v = s.strip().lower()
  if v in ("1", "true", "yes", "on"):
    return True
  if v in ("0", "false", "no", "off"):
    return False
  raise ValueError(f"expected true or false, got {s!r}")


def parse_floats(s: str) -> list[float]:
  """Parses a comma-separated list of numbers, e.g. ``1.0,1.05,1.1``."""
  return [float(x) for x in s.split(",") if x.strip()]


def is_gin_binding(arg: str) -> bool:
  key = arg.split("=", 1)[0]
  return "=" in arg and ("." in key or "/" in key)


def format_help(prog: str, description: str, options: Sequence[Option]) -> str:
  lines = [f"usage: python -m {prog} [name=value ...] [Gin.binding=value ...]", "",
           description.strip(), "",
           "options:"]
  for o in options:
    default = "" if o.default is None else f" (default: {o.default})"
    choices = f" one of {', '.join(o.choices)}." if o.choices else ""
    lines.append(f"  {o.name}=...{default}")
    lines.append(f"      {o.help}{choices}")
  lines.append("")
  lines.append("Any argument whose name contains a dot (e.g. UViT.num_transformer_blocks=2) is a "
               "gin binding.")
  return "\n".join(lines)


def parse(argv: Sequence[str], options: Sequence[Option], *, prog: str, description: str
          ) -> tuple[dict[str, Any], list[str]]:
  """Returns ({option: value}, [gin bindings]); prints help and exits on -h/--help."""
  by_name = {o.name: o for o in options}
  values: dict[str, Any] = {o.name: ([] if o.repeated else o.default) for o in options}
  bindings: list[str] = []
  for arg in argv:
    if arg in ("-h", "--help", "help"):
      print(format_help(prog, description, options))
      sys.exit(0)
    if is_gin_binding(arg):
      bindings.append(arg)
      continue
    if "=" not in arg:
      raise UserError(f"argument {arg!r} is not of the form name=value; valid names: "
                      f"{', '.join(by_name)} (see --help)")
    name, raw = arg.split("=", 1)
    name = name.lstrip("-")
    if name not in by_name:
      close = difflib.get_close_matches(name, list(by_name), n=1)
      hint = f" (did you mean {close[0]}?)" if close else ""
      raise UserError(f"unknown option {name!r}{hint}; valid options: {', '.join(by_name)}")
    o = by_name[name]
    try:
      v = o.parse(raw)
    except ValueError as e:
      raise UserError(f"bad value for {name}: {e}") from None
    if o.choices is not None and v not in o.choices:
      raise UserError(f"{name}={raw} is not valid; choose one of: {', '.join(o.choices)}")
    if o.repeated:
      values[name].append(v)
    else:
      values[name] = v
  return values, bindings
