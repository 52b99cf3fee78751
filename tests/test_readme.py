"""The README and docs/choices.md as a newcomer meets them, checked against the code.

Every command in the README's code blocks is run the cheapest way that still proves it: a
``make`` target must exist in the Makefile; a ``python -m`` command must accept each of its
options and values (its own parser runs on them, then ``--help`` ends it before any work); an
``experiments.run`` command that asks for a plan or a dry run is run for real. Every heading is
reachable from the table of contents, every linked file exists, and every test that
docs/choices.md cites to pin a choice exists.
"""
from __future__ import annotations

import ast
import importlib
import os
import re
import shlex

import pytest

from experiments import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def _code_blocks(text: str) -> list[str]:
  return re.findall(r"^```(?:bash)?\n(.*?)^```", text, flags=re.S | re.M)


def _commands(block: str) -> list[str]:
  """Shell commands of a block: continuation lines joined, comments dropped."""
  out, current = [], ""
  for line in block.splitlines():
    line = re.sub(r"\s+#.*$", "", line).rstrip()
    if line.startswith("#") or not line.strip():
      continue
    if line.endswith("\\"):
      current += line[:-1] + " "
      continue
    out.append((current + line).strip())
    current = ""
  return out


COMMANDS = [c for b in _code_blocks(README) for c in _commands(b)]
PYTHON = [c for c in COMMANDS if c.startswith("python -m ")]


def test_the_readme_opens_with_the_two_commands():
  first = _commands(_code_blocks(README)[0])
  assert first == ["make demo", "make test"]
  assert README.index("```") < README.index("\n## ")  # before any section


def test_every_make_target_exists():
  makefile = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
  targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, flags=re.M))
  used = [shlex.split(c)[1] for c in COMMANDS if c.startswith("make ")]
  assert used and set(used) <= targets, set(used) - targets


def _main(module: str):
  mod = importlib.import_module(module)
  if not hasattr(mod, "main"):
    mod = importlib.import_module(module + ".__main__")
  return mod.main


@pytest.mark.parametrize("command", PYTHON)
def test_every_python_command_parses(command, capsys):
  """The command's own parser accepts every option and value (an unknown name or bad value is a
  UserError), then --help stops it before it does anything."""
  argv = shlex.split(os.path.expanduser(command))
  with pytest.raises(SystemExit) as e:
    _main(argv[2])(argv[3:] + ["--help"])
  assert e.value.code in (0, None)
  assert "valid" not in capsys.readouterr().err


DRY = [c for c in PYTHON if c.startswith("python -m experiments.run")
       and ("dry_run=true" in c or "mode=plan" in c)]


@pytest.mark.parametrize("command", DRY)
def test_plans_and_dry_runs_of_the_readme_run(command, capsys):
  """Dry runs print what would be launched (sbatch scripts, SkyPilot task YAML); plans print jobs,
  memory and cost: on this CPU, with no data, no cluster and no cloud account."""
  argv = shlex.split(os.path.expanduser(command))[3:]
  assert run_lib.main(argv) == 0
  out = capsys.readouterr().out
  assert out.strip()
  if "launcher=slurm" in command:
    assert "#SBATCH" in out
  if "launcher=tpu" in command and "dry_run=true" in command:
    assert "accelerators" in out


def _anchor(heading: str) -> str:
  return re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")


def test_every_section_is_in_the_contents():
  headings = re.findall(r"^## (.+)$", README, flags=re.M)
  contents = README[README.index("**Contents.**"):].split("\n\n")[0]
  linked = re.findall(r"\]\(#([^)]+)\)", contents)
  assert linked == [_anchor(h) for h in headings]


@pytest.mark.parametrize("doc", ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")))
def test_every_linked_file_exists(doc):
  text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
  for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
    if "://" in target:
      continue
    path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target))
    assert os.path.exists(path), f"{doc} links {target}"


def _test_names(path: str) -> set[str]:
  tree = ast.parse(open(path, encoding="utf-8").read())
  return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_every_test_cited_by_the_choices_table_exists():
  """A choice is pinned by a test: each `tests/x.py::name` (and each following `::name`, which
  means the same file) names a test that exists."""
  text = open(os.path.join(ROOT, "docs", "choices.md"), encoding="utf-8").read()
  cited = 0
  for cell in re.findall(r"^\|.*\|\s*(.+?)\s*\|\s*$", text, flags=re.M):
    current = None
    for file, name in re.findall(r"`(tests/[\w/]+\.py)?(?:::(\w+))?", cell):
      if file:
        current = file
        assert os.path.exists(os.path.join(ROOT, file)), file
      if name:
        assert current, f"::{name} without a file before it"
        assert name in _test_names(os.path.join(ROOT, current)), f"{current}::{name}"
        cited += 1
  assert cited > 30
