"""Installing for the accelerator at hand (docs/install.md): pyproject's extras resolve, and the
core runs without them.

``.[cuda12]`` and ``.[tpu]`` must resolve against PyPI beside the other extras (pip's own
resolver, dry run) without replacing the CPU build of torch that scripts/setup.sh installs; the
environment set up by scripts/setup.sh already satisfies ``.[dev,eval,t2i]``. Training, sampling
and the tables import without torch, ONNX or transformers, and a missing extra is one ``error:``
line naming it.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import tomllib
import urllib.request

import pytest

from core import extras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPI = "https://pypi.org/simple/pip/"


def _pypi_reachable() -> bool:
  try:
    urllib.request.urlopen(PYPI, timeout=15).close()
    return True
  except OSError:
    return False


def _dry_run(extras_list: str, report: str) -> subprocess.Popen:
  """pip's resolver on the project with these extras, in this environment, installing nothing.
  fast-deps reads each wheel's metadata by HTTP range requests, not the multi-GB CUDA wheels
  (PyPI mirrors without PEP 658 metadata would otherwise send them whole)."""
  return subprocess.Popen(
      [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--use-feature=fast-deps",
       "--report", report, f"{ROOT}[{extras_list}]"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_accelerator_extras_resolve_against_pypi(tmp_path):
  if not _pypi_reachable():
    pytest.skip(f"PyPI is unreachable ({PYPI}): the extras cannot be resolved here")
  cases = {"cpu": "dev,eval,t2i", "cuda12": "cuda12,dev,eval,t2i", "tpu": "tpu,dev,eval,t2i"}
  procs = {k: _dry_run(v, str(tmp_path / f"{k}.json")) for k, v in cases.items()}
  installs = {}
  for k, p in procs.items():
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, f".[{cases[k]}] does not resolve:\n{err[-3000:]}"
    report = json.loads((tmp_path / f"{k}.json").read_text())
    installs[k] = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                   for i in report["install"]}
  # setup.sh installed every CPU extra: nothing but the project itself is left to install.
  assert set(installs["cpu"]) == {"simple-diffusion-harness"}, installs["cpu"]
  jax_version = md.version("jax")
  # The CUDA plugin at the installed jax's version; libtpu for TPU VMs.
  assert installs["cuda12"].get("jax-cuda12-plugin") == jax_version, installs["cuda12"]
  assert "libtpu" in installs["tpu"], installs["tpu"]
  for k, names in installs.items():
    # The CPU torch stays; nothing drags in torchvision (which would replace it).
    assert not {"torch", "torchvision", "jax", "jaxlib"} & set(names), (k, names)


BLOCKED = ["torch", "onnx", "onnxruntime", "transformers", "tokenizers", "sentencepiece",
           "huggingface_hub"]
PROBE = """
import json, sys
sys.modules.update(dict.fromkeys({blocked!r}))   # as if the eval and t2i extras were missing
import core.train, eval.worker, eval.reference, experiments.run, tables.render
from core.errors import UserError
from core.data import text_encoder
from eval import clip_score, inception
errors = []
for make in (inception.FeatureExtractor, lambda: clip_score.ClipScore("x"),
             lambda: text_encoder.TextEncoder("x"),
             lambda: text_encoder.build_random_t5("x", ["a"])):
  try:
    make()
  except UserError as e:
    errors.append(str(e))
print(json.dumps(errors))
"""


def test_the_core_imports_without_extras_and_a_missing_one_is_named():
  p = subprocess.run([sys.executable, "-c", PROBE.format(blocked=BLOCKED)], cwd=ROOT,
                     capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, PYTHONPATH=ROOT))
  assert p.returncode == 0, p.stderr[-3000:]
  errors = json.loads(p.stdout.strip().splitlines()[-1])
  assert len(errors) == 4, errors
  inception_error, clip_error, *t5_errors = errors
  assert inception_error.startswith("the Inception network (FID, IS) needs the torch package")
  assert "pip install -e '.[eval]'" in inception_error
  assert clip_error.startswith("the CLIP score needs the torch package")
  for e in (clip_error, *t5_errors):
    assert "pip install -e '.[t2i]'" in e, e
  assert all("\n" not in e for e in errors)


def test_every_optional_module_names_an_extra_of_pyproject():
  """core/extras.py names only extras that pyproject.toml declares."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    declared = set(tomllib.load(f)["project"]["optional-dependencies"])
  assert set(extras.EXTRA_OF.values()) <= declared, declared


def test_an_unknown_accelerator_is_one_line_before_anything_is_installed(tmp_path):
  venv = tmp_path / "venv"
  p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "setup.sh"), str(venv)], cwd=ROOT,
                     env=dict(os.environ, ACCEL="cuda11"), capture_output=True, text=True,
                     timeout=60)
  assert p.returncode == 2 and p.stderr.strip().splitlines() == [
      "error: ACCEL=cuda11 is not one of cpu, cuda12, tpu (docs/install.md)"], p.stderr
  assert not venv.exists()
