"""The text encoder of text-to-image training: T5-XXL's encoder through ``transformers`` (Sec. 5).

The paper follows Imagen (Saharia et al., 2022): captions are embedded by the frozen T5-XXL
encoder (``google/t5-v1_1-xxl``, width 4096) and the U-ViT cross-attends to the token embeddings.
:class:`TextEncoder` loads ``T5EncoderModel`` and its tokenizer with ``from_pretrained`` (a Hub
name, online or from the local Hugging Face cache, or a directory written by ``save_pretrained``)
and returns float32 ``[N, max_len, dim]`` embeddings with a bool ``[N, max_len]`` mask (True on
real tokens, the closing ``</s>`` included). Captions are padded/truncated to ``max_len`` (128 as
Imagen); the embeddings at padded positions are set to zero, so a model that ignores the mask sees
zeros there, as it does for the null (dropped) text, which is all zeros.

:func:`build_random_t5` writes a small randomly initialised T5 encoder with a word-level tokenizer
(the ``tokenizers`` library) over a given vocabulary: the offline stand-in for T5-XXL in tests and
in the CPU demo (deterministic from its seed; the words of the captions are its vocabulary).
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import urllib.parse
from typing import Iterable, Sequence

import numpy as np

from core import extras
from core.errors import UserError

DEFAULT_ENCODER = "google/t5-v1_1-xxl"
DEFAULT_MAX_LEN = 128
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's own vocabulary


def _offline() -> bool:
  flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
  return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _hub_resolves(endpoint: str) -> bool:
  """Whether the Hub's host name resolves (no network: fail at once, not after a minute of
  retries)."""
  host = urllib.parse.urlparse(endpoint).hostname or ""
  try:
    socket.getaddrinfo(host, 443)
    return True
  except (OSError, UnicodeError):
    return False


def _first_line(e: BaseException) -> str:
  return ((str(e).strip().splitlines() or [""])[0] or type(e).__name__)[:200].rstrip(".")


class TextEncoder:
  """A frozen T5 encoder: ``encode(captions) -> (emb float32 [N, T, D], mask bool [N, T])``.

  Args:
    name_or_path: a Hugging Face Hub name (e.g. ``google/t5-v1_1-xxl``, used from the local cache
      when ``HF_HUB_OFFLINE=1`` or when there is no network) or a ``save_pretrained`` directory.
    max_len: tokens per caption T (padded / truncated; the closing ``</s>`` is kept).
    batch_size: captions per forward pass.
    device: torch device ('cpu', 'cuda', ...); default cuda when available.
    dtype: torch dtype name of the weights ('float32', 'bfloat16'); outputs are float32.
  """

  def __init__(self, name_or_path: str, max_len: int = DEFAULT_MAX_LEN, *, batch_size: int = 64,
               device: str | None = None, dtype: str = "float32"):
    torch = extras.require("torch", "the T5 text encoder", "t2i")
    transformers = extras.require("transformers", "the T5 text encoder")
    huggingface_hub = extras.require("huggingface_hub", "the T5 text encoder")
    if max_len <= 0:
      raise UserError(f"text max_len={max_len} must be a positive number of tokens, e.g. 128")
    self.name = name_or_path
    self.max_len = int(max_len)
    self.batch_size = max(1, int(batch_size))
    self._torch = torch
    self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    local = os.path.isdir(name_or_path)
    if not local and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
      raise UserError(f"text encoder {name_or_path!r} is not a directory; pass a folder written "
                      f"by save_pretrained or a Hugging Face name such as {DEFAULT_ENCODER}")
    offline = local or _offline()
    no_network = not offline and not _hub_resolves(huggingface_hub.constants.ENDPOINT)
    offline = offline or no_network
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # no per-retry warnings when offline
    kw = {"local_files_only": True}
    try:
      try:  # the local cache first: no network round trip (or retries) when the files are there
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, **kw)
      except OSError:
        if offline:
          raise
        kw = {}
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
      self.model = transformers.T5EncoderModel.from_pretrained(
          name_or_path, dtype=getattr(torch, dtype), **kw)
    except (OSError, ValueError) as e:
      where = "" if local else (" (no network, and not in the local Hugging Face cache)"
                                if no_network else " (offline: not in the local Hugging Face "
                                "cache)" if offline else "")
      raise UserError(
          f"cannot load text encoder {name_or_path!r}{where}: {_first_line(e)}; download it while "
          f"online (huggingface-cli download {name_or_path}) or pass text_encoder=<local "
          f"save_pretrained folder>; set HF_HUB_OFFLINE=1 to use the cache without network"
      ) from None
    self.model.eval().to(self.device)
    self.dim = int(self.model.config.d_model)

  def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(emb float32 [N, max_len, dim], zero at padding; mask bool [N, max_len])."""
    captions = [str(c) for c in captions]
    emb = np.zeros((len(captions), self.max_len, self.dim), np.float32)
    mask = np.zeros((len(captions), self.max_len), bool)
    torch = self._torch
    for start in range(0, len(captions), self.batch_size):
      chunk = captions[start:start + self.batch_size]
      tok = self.tokenizer(chunk, padding="max_length", truncation=True, max_length=self.max_len,
                           return_tensors="pt")
      ids = tok["input_ids"].to(self.device)
      att = tok["attention_mask"].to(self.device)
      with torch.no_grad():
        out = self.model(input_ids=ids, attention_mask=att).last_hidden_state
      m = att.bool()
      out = torch.where(m[..., None], out.float(), torch.zeros((), device=out.device))
      emb[start:start + len(chunk)] = out.cpu().numpy()
      mask[start:start + len(chunk)] = m.cpu().numpy()
    return emb, mask

  def describe(self) -> dict:
    return {"encoder": self.name, "max_len": self.max_len, "dim": self.dim}


# ---------------------------------------------------------------------------------------------
# A small random T5 (tests, CPU demo).

_WORD = re.compile(r"\w+|[^\w\s]")  # what tokenizers' Whitespace pre-tokenizer splits into


def words(captions: Iterable[str]) -> list[str]:
  """The sorted set of lowercase words and punctuation marks of ``captions`` (the vocabulary)."""
  return sorted({w for c in captions for w in _WORD.findall(c.lower())})


def build_random_t5(path: str, vocabulary: Iterable[str], *, d_model: int = 32,
                    num_layers: int = 1, num_heads: int = 2, d_ff: int = 64, seed: int = 0) -> str:
  """Writes a randomly initialised T5 encoder (T5 v1.1 layout: gated-GELU, RMSNorm, relative
  position buckets) and a word-level tokenizer over ``vocabulary`` (lowercased; unknown words map to
  ``<unk>``; ``</s>`` closes every caption) to ``path`` with ``save_pretrained``; deterministic in
  ``seed``. Returns ``path``."""
  torch = extras.require("torch", "the T5 text encoder", "t2i")
  transformers = extras.require("transformers", "the T5 text encoder")
  tokenizers = extras.require("tokenizers", "the T5 text encoder")
  from tokenizers import models, normalizers, pre_tokenizers, processors  # noqa: E501
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  for w in sorted({w.lower() for w in vocabulary}):
    vocab.setdefault(w, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                     special_tokens=[("</s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              eos_token="</s>", unk_token="<unk>")
  cfg = transformers.T5Config(
      vocab_size=len(vocab), d_model=d_model, d_kv=max(1, d_model // num_heads), d_ff=d_ff,
      num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
  transformers.utils.logging.disable_progress_bar()
  with _seeded(torch, seed):
    model = transformers.T5EncoderModel(cfg)
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path)
  fast.save_pretrained(path)
  return path


@contextlib.contextmanager
def _seeded(torch, seed: int):
  state = torch.random.get_rng_state()
  torch.manual_seed(seed)
  try:
    yield
  finally:
    torch.random.set_rng_state(state)
