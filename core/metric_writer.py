"""Training metrics: ``metrics.jsonl`` (one row per logged step) and TensorBoard events.

TensorBoard events go to ``<run>/train`` (the trainer) and ``<run>/eval`` (the eval worker), so
``tensorboard --logdir <workdir>`` lists each run as ``<run>/train`` and ``<run>/eval`` side by
side; both carry the run's hyperparameters as one session group of the HParams dashboard (one
row per run there, docs/tensorboard.md). Exactly once on resume: a writer started at the restored
step drops the rows logged after it and purges TensorBoard's later events. On ``gs://`` the files
are written locally and mirrored by :class:`core.io.storage.Syncer`. Only the chief process writes.
"""
from __future__ import annotations

import io
import json
import logging
import math
import numbers
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Mapping

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.record_writer import RecordWriter

from core.io import jsonl, rundir, storage
from core.errors import UserError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def image_grid(images: np.ndarray, ncols: int | None = None, *, padding: int = 0,
               pad_value: int = 0) -> np.ndarray:
  """Tiles ``[N, H, W, C]`` images row by row into one ``[R*H + (R-1)*p, K*W + (K-1)*p, C]`` image.

  ``ncols`` (K) defaults to ``ceil(sqrt(N))``; R = ``ceil(N / K)``. Cells after the N-th and the
  ``padding`` (p) pixels between cells hold ``pad_value``. The dtype is kept (uint8 for samples).
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise UserError(f"image_grid: images must be [N, H, W, C], got shape {images.shape}")
  n, h, w, c = images.shape
  if n == 0:
    raise UserError("image_grid: no images")
  ncols = int(ncols or math.ceil(math.sqrt(n)))
  if ncols <= 0:
    raise UserError(f"image_grid: ncols must be positive, got {ncols}")
  ncols = min(ncols, n)
  nrows = math.ceil(n / ncols)
  out = np.full((nrows * h + (nrows - 1) * padding, ncols * w + (ncols - 1) * padding, c),
                pad_value, dtype=images.dtype)
  for i in range(n):
    r, k = divmod(i, ncols)
    y, x = r * (h + padding), k * (w + padding)
    out[y:y + h, x:x + w] = images[i]
  return out


def _scalar(name: str, v: Any) -> float | int | str | bool | None:
  """A JSON-able Python value for ``v`` (numbers, 0-d or size-1 arrays, strings)."""
  if v is None or isinstance(v, (str, bool)):
    return v
  if isinstance(v, numbers.Integral):
    return int(v)
  if isinstance(v, numbers.Real):
    return float(v)
  a = np.asarray(v)
  if a.size != 1:
    raise UserError(f"write_scalars: {name!r} has shape {a.shape}; pass a single number")
  a = a.reshape(())
  if np.issubdtype(a.dtype, np.bool_):
    return bool(a)
  if np.issubdtype(a.dtype, np.integer):
    return int(a)
  return float(a)


def _hparam(v: Any) -> bool | float | str:
  """An HParams value: bool, float or str (numpy scalars and other objects converted)."""
  if isinstance(v, (bool, np.bool_)):
    return bool(v)
  if isinstance(v, numbers.Real):
    return float(v)
  if isinstance(v, str):
    return v
  if isinstance(v, np.ndarray) and v.size == 1:
    return _hparam(v.item())
  return str(v)


def _adopt_events(old: str, new: str) -> None:
  """Moves the event files of an earlier version's event directory ``old`` into ``new`` when
  ``new`` has none, and removes ``old`` when it is left empty."""
  if not os.path.isdir(old) or (os.path.isdir(new) and any(
      "tfevents" in f for f in os.listdir(new))):
    return
  os.makedirs(new, exist_ok=True)
  moved = [f for f in sorted(os.listdir(old)) if "tfevents" in f]
  for f in moved:
    os.replace(os.path.join(old, f), os.path.join(new, f))
  if moved:
    log.info("moved %d TensorBoard event file(s) from %s to %s", len(moved), old, new)
  if not os.listdir(old):
    os.rmdir(old)


class _Events:
  """One TensorBoard event file, written with TensorBoard's own record writer and protos:
  scalars, PNG images, markdown text and hparams summaries. TensorBoard itself, not tensorboardX
  (which imports torch: about 2 s of every trainer process's start).

  The file is ``events.out.tfevents.<seconds>.<host>.<nanoseconds>``: TensorBoard reads a
  directory's files in name order, so a restart's file sorts after the one it resumes (the names
  tensorboardX gave, kept for runs started by earlier versions). Every event is flushed as it is
  written. ``purge_step``: the events of that step and later, left by a crashed run, are hidden
  (a ``SessionLog.START`` at that step, as TensorBoard reads it).
  """

  def __init__(self, logdir: str, *, purge_step: int | None):
    os.makedirs(logdir, exist_ok=True)
    now = time.time_ns()
    name = f"events.out.tfevents.{now // 10**9:010d}.{socket.gethostname()}.{now}"
    self._records = RecordWriter(open(os.path.join(logdir, name), "wb"))
    self._add(event_pb2.Event(wall_time=now / 1e9, file_version="brain.Event:2"))
    if purge_step is not None:
      self._add(event_pb2.Event(
          step=purge_step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def _add(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()

  def add_summary(self, summary: summary_pb2.Summary, step: int) -> None:
    self._add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self.add_summary(summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=tag, simple_value=float(value))]), step)

  def add_image(self, tag: str, img: np.ndarray, step: int) -> None:
    """``img``: uint8 [H, W, C], C in 1, 3, 4, stored as PNG (one channel as gray RGB)."""
    if img.shape[-1] == 1:
      img = np.repeat(img, 3, axis=-1)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    self.add_summary(summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=tag, image=summary_pb2.Summary.Image(
            height=img.shape[0], width=img.shape[1], colorspace=img.shape[2],
            encoded_image_string=buf.getvalue()))]), step)

  def add_text(self, tag: str, text: str, step: int) -> None:
    """Markdown for the text dashboard, under ``<tag>/text_summary``."""
    tensor = tensor_pb2.TensorProto(
        dtype="DT_STRING", string_val=[text.encode("utf-8")],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
    self.add_summary(summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=tag + "/text_summary", metadata=text_metadata.create_summary_metadata("", ""),
        tensor=tensor)]), step)

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    self._records.close()


def truncate_jsonl(path: str, max_step: int) -> int:
  """Keeps the rows of ``metrics.jsonl`` with ``step <= max_step`` and drops a torn tail;
  returns the number of rows dropped."""
  rows, torn = jsonl.read_with_tail(path)
  kept = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= max_step]
  if torn or len(kept) < len(rows):
    jsonl.write(path, kept)
  return len(rows) - len(kept) + torn


class MetricWriter:
  """Writes ``metrics.jsonl`` rows and TensorBoard events for one run directory.

  Args:
    workdir: the run directory (local or ``gs://``).
    start_step: the step the run (re)starts from: rows and events of steps > ``start_step`` left
      by an earlier, crashed run are dropped (see module docstring). With 0 (a fresh run, or a
      writer that logs at arbitrary steps such as the eval worker's) TensorBoard purges nothing.
    tensorboard: write TensorBoard event files under ``<workdir>/<tb_dir>``.
    jsonl: write ``<workdir>/metrics.jsonl`` (the eval worker keeps its rows in its own
      ``results.jsonl`` and uses TensorBoard only).
    tb_dir: the event directory under ``workdir``, i.e. TensorBoard's run name below the run's:
      ``train`` (:data:`core.io.rundir.TRAIN_EVENTS`) or ``eval``.
    tb_prefix: put in front of every TensorBoard tag (``train/`` groups the trainer's charts);
      ``metrics.jsonl`` keeps the names as given.
    legacy_tb_dir: where earlier versions wrote this writer's events (``tb``, ``eval/tb``): in a
      local workdir they are moved into ``tb_dir`` when it has none yet, so a resumed run stays one
      TensorBoard run.
    is_chief: only the chief writes; other processes get a writer that does nothing.
    sync_every_s: for ``gs://`` workdirs, also upload while writing when this many seconds have
      passed since the last upload (``flush`` and ``close`` always upload).
  """

  def __init__(self, workdir: str, *, start_step: int = 0, tensorboard: bool = True,
               jsonl: bool = True, is_chief: bool = True, sync_every_s: float = 120.0,
               tb_dir: str = rundir.TRAIN_EVENTS, tb_prefix: str = "",
               legacy_tb_dir: str | None = None):
    self.workdir = os.fspath(workdir)
    self.tb_prefix = tb_prefix
    self._hparams = None
    self.is_chief = is_chief
    self.start_step = int(start_step)
    self._closed = False
    self._file = None
    self._tb = None
    self._syncer = None
    self._staging = None
    self._sync_every_s = sync_every_s
    self._last_sync = time.monotonic()
    if not is_chief:
      return
    if storage.is_remote(self.workdir):
      self._staging = tempfile.mkdtemp(prefix="metrics-staging-")
      remote_metrics = storage.join(self.workdir, METRICS_FILE)
      if jsonl and storage.exists(remote_metrics):
        storage.copy_to_local(remote_metrics, os.path.join(self._staging, METRICS_FILE))
      self._syncer = storage.Syncer(self._staging, self.workdir)
      self.local_dir = self._staging
    else:
      self.local_dir = self.workdir
    os.makedirs(self.local_dir, exist_ok=True)
    self.metrics_path = os.path.join(self.local_dir, METRICS_FILE)
    if jsonl:
      dropped = truncate_jsonl(self.metrics_path, self.start_step)
      if dropped:
        log.info("%s: dropped %d rows after step %d (written after the last checkpoint)",
                 self.metrics_path, dropped, self.start_step)
      self._file = open(self.metrics_path, "a", encoding="utf-8")
    if tensorboard:
      tb_path = os.path.join(self.local_dir, tb_dir)
      if legacy_tb_dir and self._staging is None:
        _adopt_events(os.path.join(self.local_dir, legacy_tb_dir), tb_path)
      self._tb = _Events(tb_path, purge_step=self.start_step + 1 if self.start_step > 0 else None)

  # ----------------------------------------------------------------------------------------------

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends ``{"step": step, **scalars}`` to metrics.jsonl; numbers also go to TensorBoard."""
    if not self.is_chief:
      return
    self._check_open()
    step = int(step)
    row: dict[str, Any] = {"step": step}
    for k, v in scalars.items():
      if k == "step":
        raise UserError("write_scalars: 'step' is the first argument, not a metric name")
      row[k] = _scalar(k, v)
    if self._file is not None:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()  # a crash loses at most the line being written (dropped on resume)
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(self.tb_prefix + k, float(v), step)
    self._maybe_sync()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """TensorBoard images: each value is a uint8 ``[H, W, C]`` image or ``[N, H, W, C]`` batch
    (tiled with :func:`image_grid`); C is 1, 3 or 4."""
    if not self.is_chief or self._tb is None:
      return
    self._check_open()
    for name, img in images.items():
      img = np.asarray(img)
      if img.dtype != np.uint8:
        raise UserError(f"write_images: {name!r} has dtype {img.dtype}; pass uint8 in [0, 255]")
      if img.ndim == 4:
        img = image_grid(img)
      if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise UserError(f"write_images: {name!r} has shape {img.shape}; pass [H, W, C] or "
                        "[N, H, W, C] with C in 1, 3, 4")
      self._tb.add_image(self.tb_prefix + name, img, int(step))
    self._maybe_sync()

  def write_text(self, tag: str, text: str, step: int = 0, *, code: bool = False) -> None:
    """TensorBoard text (markdown), e.g. the operative gin config or a table of results; TB tag
    ``<tb_prefix><tag>/text_summary``.

    ``code=True`` shows ``text`` verbatim as a fenced code block (a gin file's ``#`` comments would
    otherwise render as markdown headings). Write the config at ``step=start_step`` so that each
    (re)start shows the config it ran with.
    """
    if not self.is_chief or self._tb is None:
      return
    self._check_open()
    if code:
      fence = "~~~~" if "```" in text else "```"
      text = f"{fence}\n{text.rstrip()}\n{fence}"
    self._tb.add_text(self.tb_prefix + tag, text, int(step))

  def write_hparams(self, hparams: Mapping[str, Any], group: str) -> None:
    """This TensorBoard run's hyperparameters, for the HParams dashboard (its table, parallel
    coordinates and scatter plots), in the hparams plugin's own summary format.

    Each run is a *session*; sessions with the same ``group`` are one row of the dashboard, which
    shows the union of their scalars' last values as metric columns (the trainer's ``train/...``
    and the eval worker's ``eval/...`` of one run directory). Values: bool, number or string;
    ``None`` values are left out. A repeated call with the same values writes nothing.
    """
    if not self.is_chief or self._tb is None:
      return
    self._check_open()
    values = {str(k): _hparam(v) for k, v in hparams.items() if v is not None}
    if (values, group) == self._hparams:
      return
    self._hparams = (values, group)
    self._tb.add_summary(hparams_summary.hparams_pb(values, trial_id=group), 0)

  def flush(self) -> None:
    """Flushes files and, for gs:// workdirs, uploads what changed (retrying earlier failures)."""
    if not self.is_chief or self._closed:
      return
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()
    self._sync()

  def close(self) -> None:
    """Flushes, closes the files and (gs://) uploads; the staging directory is removed if every
    file arrived."""
    if not self.is_chief or self._closed:
      return
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
    self._closed = True
    result = self._sync()
    if self._staging is not None:
      if result is not None and result.ok:
        shutil.rmtree(self._staging, ignore_errors=True)
      else:
        log.warning("metrics for %s not fully uploaded; local copy kept in %s", self.workdir,
                    self._staging)

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ----------------------------------------------------------------------------------------------

  def _check_open(self) -> None:
    if self._closed:
      raise UserError(f"MetricWriter for {self.workdir} is closed")

  def _maybe_sync(self) -> None:
    if self._syncer is not None and time.monotonic() - self._last_sync >= self._sync_every_s:
      if self._tb is not None:
        self._tb.flush()
      self._sync()

  def _sync(self):
    if self._syncer is None:
      return None
    self._last_sync = time.monotonic()
    return self._syncer.sync()
