"""Rows evaluated at a snapshot of their run (Table 3's "no dropout (at 700K iters)" of 1.5M).

The trainer saves and keeps the snapshot's checkpoint whatever keep_checkpoints says
(Train.keep_steps, an orbax preservation policy); the table run trains the row on its neighbours'
schedule up to that step (train.stop_at_step), evaluates that checkpoint and the rendered table
names its step.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from core import checkpoint as ckpt_lib
from experiments import jobs, run
from tables import render


def test_a_kept_step_survives_keep_checkpoints(tmp_path):
  """orbax's own deletion, with max_to_keep=1 and step 3 kept; reopened, it still holds."""
  state = {"w": np.arange(3.0)}
  c = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=1, keep_steps=[3], async_save=False,
                            with_data=False)
  for step in range(1, 7):
    c.save(step, dict(state, step=np.int32(step)), force=True)
  c.close()
  c = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=1, keep_steps=[3], with_data=False)
  assert c.all_steps() == [3, 6]
  c.save(7, dict(state, step=np.int32(7)), force=True)
  c.wait()
  assert c.all_steps() == [3, 7]
  c.close()
  # The trainer saves a kept step that is no multiple of checkpoint_every: the smoke test below
  # (step 2 of 4 with checkpoint_every 4).


@pytest.mark.slow
def test_table3_no_dropout_smoke_evaluates_and_renders_its_snapshot(tmp_path, capsys):
  workdir = str(tmp_path / "runs")
  run.main(["table=3", "row=no dropout", "scale=smoke", f"workdir={workdir}"])
  (name,) = os.listdir(workdir)
  run_dir = os.path.join(workdir, name)
  job = json.load(open(os.path.join(run_dir, "job.json")))
  assert job["rows"] == [{"table": "3", "group": "128x128", "row": "no dropout", "eval_step": 2,
                          "num_steps": 4}]   # round(4 x 700K / 1.5M) of the smoke scale's 4 steps
  # The run stops at its snapshot, on the 4-step schedule (the learning rate's, say): no step 3 or 4.
  assert ckpt_lib.Checkpointer(run_dir, with_data=False).all_steps() == [2]
  assert jobs.is_trained(run_dir)
  results = [json.loads(l) for l in open(os.path.join(run_dir, "eval", "results.jsonl"))]
  assert results and {r["step"] for r in results} == {2}
  capsys.readouterr()
  render.main(["table=3", f"workdir={workdir}", "out=-", "format=markdown"])
  md = capsys.readouterr().out
  row = next(l for l in md.splitlines() if l.startswith("| no dropout"))
  assert "| 2 |" in row and "no dropout: the checkpoint at step 2 of the other rows' 4-step schedule" in md
