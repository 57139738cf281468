"""Tiny Shakespeare (Karpathy's char-rnn corpus, 1.1 MB) as fixed blocks of token ids.

The corpus lives at ROOT/tinyshakespeare/input.txt and is downloaded there when missing. The split is
fixed, not random: train is the first (1 - val_fraction) of the characters, validation the rest, so
no passage is in both and every run sees the same ones. Tokens are characters or byte-level BPE.
"""

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion.config import ConfigError, DataConfig
from diffusion.data.spec import DatasetNotFoundError, DataSpec, resolve_data_root
from diffusion.records import atomic_write

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FOLDER, FILE = "tinyshakespeare", "input.txt"
SPLITS = ("train", "val")


def load_corpus(root: Path, download: bool, url: str = URL) -> str:
    """The whole corpus; downloaded (and its sha256 checked) when missing under `root` and allowed."""
    path = root / FOLDER / FILE
    if not path.is_file():
        if not download:
            raise DatasetNotFoundError(
                f"tiny shakespeare not found: expected {path}; set data.download=true, "
                f"or point data.root / $DIFFUSION_DATA_ROOT at a folder holding {FOLDER}/{FILE}"
            )
        fetch(url, path)
    return path.read_text(encoding="utf-8")


def fetch(url: str, path: Path) -> None:
    """Download to a .part file, check it, then rename: `path` never holds a partial or wrong corpus."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.name}.{os.getpid()}.part")  # per process: data-parallel ranks fetch at once
    try:
        with urllib.request.urlopen(url, timeout=60) as response, part.open("wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as exc:  # URLError, HTTPError and timeouts are all OSErrors
        part.unlink(missing_ok=True)
        raise DatasetNotFoundError(
            f"tiny shakespeare not found at {path} and the download from {url} failed ({exc}); "
            f"copy {FILE} there, or point data.root / $DIFFUSION_DATA_ROOT at a folder holding {FOLDER}/{FILE}"
        ) from None
    digest = hashlib.sha256(part.read_bytes()).hexdigest()
    if digest != SHA256:
        part.unlink()
        raise DatasetNotFoundError(
            f"tiny shakespeare downloaded from {url} has sha256 {digest}, expected {SHA256}; removed it. "
            f"Copy the right {FILE} to {path}"
        )
    part.replace(path)


def split_text(text: str, split: str, val_fraction: float) -> str:
    """train: the first (1 - val_fraction) of the characters; val: the rest. Disjoint, fixed."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: must be one of {', '.join(SPLITS)}")
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut] if split == "train" else text[cut:]


# ---------------------------------------------------------------------------------------------
# Tokenizers: one interface (vocab_size, encode, decode, to_json), rebuilt by tokenizer_from_json


class CharTokenizer:
    """One token per character: the sorted characters of the text it was fitted on."""

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def fit(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> dict:
        return {"type": "char", "chars": self.chars}


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) from HuggingFace `tokenizers`: any text encodes, and decoding
    gives back exactly the text encoded. Training is deterministic for a given text and vocab_size."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer

    @classmethod
    def fit(cls, text: str, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # heavy; only for BPE

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size <= len(alphabet):
            raise ConfigError(
                f"data.vocab_size: {vocab_size} is not allowed with data.tokenizer 'bpe': "
                f"must be more than the {len(alphabet)} byte tokens"
            )
        tokenizer = Tokenizer(models.BPE())
        # No prefix space: decoding would give it back, and the text would not round-trip.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
        tokenizer.train_from_iterator([text], trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_str(cls, text: str) -> "BPETokenizer":
        from tokenizers import Tokenizer  # heavy; only for BPE

        return cls(Tokenizer.from_str(text))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()  # may be below the requested size when merges run out

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def to_json(self) -> dict:
        return {"type": "bpe", "tokenizer": json.loads(self.tokenizer.to_str())}


TextTokenizer = CharTokenizer | BPETokenizer


def tokenizer_from_json(d: dict) -> TextTokenizer:
    """The tokenizer a checkpoint carries, so that sampling decodes without the corpus."""
    if d["type"] == "char":
        return CharTokenizer(d["chars"])
    if d["type"] == "bpe":
        return BPETokenizer.from_str(json.dumps(d["tokenizer"]))
    raise ValueError(f"tokenizer type {d['type']!r}: must be char or bpe")


def fit_tokenizer(config: DataConfig, text: str, folder: Path) -> TextTokenizer:
    """The run's tokenizer, the same for both splits.

    char: fitted on the whole corpus, so that validation never meets a character the tokenizer lacks
    (with val_fraction 0.45, '$' occurs only in the last part). That leaks only the set of 65 symbols,
    no statistics. bpe: trained on the train split only, since its merges are statistics of the text;
    cached in `folder` by vocab_size and the train split's hash, so repeated runs don't retrain.
    """
    if config.tokenizer == "char":
        return CharTokenizer.fit(text)
    train_text = split_text(text, "train", config.val_fraction)
    digest = hashlib.sha256(train_text.encode()).hexdigest()[:16]
    cache = folder / f"bpe-{config.vocab_size}-{digest}.json"
    if cache.is_file():
        return BPETokenizer.from_str(cache.read_text())
    tokenizer = BPETokenizer.fit(train_text, config.vocab_size)
    if os.access(folder, os.W_OK):  # only a cache: a read-only data root retrains each run
        atomic_write(cache, tokenizer.tokenizer.to_str().encode())
    return tokenizer


# ---------------------------------------------------------------------------------------------
# The dataset


@dataclass
class TextDataset:
    """Windows of block_size tokens of one split's token stream, starting every `stride` tokens:
    stride = block_size gives non-overlapping consecutive blocks (validation always), a smaller
    stride overlapping ones, so that training does not see the same few thousand blocks, with the
    same boundaries, every epoch (a 6-layer model memorises them). The windows are fixed; the trainer
    shuffles them by a seeded permutation each epoch, which keeps an epoch well defined and
    resuming exact. Windows are cut when batched: a stride of 1 costs no memory."""

    ids: torch.Tensor  # int64, (T,): the split, tokenized
    starts: torch.Tensor  # int64, (N,): where each window starts in ids
    block_size: int
    tokenizer: TextTokenizer
    chars_per_token: float  # of the whole split: bits per character = bits per token / chars_per_token

    def __len__(self) -> int:
        return len(self.starts)

    def windows(self, starts: torch.Tensor) -> torch.Tensor:
        return self.ids[starts[:, None] + torch.arange(self.block_size)]

    @property
    def blocks(self) -> torch.Tensor:
        """Every window, (N, block_size): for validation sets, whose blocks do not overlap."""
        return self.windows(self.starts)

    def batch(self, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {"tokens": self.windows(self.starts[indices]).to(device)}

    def spec(self) -> DataSpec:
        return DataSpec(
            "text",
            (self.block_size,),
            vocab_size=self.tokenizer.vocab_size,
            tokenizer=self.tokenizer.to_json(),
            chars_per_token=self.chars_per_token,
        )


def load_text_dataset(config: DataConfig, split: str) -> TextDataset:
    """Split 'train' or 'val' of tiny shakespeare, tokenized as config says, in windows (the training
    split's every `block_stride` tokens); `subset` keeps the first N windows."""
    root = resolve_data_root(config.root)
    text = load_corpus(root, config.download)
    tokenizer = fit_tokenizer(config, text, root / FOLDER)
    part = split_text(text, split, config.val_fraction)
    ids = torch.tensor(tokenizer.encode(part), dtype=torch.long)
    if len(ids) < config.block_size:
        raise ConfigError(
            f"data.block_size: {config.block_size} is not allowed: the {split} split has only {len(ids)} tokens"
        )
    stride = config.block_stride if split == "train" and config.block_stride else config.block_size
    starts = torch.arange(0, len(ids) - config.block_size + 1, stride)
    if config.subset is not None:
        starts = starts[: config.subset]
    return TextDataset(
        ids=ids, starts=starts, block_size=config.block_size, tokenizer=tokenizer, chars_per_token=len(part) / len(ids)
    )
