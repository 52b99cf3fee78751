"""Helpers of the fault tests (issue 12): run a CLI as a user would and check that it ends in
one ``error:`` line with exit status 2 and loses nothing already written; make a directory
read-only even for root (which ignores permission bits)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys

import pytest

from core.errors import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([*(wrap or []), sys.executable, "-m", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def run_in_process(capsys, main, *args: str) -> subprocess.CompletedProcess:
  """A CLI's main through run_main in this process (the code path of ``python -m``, without the
  interpreter start-up: importing grain costs seconds per subprocess on a small CPU)."""
  with pytest.raises(SystemExit) as e:
    run_main(main, list(args))
  cap = capsys.readouterr()
  return subprocess.CompletedProcess(args, e.value.code, cap.out, cap.err)


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
  err = proc.stderr.strip()
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "\n" not in err and err.startswith("error: "), err[-3000:]
  assert "Traceback" not in proc.stdout + proc.stderr
  for n in needles:
    assert n in err, (n, err)
  return err


def snapshot(root) -> dict[str, bytes]:
  """Every file under root (relative path -> bytes): what must survive a failed command."""
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


@contextlib.contextmanager
def read_only(path):
  """Makes ``path`` read-only for a CLI run inside the block; yields the argv prefix to run it
  with. As root (which ignores permissions) the run gets a read-only bind mount of ``path`` in a
  private mount namespace (``unshare -m``); elsewhere a plain chmod."""
  path = str(path)
  if os.geteuid() != 0:
    mode = os.stat(path).st_mode
    os.chmod(path, 0o555)
    try:
      yield []
    finally:
      os.chmod(path, mode)
    return
  wrap = ["unshare", "-m", "sh", "-c",
          'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', path]
  probe = None
  if shutil.which("unshare"):
    probe = subprocess.run([*wrap, "sh", "-c", 'touch "$1/.probe" 2>/dev/null && echo writable || '
                            'echo read-only', "sh", path], capture_output=True, text=True)
  if probe is None or probe.stdout.strip() != "read-only":
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(path, ".probe"))
    pytest.skip("running as root without a way to make a read-only directory (unshare -m)")
  yield wrap
