"""The local launcher's parallel training (experiments.launchers.ProcessPool), with real processes."""
from __future__ import annotations

import json
import sys
import time

import pytest

from core.errors import UserError
from experiments.launchers import ProcessPool

# A child that records when it ran, says hello and exits with the given status.
CHILD = """
import json, sys, time
start = time.time(); print("hello from", sys.argv[1], flush=True); time.sleep(float(sys.argv[3]))
json.dump([start, time.time()], open(sys.argv[2], "w")); sys.exit(int(sys.argv[4]))
"""


def _child(tmp_path, name, seconds=1.0, status=0):
  return [sys.executable, "-c", CHILD, name, str(tmp_path / f"{name}.json"), str(seconds),
          str(status)]


def test_at_most_n_at_once_all_run_and_their_output_is_named(tmp_path, capsys):
  pool = ProcessPool(2)
  for name in ("a", "b", "c", "d"):   # 2 s each: two started together overlap despite slow starts
    pool.submit(name, _child(tmp_path, name, 2.0))
  pool.finish()
  spans = {n: json.load(open(tmp_path / f"{n}.json")) for n in "abcd"}
  events = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()],
                  key=lambda x: (x[0], x[1]))
  running, most = 0, 0
  for _, d in events:
    running += d
    most = max(most, running)
  assert most == 2   # two at once, never three
  out = capsys.readouterr().out
  for n in "abcd":
    assert f"[{n}] hello from {n}" in out


def test_a_failed_training_fails_at_the_end_naming_it(tmp_path):
  pool = ProcessPool(2)
  pool.submit("bad", _child(tmp_path, "bad", 0.1, status=3))
  pool.submit("good", _child(tmp_path, "good", 1.0))
  pool.submit("later", _child(tmp_path, "later", 0.1))
  with pytest.raises(UserError, match=r"training failed: bad \(exit status 3\)"):
    pool.finish()
  assert (tmp_path / "good.json").exists() and (tmp_path / "later.json").exists()


def test_stop_ends_running_children_and_drops_the_queue(tmp_path):
  pool = ProcessPool(1)
  pool.submit("long", _child(tmp_path, "long", 60))
  pool.submit("queued", _child(tmp_path, "queued", 0.1))
  proc = pool._running["long"][0]
  time.sleep(1)
  t0 = time.time()
  pool.stop()
  assert proc.poll() is not None and time.time() - t0 < 30
  assert not (tmp_path / "long.json").exists()   # SIGTERM ended it before it finished
  pool.finish()   # nothing left: the queued child never started
  assert not (tmp_path / "queued.json").exists()


def test_parallel_must_be_a_positive_integer():
  with pytest.raises(UserError, match="parallel=0 must be an integer >= 1"):
    ProcessPool(0)


def test_as_a_context_manager_it_runs_all_on_exit_and_stops_children_on_an_error(tmp_path):
  with ProcessPool(2, what="evaluation") as pool:
    for name in ("a", "b", "c"):
      pool.submit(name, _child(tmp_path, name, 0.2))
  assert all((tmp_path / f"{n}.json").exists() for n in "abc")   # finish() ran at the block's end

  with pytest.raises(UserError, match=r"evaluation failed: bad \(exit status 2\)"):
    with ProcessPool(1, what="evaluation") as pool:
      pool.submit("bad", _child(tmp_path, "bad", 0.1, status=2))

  t0 = time.time()
  with pytest.raises(KeyboardInterrupt):
    with ProcessPool(1) as pool:
      pool.submit("long", _child(tmp_path, "long", 60))
      pool.submit("queued", _child(tmp_path, "queued", 0.1))
      proc = pool._running["long"][0]
      time.sleep(1)
      raise KeyboardInterrupt   # as Ctrl-C would, inside the block
  assert proc.poll() is not None and time.time() - t0 < 30
  assert not (tmp_path / "long.json").exists() and not (tmp_path / "queued.json").exists()
