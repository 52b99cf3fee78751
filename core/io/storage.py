"""One small file API over local paths and ``gs://bucket/prefix`` paths (run directories, data).

Local writes are atomic (temp file + rename); ``gs://`` goes through google-cloud-storage
(anonymous against ``STORAGE_EMULATOR_HOST``, else Application Default Credentials), whose own
retry (google.api_core's Retry, configured by :func:`retry_options`) handles transient failures;
a missing path is a one-line :class:`NotFoundError`. Conditional writes (``if_generation_match``)
carry the run directory's lease (core/runlock.py). :class:`Syncer` mirrors a locally written
directory to gs://, queueing failed uploads for the next sync. Orbax writes checkpoints to gs:// itself (gcsfs and
tensorstore; against the emulator see tests/gcs_emulator.py).
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import fnmatch
import functools
import hashlib
import http.client
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from core.errors import UserError

_T = TypeVar("_T")
_SCHEME = "gs://"
APPEND_CONFLICT_TRIES = 8  # append_lines redoes an append a concurrent writer beat this often
log = logging.getLogger(__name__)


class NotFoundError(UserError, FileNotFoundError):
  """A path (local file, GCS object or bucket) that does not exist."""


# ------------------------------------------------------------------------------------------------
# Retry policy.


@dataclasses.dataclass
class RetryOptions:
  """google-cloud-storage's retry policy for transient errors (google.api_core.retry.Retry):
  sleeps of ``initial_delay * multiplier**k`` (capped at ``max_delay``, jittered) until
  ``deadline`` seconds have passed; ``timeout`` bounds each HTTP request."""
  initial_delay: float = 1.0
  max_delay: float = 30.0
  multiplier: float = 2.0
  deadline: float = 300.0
  timeout: float = 120.0


_retry = RetryOptions()


def set_retry(**kwargs) -> RetryOptions:
  """Changes the process-wide retry options (fields of :class:`RetryOptions`); returns the old."""
  global _retry
  old = _retry
  _retry = dataclasses.replace(_retry, **kwargs)
  return old


@contextlib.contextmanager
def retry_options(**kwargs) -> Iterator[RetryOptions]:
  """Temporarily changes the retry options (e.g. short backoff in tests)."""
  old = set_retry(**kwargs)
  try:
    yield _retry
  finally:
    set_retry(**dataclasses.asdict(old))


_TRANSIENT_CODES = frozenset({408, 429, 500, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
  """Whether ``exc`` is worth retrying: 408/429/5xx responses, connection and timeout errors."""
  from google.api_core import exceptions as api_exceptions
  from google.auth import exceptions as auth_exceptions
  from google.cloud.storage import exceptions as gcs_exceptions
  import requests
  import urllib3

  if isinstance(exc, api_exceptions.GoogleAPICallError):
    return exc.code in _TRANSIENT_CODES
  if isinstance(exc, gcs_exceptions.InvalidResponse):
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) in _TRANSIENT_CODES
  if isinstance(exc, gcs_exceptions.DataCorruption):
    return True  # checksum mismatch on download: fetch again
  if isinstance(exc, auth_exceptions.TransportError):
    return True
  return isinstance(exc, (ConnectionError, TimeoutError, requests.ConnectionError,
                          requests.exceptions.ChunkedEncodingError, requests.Timeout,
                          http.client.BadStatusLine, http.client.IncompleteRead,
                          http.client.ResponseNotReady, urllib3.exceptions.PoolError,
                          urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError))


def _call(what: str, fn: Callable[..., _T]) -> _T:
  """``fn(retry=..., timeout=...)``: one google-cloud-storage call, retried by the library with
  the configured policy; what it raises in the end becomes a one-line error."""
  from google.api_core import exceptions as api_exceptions
  from google.api_core import retry as api_retry
  opts, failures = _retry, [0]

  def on_error(e: BaseException) -> None:
    failures[0] += 1
    log.warning("%s: %s; retrying (attempt %d failed)", what, _short(e), failures[0])

  policy = api_retry.Retry(predicate=is_transient, initial=opts.initial_delay,
                           maximum=opts.max_delay, multiplier=opts.multiplier,
                           timeout=opts.deadline, on_error=on_error)
  try:
    return fn(retry=policy, timeout=opts.timeout)
  except api_exceptions.RetryError as e:
    raise TransientError(f"{what}: giving up after {failures[0]} attempts in "
                         f"{opts.deadline:g} s: {_short(e.cause or e)}") from e
  except api_exceptions.NotFound as e:
    raise NotFoundError(_not_found_message(what)) from e
  except api_exceptions.Forbidden as e:
    raise UserError(f"{what}: permission denied ({_short(e)}); check the credentials "
                    "(gcloud auth application-default login) and the bucket's IAM") from e
  except api_exceptions.Unauthorized as e:
    raise UserError(f"{what}: not authenticated ({_short(e)}); run "
                    "'gcloud auth application-default login'") from e


class TransientError(OSError):
  """GCS stayed unreachable (or kept answering 429/5xx) through every retry."""


def _short(e: BaseException) -> str:
  s = str(e).strip().splitlines()
  return f"{type(e).__name__}: {s[0][:200] if s else ''}"


def _not_found_message(what: str) -> str:
  path = what.split(" ", 1)[-1]
  if is_remote(path):
    bucket, _ = split(path)
    try:
      if not _client().bucket(bucket).exists(retry=None, timeout=_retry.timeout):
        return (f"{path}: bucket gs://{bucket} does not exist (or is not visible with these "
                "credentials); check the path")
    except Exception:  # pylint: disable=broad-except
      pass
  return f"{path}: no such file or object; check the path"


# ------------------------------------------------------------------------------------------------
# Paths and the client.


def is_remote(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a ``gs://`` URL (else a local path)."""
  return os.fspath(path).startswith(_SCHEME)


def split(path: str) -> tuple[str, str]:
  """``gs://bucket/a/b`` -> ``('bucket', 'a/b')`` (no leading or trailing slash on the name)."""
  if not is_remote(path):
    raise UserError(f"{path}: not a gs:// path")
  rest = path[len(_SCHEME):]
  bucket, _, name = rest.partition("/")
  if not bucket:
    raise UserError(f"{path}: no bucket name; write gs://BUCKET/PATH")
  return bucket, name.strip("/")


def join(a: str | os.PathLike, *parts: str) -> str:
  """Joins path components; ``/`` separated for ``gs://`` paths, ``os.path.join`` otherwise."""
  a = os.fspath(a)
  if not is_remote(a):
    return os.path.join(a, *parts)
  out = a
  for p in parts:
    p = os.fspath(p)
    if not p:
      continue
    out = p if is_remote(p) else (out.rstrip("/") + "/" + p.lstrip("/"))
  return out


def basename(path: str) -> str:
  """Last component of a local or gs:// path (ignoring a trailing slash)."""
  return posixpath.basename(os.fspath(path).rstrip("/")) if is_remote(path) else os.path.basename(
      os.path.normpath(path))


_client_lock = threading.Lock()
_clients: dict[tuple[str, str], object] = {}


def _client():
  """A cached ``google.cloud.storage.Client`` (one per emulator host / project setting)."""
  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
  project = os.environ.get("GOOGLE_CLOUD_PROJECT", "")
  key = (emulator, project)
  with _client_lock:
    if key not in _clients:
      from google.cloud import storage as gcs
      if emulator:
        from google.auth.credentials import AnonymousCredentials
        _clients[key] = gcs.Client(project=project or "test-project",
                                   credentials=AnonymousCredentials())
      else:
        import google.auth.exceptions
        try:
          _clients[key] = gcs.Client(project=project or None)
        except google.auth.exceptions.DefaultCredentialsError as e:
          raise UserError("no Google Cloud credentials for gs:// paths; run 'gcloud auth "
                          "application-default login' or set GOOGLE_APPLICATION_CREDENTIALS "
                          "(tests: STORAGE_EMULATOR_HOST)") from e
    return _clients[key]


def _blob(path: str):
  bucket, name = split(path)
  if not name:
    raise UserError(f"{path}: names a bucket, not an object; add an object path")
  return _client().bucket(bucket).blob(name)


def _iter_blobs(bucket: str, prefix: str, delimiter: str | None = None):
  """All blobs (and, with a delimiter, the prefixes) under ``prefix``, with retries per page."""
  client = _client()
  page_token = None
  while True:
    def one_page(token=page_token, **kw):
      it = client.list_blobs(bucket, prefix=prefix or None, delimiter=delimiter,
                             page_token=token, **kw)
      page = next(it.pages, None)
      blobs = list(page) if page is not None else []
      return blobs, set(it.prefixes), it.next_page_token
    blobs, prefixes, page_token = _call(f"list gs://{bucket}/{prefix}", one_page)
    yield blobs, prefixes
    if not page_token:
      return


# ------------------------------------------------------------------------------------------------
# Whole-file operations.


def exists(path: str) -> bool:
  """Whether a file/object or a directory (some object under ``path/``) exists."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.exists(path)
  bucket, name = split(path)
  if not name:
    return _call(f"stat {path}", _client().bucket(bucket).exists)
  if _call(f"stat {path}", _blob(path).exists):
    return True
  return isdir(path)


def isdir(path: str) -> bool:
  """Whether ``path`` is a directory (gs: some object's name starts with ``path/``)."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.isdir(path)
  bucket, name = split(path)
  client = _client()
  def probe(**kw):
    it = client.list_blobs(bucket, prefix=(name + "/") if name else None, max_results=1, **kw)
    return any(True for _ in it)
  try:
    return _call(f"stat {path}", probe)
  except NotFoundError:
    return False


def read_bytes(path: str) -> bytes:
  """The contents of a file or object."""
  path = os.fspath(path)
  if not is_remote(path):
    try:
      with open(path, "rb") as f:
        return f.read()
    except FileNotFoundError as e:
      raise NotFoundError(f"{path}: no such file; check the path") from e
  return _call(f"read {path}", _blob(path).download_as_bytes)


def read_text(path: str) -> str:
  """The contents of a file or object, decoded as UTF-8."""
  return read_bytes(path).decode("utf-8")


def _atomic_local_write(path: str, data: bytes) -> None:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file/object (atomically: readers see the old or the new contents)."""
  path = os.fspath(path)
  if not is_remote(path):
    _atomic_local_write(path, bytes(data))
    return
  _call(f"write {path}", functools.partial(_blob(path).upload_from_string, data,
                                           content_type="application/octet-stream"))


def write_text(path: str, text: str) -> None:
  """Writes a whole text file (UTF-8), atomically."""
  path = os.fspath(path)
  if not is_remote(path):
    _atomic_local_write(path, text.encode("utf-8"))
    return
  _call(f"write {path}", functools.partial(_blob(path).upload_from_string, text.encode("utf-8"),
                                           content_type="text/plain; charset=utf-8"))


def append_lines(path: str, lines: Iterable[str]) -> None:
  """Appends lines (a newline is added to each) to a text file, creating it if needed.

  Local: one ``open(..., 'a')`` write. GCS objects are immutable, so on ``gs://`` the new lines
  are uploaded as a temporary object ``<name>.append-<uuid>`` and *composed* onto the end of the
  object (``if_generation_match`` guards against a concurrent writer; on a conflict the append is
  redone), then the temporary object is deleted. Only the appended bytes travel, so appending to
  a large ``results.jsonl`` stays cheap. If the object does not exist yet it is created with
  ``if_generation_match=0``. A crash between the two steps can leave a stray ``.append-*`` object
  but never a partial line in the file.
  """
  path = os.fspath(path)
  data = "".join(l.rstrip("\n") + "\n" for l in lines).encode("utf-8")
  if not data:
    return
  if not is_remote(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "ab") as f:
      f.write(data)
    return
  from google.api_core import exceptions as api_exceptions
  blob = _blob(path)
  for _ in range(APPEND_CONFLICT_TRIES):
    generation = _call(f"stat {path}", functools.partial(_generation, blob))
    try:
      if generation is None:
        _call(f"append {path}", functools.partial(
            blob.upload_from_string, data, content_type="text/plain; charset=utf-8",
            if_generation_match=0))
        return
      piece = blob.bucket.blob(f"{blob.name}.append-{uuid.uuid4().hex}")
      _call(f"append {path}", functools.partial(piece.upload_from_string, data,
                                                content_type="text/plain; charset=utf-8"))
      try:
        # A fresh destination Blob: one carrying the old object's metadata (crc32c, md5) would
        # send those stale checksums as the composed object's.
        dest = blob.bucket.blob(blob.name)
        _call(f"append {path}", functools.partial(dest.compose, [dest, piece],
                                                  if_generation_match=generation))
      finally:
        with contextlib.suppress(Exception):
          _call(f"delete {path}", piece.delete)
      return
    except api_exceptions.PreconditionFailed:
      continue  # someone else appended in between: read the new generation and redo
  raise UserError(f"{path}: kept changing during append_lines; is another process writing it?")


def _generation(blob, **kw) -> int | None:
  from google.api_core import exceptions as api_exceptions
  try:
    blob.reload(**kw)
  except api_exceptions.NotFound:
    return None
  return blob.generation


class ConflictError(OSError):
  """A conditional write lost: the object's generation was no longer the one given."""


def read_generation(path: str) -> tuple[bytes | None, int]:
  """(contents, generation) of a ``gs://`` object, from one download; (None, 0) when there is no
  such object (0 is "no live object" in generation preconditions)."""
  blob = _blob(path)
  try:
    data = _call(f"read {path}", blob.download_as_bytes)
  except NotFoundError:
    return None, 0
  return data, int(blob.generation)


def write_if_generation(path: str, data: bytes, generation: int) -> int:
  """Writes a ``gs://`` object only if its generation is still ``generation`` (0: only if there is
  none), GCS checking and writing in one step (``ifGenerationMatch``); returns the new
  generation. :class:`ConflictError` when another writer changed it first. A retried request
  whose first attempt did land also ends in ConflictError: callers tell their own write apart by
  its contents."""
  from google.api_core import exceptions as api_exceptions
  blob = _blob(path)
  try:
    _call(f"write {path}", functools.partial(blob.upload_from_string, data,
                                             content_type="application/json",
                                             if_generation_match=generation))
  except api_exceptions.PreconditionFailed as e:
    raise ConflictError(f"{path}: changed by another writer (generation is not "
                        f"{generation})") from e
  return int(blob.generation)


def delete_if_generation(path: str, generation: int) -> bool:
  """Deletes a ``gs://`` object only if its generation is still ``generation``; False when it
  changed or is gone."""
  from google.api_core import exceptions as api_exceptions
  try:
    _call(f"delete {path}", functools.partial(_blob(path).delete,
                                              if_generation_match=generation))
  except (api_exceptions.PreconditionFailed, NotFoundError):
    return False
  return True


# ------------------------------------------------------------------------------------------------
# Directories.


def makedirs(path: str) -> None:
  """Creates a local directory and its parents; a no-op for ``gs://`` (no directories there)."""
  path = os.fspath(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str, *, missing_ok: bool = False) -> list[str]:
  """Sorted names of the immediate children of a directory (gs: objects and prefixes below it);
  ``missing_ok``: [] for a directory that does not exist."""
  if missing_ok:
    try:
      return listdir(path)
    except FileNotFoundError:
      return []
  path = os.fspath(path)
  if not is_remote(path):
    try:
      return sorted(os.listdir(path))
    except FileNotFoundError as e:
      raise NotFoundError(f"{path}: no such directory; check the path") from e
  bucket, name = split(path)
  prefix = (name + "/") if name else ""
  names: set[str] = set()
  found = False
  for blobs, prefixes in _iter_blobs(bucket, prefix, delimiter="/"):
    for b in blobs:
      found = True
      rest = b.name[len(prefix):]
      if rest:  # skip a "directory placeholder" object named exactly prefix
        names.add(rest)
    for p in prefixes:
      found = True
      names.add(p[len(prefix):].rstrip("/"))
  if not found:
    raise NotFoundError(_not_found_message(f"list {path}") if name else f"{path}: empty bucket")
  return sorted(names)


def list_files(root: str, pattern: str | None = None) -> list[str]:
  """Every file below ``root`` (recursively) as sorted ``/``-separated paths relative to it.

  ``pattern`` (``fnmatch``, matched against the relative path, where ``*`` also crosses ``/``)
  keeps only matching files, e.g. ``list_files(ckpt_dir, '*/_METADATA')``. A missing ``root`` gives
  an empty list.
  """
  root = os.fspath(root)
  out: list[str] = []
  if not is_remote(root):
    for d, _, files in os.walk(root):
      for f in files:
        out.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
  else:
    bucket, name = split(root)
    prefix = (name + "/") if name else ""
    for blobs, _ in _iter_blobs(bucket, prefix):
      out.extend(b.name[len(prefix):] for b in blobs if b.name != prefix)
  if pattern is not None:
    out = [p for p in out if fnmatch.fnmatchcase(p, pattern)]
  return sorted(out)


def remove(path: str, *, missing_ok: bool = False) -> None:
  """Deletes one file or object."""
  path = os.fspath(path)
  try:
    if not is_remote(path):
      try:
        os.unlink(path)
      except FileNotFoundError as e:
        raise NotFoundError(f"{path}: no such file; check the path") from e
    else:
      _call(f"delete {path}", _blob(path).delete)
  except NotFoundError:
    if not missing_ok:
      raise


def rmtree(path: str, *, missing_ok: bool = True) -> None:
  """Deletes a directory tree (gs: every object under ``path/``, and an object named ``path``)."""
  path = os.fspath(path)
  if not is_remote(path):
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.unlink(path)
    elif not missing_ok:
      raise NotFoundError(f"{path}: no such directory; check the path")
    return
  bucket, name = split(path)
  if not name:
    raise UserError(f"{path}: refusing to delete a whole bucket; give a prefix")
  deleted = 0
  for rel in list_files(path):
    remove(join(path, rel), missing_ok=True)
    deleted += 1
  try:
    _call(f"delete {path}", _blob(path).delete)
    deleted += 1
  except NotFoundError:
    pass
  if not deleted and not missing_ok:
    raise NotFoundError(f"{path}: nothing to delete; check the path")


def _upload_file(local: str, remote: str) -> None:
  _call(f"upload {remote}", functools.partial(_blob(remote).upload_from_filename, local))


def copy_from_local(local_path: str, remote_path: str) -> None:
  """Copies a local file, or a directory tree (into ``remote_path/...``), to any path."""
  local_path, remote_path = os.fspath(local_path), os.fspath(remote_path)
  if not os.path.exists(local_path):
    raise NotFoundError(f"{local_path}: no such file or directory; check the path")
  if os.path.isdir(local_path):
    for rel in list_files(local_path):
      copy_from_local(os.path.join(local_path, *rel.split("/")), join(remote_path, *rel.split("/")))
    return
  if is_remote(remote_path):
    _upload_file(local_path, remote_path)
  else:
    os.makedirs(os.path.dirname(os.path.abspath(remote_path)), exist_ok=True)
    shutil.copy2(local_path, remote_path)


def copy_to_local(remote_path: str, local_path: str) -> None:
  """Copies a file/object, or a whole directory (prefix), from any path to a local path."""
  remote_path, local_path = os.fspath(remote_path), os.fspath(local_path)
  if not is_remote(remote_path):
    if os.path.isdir(remote_path):
      shutil.copytree(remote_path, local_path, dirs_exist_ok=True)
    elif os.path.exists(remote_path):
      os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
      shutil.copy2(remote_path, local_path)
    else:
      raise NotFoundError(f"{remote_path}: no such file or directory; check the path")
    return
  _, name = split(remote_path)
  blob = _blob(remote_path) if name else None
  if blob is not None and _call(f"stat {remote_path}", blob.exists):
    _download(remote_path, local_path)
    return
  files = list_files(remote_path)
  if not files:
    raise NotFoundError(_not_found_message(f"read {remote_path}"))
  for rel in files:
    _download(join(remote_path, rel), os.path.join(local_path, *rel.split("/")))


def _download(remote: str, local: str) -> None:
  d = os.path.dirname(os.path.abspath(local))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(local) + ".", suffix=".tmp")
  os.close(fd)
  try:
    _call(f"read {remote}", functools.partial(_blob(remote).download_to_filename, tmp))
    os.replace(tmp, local)
  finally:
    with contextlib.suppress(OSError):
      os.unlink(tmp)


# ------------------------------------------------------------------------------------------------
# Mirroring a local run directory.


@dataclasses.dataclass
class SyncResult:
  """What one :meth:`Syncer.sync` did (relative paths)."""
  uploaded: list[str]
  failed: list[str]     # still queued; retried by the next sync
  deleted: list[str]
  skipped: int          # unchanged files

  @property
  def ok(self) -> bool:
    return not self.failed


DEFAULT_EXCLUDE = ("*.orbax-checkpoint-tmp*", "*.tmp")
# Files whose presence tells orbax that a checkpoint (directory) is complete.
COMMIT_MARKERS = ("commit_success.txt", "_CHECKPOINT_METADATA")


def file_digest(path: str, algorithm: str = "sha1") -> bytes:
  """The digest of a local file."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, algorithm).digest()


def _md5_b64(path: str) -> str:
  return base64.b64encode(file_digest(path, "md5")).decode("ascii")


class Syncer:
  """Mirrors ``local_dir`` to ``remote_dir``: uploads new or changed files, never loses a failure.

  * A file is (re)uploaded when its (size, mtime) differs from what this syncer last uploaded.
    On the first sync the remote listing is read once and files whose size and MD5 already match
    the remote object are skipped, so a restarted trainer does not re-upload a whole run.
  * An upload that fails (after the per-request retries of :func:`set_retry`) is logged and
    queued; every later :meth:`sync` retries the queue first. A sync does not raise for such a
    failure: training goes on and the file arrives when GCS is back. Only errors that retrying
    cannot fix (missing bucket, permission denied: :class:`core.errors.UserError`) are raised.
  * ``delete=True`` also deletes remote copies of files that this syncer saw locally and that are
    gone now (e.g. checkpoints removed by orbax's ``max_to_keep``); files it never saw are left
    alone.
  * ``exclude`` patterns (``fnmatch`` on the relative path) skip files being written, by default
    orbax's ``*.orbax-checkpoint-tmp*`` directories and ``*.tmp`` files.
  * Orbax's commit markers (``commit_success.txt``, ``_CHECKPOINT_METADATA``) are uploaded after
    all other files, and a marker waits in the queue while any file below its directory is
    queued, so orbax reading the mirror (which trusts ``commit_success.txt`` on gs://) never sees
    a half-uploaded checkpoint as finalized.

  Thread-safe: concurrent :meth:`sync` calls run one after the other.
  """

  def __init__(self, local_dir: str, remote_dir: str, *, delete: bool = False,
               exclude: Sequence[str] = DEFAULT_EXCLUDE):
    self.local_dir = os.fspath(local_dir)
    self.remote_dir = os.fspath(remote_dir)
    self.delete = delete
    self.exclude = tuple(exclude)
    self._uploaded: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) last uploaded
    self._failed: dict[str, str] = {}                # rel -> last error, in queue order
    self._remote_checked = False
    self._lock = threading.Lock()

  @property
  def pending(self) -> list[str]:
    """Relative paths whose upload failed and is queued for the next sync."""
    return list(self._failed)

  def _excluded(self, rel: str) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in self.exclude)

  def _remote_state(self) -> dict[str, tuple[int, str | None]]:
    """rel -> (size, md5 base64) of what is already under remote_dir."""
    if not is_remote(self.remote_dir):
      out = {}
      for rel in list_files(self.remote_dir):
        p = os.path.join(self.remote_dir, *rel.split("/"))
        out[rel] = (os.path.getsize(p), None)
      return out
    bucket, name = split(self.remote_dir)
    prefix = (name + "/") if name else ""
    out = {}
    for blobs, _ in _iter_blobs(bucket, prefix):
      for b in blobs:
        out[b.name[len(prefix):]] = (b.size, b.md5_hash)
    return out

  def sync(self) -> SyncResult:
    """Uploads queued failures, then new and changed files; returns what happened."""
    with self._lock:
      return self._sync()

  def _sync(self) -> SyncResult:
    local: dict[str, tuple[int, int]] = {}
    if os.path.isdir(self.local_dir):
      for rel in list_files(self.local_dir):
        if self._excluded(rel):
          continue
        try:
          st = os.stat(os.path.join(self.local_dir, *rel.split("/")))
        except FileNotFoundError:
          continue  # removed while we looked
        local[rel] = (st.st_size, st.st_mtime_ns)

    if not self._remote_checked:
      try:
        remote = self._remote_state()
        for rel, (size, md5) in remote.items():
          if rel in local and local[rel][0] == size:
            p = os.path.join(self.local_dir, *rel.split("/"))
            if md5 is None or md5 == _md5_b64(p):
              self._uploaded[rel] = local[rel]
        self._remote_checked = True
      except Exception as e:  # pylint: disable=broad-except
        log.warning("sync %s -> %s: cannot list the remote yet (%s); uploading everything",
                    self.local_dir, self.remote_dir, _short(e))

    # Failed uploads first (in the order they failed), then everything new or changed.
    for rel in list(self._failed):
      if rel not in local:
        del self._failed[rel]  # gone locally (e.g. a temporary file): nothing to upload
    todo = list(self._failed)
    todo += sorted(r for r, st in local.items()
                   if r not in self._failed and self._uploaded.get(r) != st)
    uploaded, skipped = [], len(local) - len(todo)
    # Commit markers go last, deepest first, and only once everything below their directory is
    # up: a remote checkpoint never looks finalized while some of its files are missing.
    markers = sorted((r for r in todo if posixpath.basename(r) in COMMIT_MARKERS),
                     key=lambda r: -r.count("/"))
    todo = [r for r in todo if posixpath.basename(r) not in COMMIT_MARKERS] + markers
    for rel in todo:
      if posixpath.basename(rel) in COMMIT_MARKERS:
        d = posixpath.dirname(rel)
        below = d + "/" if d else ""
        depth = rel.count("/")
        if any(f.startswith(below) and (posixpath.basename(f) not in COMMIT_MARKERS
                                        or f.count("/") > depth)
               for f in self._failed if f != rel):  # failed this round (markers: deeper ones)
          self._failed.pop(rel, None)
          self._failed[rel] = "waiting for the files below it"
          continue
      src = os.path.join(self.local_dir, *rel.split("/"))
      dst = join(self.remote_dir, *rel.split("/"))
      try:
        st = local[rel]
        copy_from_local(src, dst)
        self._uploaded[rel] = st
        self._failed.pop(rel, None)
        uploaded.append(rel)
      except Exception as e:  # pylint: disable=broad-except
        self._failed.pop(rel, None)
        if not os.path.exists(src):
          continue  # deleted locally while syncing: nothing to upload
        if isinstance(e, UserError):
          self._failed[rel] = _short(e)
          raise  # a missing bucket or no permission: retrying will not help
        self._failed[rel] = _short(e)
        log.warning("sync: upload of %s failed (%s); queued for the next sync", dst, _short(e))

    deleted = []
    if self.delete:
      gone = [r for r in self._uploaded if r not in local]
      # Commit markers first, so a checkpoint being removed never looks complete but partial.
      for rel in sorted(gone, key=lambda r: (posixpath.basename(r) not in COMMIT_MARKERS, r)):
        try:
          remove(join(self.remote_dir, *rel.split("/")), missing_ok=True)
          del self._uploaded[rel]
          deleted.append(rel)
        except Exception as e:  # pylint: disable=broad-except
          log.warning("sync: delete of %s failed (%s); will retry", rel, _short(e))
    return SyncResult(uploaded=uploaded, failed=list(self._failed), deleted=deleted,
                      skipped=skipped)

