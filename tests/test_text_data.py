"""Tiny shakespeare: download and checksum, the fixed split, tokenizers, blocks."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from diffusion.config import ConfigError, DataConfig
from diffusion.data import DatasetNotFoundError, ImageDataset, load_dataset
from diffusion.data.shakespeare import (
    SHA256,
    BPETokenizer,
    CharTokenizer,
    load_corpus,
    load_text_dataset,
    split_text,
    tokenizer_from_json,
)


@pytest.fixture(scope="module")
def root(shakespeare_root, tmp_path_factory) -> Path:
    """A data root linking the real corpus, so that the BPE cache is written to a temporary folder."""
    root = tmp_path_factory.mktemp("data")
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").symlink_to((shakespeare_root / "tinyshakespeare" / "input.txt").resolve())
    return root


@pytest.fixture(scope="module")
def text(root) -> str:
    return load_corpus(root, download=False)


def config(root: Path, **changes) -> DataConfig:
    return DataConfig(dataset="shakespeare", root=str(root), download=False, **changes)


@pytest.fixture(scope="module")
def bpe_train(root):
    return load_dataset(config(root, tokenizer="bpe", vocab_size=512), "train")


def test_char_tokenizer_round_trips_the_corpus(text):
    tokenizer = CharTokenizer.fit(text)
    assert tokenizer.vocab_size == 65
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bpe_round_trips_the_corpus_and_trains_deterministically(text, bpe_train):
    tokenizer = bpe_train.tokenizer
    assert isinstance(tokenizer, BPETokenizer) and tokenizer.vocab_size == 512
    ids = tokenizer.encode(text)
    assert max(ids) < 512 and len(ids) < len(text) / 1.5  # merges do compress
    assert tokenizer.decode(ids) == text
    odd = "  héllo,\n\n\twörld 🙂  \n"  # spaces, tabs, accents, bytes never seen in the corpus
    assert tokenizer.decode(tokenizer.encode(odd)) == odd
    prefix = text[:100_000]
    assert BPETokenizer.fit(prefix, 300).tokenizer.to_str() == BPETokenizer.fit(prefix, 300).tokenizer.to_str()


def test_bpe_needs_merges_beyond_the_bytes():
    with pytest.raises(ConfigError, match="data.vocab_size: 256"):
        BPETokenizer.fit("to be or not to be", 256)


def test_tokenizers_rebuild_from_json(text, bpe_train):
    passage = text[5000:6000]
    for tokenizer in (CharTokenizer.fit(text), bpe_train.tokenizer):
        rebuilt = tokenizer_from_json(json.loads(json.dumps(tokenizer.to_json())))  # as a checkpoint keeps it
        assert type(rebuilt) is type(tokenizer) and rebuilt.vocab_size == tokenizer.vocab_size
        assert rebuilt.encode(passage) == tokenizer.encode(passage)
        assert rebuilt.decode(tokenizer.encode(passage)) == passage


def test_split_is_disjoint_fixed_and_covers_the_corpus(text):
    train, val = split_text(text, "train", 0.1), split_text(text, "val", 0.1)
    assert train + val == text
    assert len(val) == len(text) - int(len(text) * 0.9)
    assert (train, val) == (split_text(text, "train", 0.1), split_text(text, "val", 0.1))
    with pytest.raises(ValueError, match="split 'test'"):
        split_text(text, "test", 0.1)


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_blocks_are_consecutive_windows_of_the_split(root, text, tokenizer):
    data = config(root, tokenizer=tokenizer, vocab_size=512, block_size=64)  # bpe: the cached tokenizer
    for split in ("train", "val"):
        dataset = load_text_dataset(data, split)
        part = split_text(text, split, 0.1)
        ids = dataset.tokenizer.encode(part)
        assert dataset.blocks.dtype == torch.long and dataset.blocks.shape == (len(ids) // 64, 64)
        assert dataset.blocks.flatten().tolist() == ids[: len(dataset) * 64]
        assert part.startswith(dataset.tokenizer.decode(dataset.blocks[0].tolist()))
        assert dataset.tokenizer.decode(dataset.blocks[-1].tolist()) in part
        assert dataset.chars_per_token == pytest.approx(len(part) / len(ids))
    assert torch.equal(load_text_dataset(data, "val").blocks, dataset.blocks)  # fixed: same twice
    batch = dataset.batch(torch.tensor([2, 0]), torch.device("cpu"))
    assert torch.equal(batch["tokens"], dataset.blocks[[2, 0]])
    meta = dataset.spec().to_json()
    assert dataset.spec().kind == meta["kind"] == "text" and meta["block_size"] == 64
    assert meta["vocab_size"] == dataset.tokenizer.vocab_size == (65 if tokenizer == "char" else 512)
    assert tokenizer_from_json(meta["tokenizer"]).decode(dataset.blocks[0].tolist()) == dataset.tokenizer.decode(
        dataset.blocks[0].tolist()
    )
    subset = load_text_dataset(data.model_copy(update={"subset": 3}), "val")
    assert torch.equal(subset.blocks, dataset.blocks[:3])


def test_bpe_tokenizer_is_cached_next_to_the_corpus(root, bpe_train, monkeypatch):
    assert list((root / "tinyshakespeare").glob("bpe-512-*.json"))
    monkeypatch.setattr(BPETokenizer, "fit", lambda *args: pytest.fail("retrained despite the cache"))
    again = load_dataset(config(root, tokenizer="bpe", vocab_size=512), "val")
    assert again.tokenizer.tokenizer.to_str() == bpe_train.tokenizer.tokenizer.to_str()


def test_block_size_beyond_the_split_is_one_line(root):
    # Within the field's bound (the cross-field limit is RunConfig's): the loader's own check.
    with pytest.raises(ConfigError, match=r"data.block_size: 60000 .* the val split has only \d+ tokens"):
        load_text_dataset(config(root, block_size=60_000, val_fraction=0.01), "val")


def test_missing_corpus_without_download_is_one_line(tmp_path):
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset(config(tmp_path), "train")
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "tinyshakespeare" / "input.txt") in message
    assert "data.download=true" in message


def test_download_checks_the_checksum(tmp_path):
    corrupt = tmp_path / "corrupt.txt"
    corrupt.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    root = tmp_path / "root"
    with pytest.raises(DatasetNotFoundError, match=f"sha256 .* expected {SHA256}") as error:
        load_corpus(root, download=True, url=corrupt.as_uri())
    assert "\n" not in str(error.value)
    assert list((root / "tinyshakespeare").iterdir()) == []  # neither the corpus nor a .part is left


def test_failed_download_is_one_line(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="download from .* failed") as error:
        load_corpus(tmp_path, download=True, url=(tmp_path / "nowhere.txt").as_uri())
    assert "\n" not in str(error.value)
    assert list((tmp_path / "tinyshakespeare").iterdir()) == []


def test_download_keeps_the_right_corpus(shakespeare_root, tmp_path):
    source = shakespeare_root / "tinyshakespeare" / "input.txt"
    text = load_corpus(tmp_path, download=True, url=source.resolve().as_uri())
    target = tmp_path / "tinyshakespeare" / "input.txt"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == SHA256 and len(text) == 1115394
    assert [p.name for p in target.parent.iterdir()] == ["input.txt"]


def test_image_dataset_meta():
    dataset = ImageDataset(images=torch.zeros(4, 1, 28, 28, dtype=torch.uint8), labels=torch.zeros(4), num_classes=10)
    assert dataset.spec().kind == "image"
    assert dataset.spec().to_json() == {"kind": "image", "image_shape": [1, 28, 28], "num_classes": 10}


def test_training_windows_overlap_by_the_stride_and_validation_blocks_do_not(shakespeare_root):
    data = DataConfig(dataset="shakespeare", root=str(shakespeare_root), download=False, block_size=64, block_stride=16)
    train = load_text_dataset(data, "train")
    val = load_text_dataset(data, "val")
    # A window every 16 tokens: four times as many as non-overlapping blocks, each shifted by 16.
    assert len(train) == (len(train.ids) - 64) // 16 + 1
    windows = train.batch(torch.tensor([0, 1, 2]), torch.device("cpu"))["tokens"]
    assert torch.equal(windows[1, :48], windows[0, 16:]) and torch.equal(windows[2], train.ids[32:96])
    assert len(val) == len(val.ids) // 64 and torch.equal(val.blocks.flatten(), val.ids[: len(val) * 64])
