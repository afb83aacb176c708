"""Tokenizers: load a Hugging Face ``tokenizer.json`` or train (and cache) a byte-level BPE.

``load_tokenizer`` reads any ``tokenizers`` JSON file, so a JoyAI / DeepSeek-V3 tokenizer works as is; BOS,
EOS and PAD are taken from a ``tokenizer_config.json`` next to it when present, else found among the
usual names (``<|bos|>``, ``<｜begin▁of▁sentence｜>``, ``<s>`` ...).

``cached_train_tokenizer`` trains a byte-level BPE (every byte is in the alphabet, so any text encodes,
no unknown token) with ``<|bos|>`` = 0, ``<|eos|>`` = 1, ``<|pad|>`` = 2, on at most
``TRAIN_SAMPLE_BYTES`` of the corpus, and caches it in ``data.cache_dir`` under a name keyed by the corpus
fingerprint, the vocabulary size and ``TRAINER_VERSION``; the file is written to a temp file and renamed,
so a kill mid-write never leaves a corrupt cache.

Text is encoded with special-token matching OFF: a document that contains the literal string
``<|eos|>`` is tokenised as ordinary text and cannot inject control tokens; BOS / EOS are added by the
packing pipeline from ``data.add_bos`` / ``data.add_eos``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from joyjax.errors import ConfigError
from joyjax.data.corpus import atomic_write

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
TRAINER_VERSION = 1              # bump when training settings change: invalidates cached tokenizers
TRAIN_SAMPLE_BYTES = 32 << 20    # BPE merges converge long before this; keeps first-run training short
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

# Names under which known tokenizers spell their control tokens (ours first; then DeepSeek-V3 / JoyAI,
# Llama 3, GPT-2 / sentencepiece conventions).
_KNOWN = {
    "bos": (BOS, "<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "[CLS]"),
    "eos": (EOS, "<｜end▁of▁sentence｜>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]"),
    "pad": (PAD, "<｜▁pad▁｜>", "<|finetune_right_pad_id|>", "<pad>", "[PAD]"),
}


class Tokenizer:
  """A ``tokenizers.Tokenizer`` plus the control-token ids the data pipeline needs.

  Attributes: ``hf`` (the Hugging Face tokenizer, special-token matching on, for chat templates),
  ``bos_id`` / ``eos_id`` / ``pad_id`` (``None`` when the tokenizer has no such token; ``pad_id`` falls
  back to ``eos_id`` then 0, since padded positions are masked anyway), ``vocab_size`` (max id + 1, the
  rows the model's embedding needs), ``origin`` ("trained", "cache" or the file it was loaded from).
  """

  def __init__(self, hf: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None,
               pad_id: int | None, origin: str = ""):
    self.hf = hf
    self.bos_id, self.eos_id = bos_id, eos_id
    self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    self.origin = origin
    # A second copy that treats special-token strings in text as plain text (see module docstring).
    self._plain = tokenizers.Tokenizer.from_str(hf.to_str())
    self._plain.encode_special_tokens = True
    self._fingerprint = None
    self._vocab_size = None

  def __getstate__(self):  # tokenizers objects pickle, but from its JSON is smaller and version-proof
    return {"json": self.hf.to_str(), "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
            "origin": self.origin}

  def __setstate__(self, s):
    self.__init__(tokenizers.Tokenizer.from_str(s["json"]), bos_id=s["bos_id"], eos_id=s["eos_id"],
                  pad_id=s["pad_id"], origin=s["origin"])

  @property
  def vocab_size(self) -> int:
    if self._vocab_size is None:  # get_vocab builds a dict of the whole vocabulary: do it once
      self._vocab_size = max(self.hf.get_vocab(with_added_tokens=True).values()) + 1
    return self._vocab_size

  @property
  def fingerprint(self) -> str:
    """sha256 of the serialised tokenizer: identifies it in checkpoints and iterator states."""
    if self._fingerprint is None:
      self._fingerprint = hashlib.sha256(self.hf.to_str().encode()).hexdigest()
    return self._fingerprint

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``; no BOS/EOS added, special-token strings in the text are plain text."""
    return self._plain.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.hf.token_to_id(token)

  def save(self, path: str) -> None:
    atomic_write(path, self.hf.to_str().encode("utf-8"))

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
            f"pad={self.pad_id}, origin={self.origin!r})")


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
  """The ids generation stops at: the tokenizer's EOS (in the chat format, the end of a turn), or none when it has
  no EOS token. What the chat session and the RL rollouts pass to the sampler as ``stop_ids``."""
  return tuple(i for i in (tokenizer.eos_id,) if i is not None)


def _find(hf: tokenizers.Tokenizer, kind: str, configured: str | None) -> int | None:
  for name in ((configured,) if configured else ()) + _KNOWN[kind]:
    i = hf.token_to_id(name)
    if i is not None:
      return i
  return None


def _read_text(path: str) -> str:
  if "://" in path and not path.startswith("file://"):
    from etils import epath
    return epath.Path(path).read_text()
  with open(path.removeprefix("file://"), encoding="utf-8") as f:
    return f.read()


def _exists(path: str) -> bool:
  if "://" in path and not path.startswith("file://"):
    from etils import epath
    return epath.Path(path).exists()
  return os.path.exists(path.removeprefix("file://"))


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a HF ``tokenizer.json`` (or a directory holding one, e.g. a JoyAI model repo checkout)."""
  file = path
  if not path.endswith(".json"):
    file = path.rstrip("/") + "/tokenizer.json"
  if not _exists(file):
    what = "does not exist" if file == path else "has no tokenizer.json"
    raise ConfigError(f"config key 'data.tokenizer': {path!r} {what}; give the path to a "
                      "Hugging Face tokenizer.json (or its directory), or '' to train one on the corpus")
  try:
    hf = tokenizers.Tokenizer.from_str(_read_text(file))
  except Exception as e:  # a JSON that tokenizers cannot parse
    raise ConfigError(f"config key 'data.tokenizer': cannot load {file!r} as a Hugging Face tokenizer.json "
                      f"({e})") from e
  names = {}
  cfg_file = file.rsplit("/", 1)[0] + "/tokenizer_config.json" if "/" in file else "tokenizer_config.json"
  if _exists(cfg_file):
    try:
      cfg = json.loads(_read_text(cfg_file))
    except ValueError:
      cfg = {}
    for kind in ("bos", "eos", "pad"):
      v = cfg.get(f"{kind}_token")
      names[kind] = v.get("content") if isinstance(v, dict) else v
  return Tokenizer(hf, bos_id=_find(hf, "bos", names.get("bos")), eos_id=_find(hf, "eos", names.get("eos")),
                   pad_id=_find(hf, "pad", names.get("pad")), origin=file)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains a byte-level BPE with ``vocab_size`` entries (fewer if the corpus runs out of merges)."""
  if vocab_size < MIN_VOCAB:
    raise ConfigError(f"config key 'data.tokenizer_vocab_size': a byte-level BPE needs at least {MIN_VOCAB} "
                      f"entries (256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  hf.train_from_iterator(texts, trainer=trainer)
  ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
  return Tokenizer(hf, bos_id=ids[0], eos_id=ids[1], pad_id=ids[2], origin="trained")


def tokenizer_cache_path(cache_dir: str, fingerprint: str, vocab_size: int) -> str:
  key = hashlib.sha256(f"{TRAINER_VERSION}|{vocab_size}|{fingerprint}".encode()).hexdigest()[:16]
  return os.path.join(cache_dir, f"tokenizer-bpe{vocab_size}-{key}.json")


def cached_train_tokenizer(texts: Callable[[], Iterable[str]], *, vocab_size: int, cache_dir: str,
                           fingerprint: str) -> Tokenizer:
  """The BPE for corpus ``fingerprint`` from ``cache_dir``, trained on ``texts()`` only if not cached."""
  path = tokenizer_cache_path(cache_dir, fingerprint, vocab_size)
  if os.path.exists(path):
    tok = load_tokenizer(path)
    tok.origin = "cache"
    return tok
  tok = train_tokenizer(texts(), vocab_size)
  tok.save(path)
  return tok


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int, *, source: str) -> None:
  """Raises ConfigError naming both keys when token ids would index past the embedding table."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ConfigError(
        f"config keys 'model.vocab_size' and {source}: the tokenizer has {tokenizer.vocab_size} tokens but "
        f"model.vocab_size={model_vocab_size}; raise model.vocab_size to at least {tokenizer.vocab_size} "
        f"or use a smaller tokenizer")
