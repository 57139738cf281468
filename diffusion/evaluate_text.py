"""Text runs: generate and decode samples, and score them honestly.

- validation bits per character: the exact NLL for the autoregressive model, and for the two
  diffusion models their variational bound (masked: the continuous-time ELBO; embedding: prior +
  diffusion terms + the rounding decoder), so all three compare directly and a bound can only
  flatter the AR model;
- the samples' perplexity under an autoregressive scorer (`eval.scorer_checkpoint`);
- distinct-1/2/3, the longest repeated n-gram's share, the most frequent token's share, and the
  collapse detector's verdict (diffusion/text_metrics.py).
"""

import json
import math
import time
from pathlib import Path

import torch

from diffusion.config import ConfigError, RunConfig, SampleConfig
from diffusion.data.shakespeare import tokenizer_from_json
from diffusion.records import Summary, atomic_write, write_json
from diffusion.text_metrics import collapse, text_scores

SAMPLE_RULE = "-" * 72


def sampling_options(method_name: str, sample: SampleConfig) -> dict:
    """The SampleConfig fields each text method's `sample` takes."""
    if method_name == "autoregressive":
        return {"temperature": sample.temperature, "top_k": sample.top_k}
    if method_name == "masked":
        return {"num_inference_steps": sample.num_inference_steps, "temperature": sample.temperature,
                "top_k": sample.top_k, "block_length": sample.block_length}
    return {"sampler": sample.sampler, "num_inference_steps": sample.num_inference_steps, "eta": sample.eta,
            "timestep_spacing": sample.timestep_spacing, "clamp": sample.clamp}


@torch.no_grad()
def generate_text(method, model, meta: dict, sample: SampleConfig, num_samples: int, device,
                  guide=None, progress: bool = False) -> list[str]:
    """`num_samples` decoded samples of `sample.length` tokens (the block size by default), seeded by
    `sample.seed`. `guide` (a TrainedModel of an autoregressive run) mixes its logits in, with weight
    1 - `sample.guidance_alpha`."""
    tokenizer = tokenizer_from_json(meta["tokenizer"])
    length = sample.length or meta["block_size"]
    generator = torch.Generator().manual_seed(sample.seed)
    model.eval()
    if guide is None:
        tokens = method.sample(model, num_samples, length, generator, device, progress=progress,
                               **sampling_options(method.name, sample))
    else:
        from diffusion.methods.guided import guided_sample

        tokens = guided_sample(guide.method, guide.model, method, model, num_samples, length, sample.guidance_alpha,
                               generator, device, greedy=False, temperature=sample.temperature, top_k=sample.top_k,
                               progress=progress)
    return [tokenizer.decode(row) for row in tokens.tolist()]


def save_text_samples(texts: list[str], path: Path) -> Path:
    """One file a person reads: the samples, each under a numbered rule."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"{SAMPLE_RULE} sample {index}\n{text}\n" for index, text in enumerate(texts))
    atomic_write(path, body.encode())
    return path


@torch.no_grad()
def validation_bits_per_char(method, model, validation, device, num_blocks: int, seed: int) -> float:
    """Bits per token on the first `num_blocks` validation blocks, over characters per token."""
    generator = torch.Generator().manual_seed(seed)
    tokens = validation.blocks[:num_blocks].to(device)
    model.eval()
    return method.bits_per_token(model, tokens, generator) / validation.chars_per_token


@torch.no_grad()
def scorer_perplexity(scorer, texts: list[str], device) -> float:
    """Perplexity per character of the samples under an autoregressive run (a TrainedModel)."""
    tokenizer = tokenizer_from_json(scorer.meta["tokenizer"])
    block = scorer.meta["block_size"]
    encoded = [tokenizer.encode(text)[:block] for text in texts]
    length = min(len(ids) for ids in encoded)
    if length < 2:
        return math.inf  # empty samples: as bad as it gets
    tokens = torch.tensor([ids[:length] for ids in encoded], device=device)
    characters = sum(len(tokenizer.decode(ids[:length])) for ids in encoded)
    bits_per_token = scorer.method.bits_per_token(scorer.model, tokens, torch.Generator().manual_seed(0))
    return 2 ** (bits_per_token * tokens.numel() / characters)


def evaluate_text(method, model, meta: dict, validation, texts: list[str], device, seed: int = 0,
                  num_blocks: int = 64, scorer=None) -> dict:
    """The scores of a text model and its samples; `collapsed` lists what looks degenerate."""
    scores = {"val_bits_per_char": validation_bits_per_char(method, model, validation, device, num_blocks, seed)}
    scores |= text_scores(texts)
    if scorer is not None:
        scores["ar_perplexity"] = scorer_perplexity(scorer, texts, device)
    scores["collapsed"] = collapse(scores)
    return scores


def load_scorer(reference: str | None, device, key: str = "eval.scorer_checkpoint", tokenizer: dict | None = None):
    """The autoregressive run that scores text samples, or guides their decoding (key
    sample.guide_checkpoint, which must share the sampled run's `tokenizer`); None without a
    reference. ConfigError naming `key` when it is missing or will not do."""
    from diffusion.sample import TrainedModel, resolve_checkpoint

    if reference is None:
        return None
    scorer = TrainedModel(resolve_checkpoint(reference, key), use_ema=True, device=device)
    if scorer.config.method.name != "autoregressive":
        raise ConfigError(f"{key}: {reference!r} is not allowed: not an autoregressive run (method.name "
                          f"{scorer.config.method.name!r}); text is scored and guided by an autoregressive run")
    if tokenizer is not None and scorer.meta["tokenizer"] != tokenizer:
        raise ConfigError(f"{key}: {reference!r} is not allowed: its tokenizer differs from the sampled run's; "
                          "guide with an autoregressive run trained on the same data settings")
    return scorer


def sample_name(config: RunConfig) -> str:
    sample = config.sample
    guide = f"-alpha{sample.guidance_alpha:g}" if sample.guide_checkpoint else ""
    steps = "" if config.method.name == "autoregressive" else str(sample.num_inference_steps)
    return f"{sample.sampler}{steps}{guide}-t{sample.temperature:g}-seed{sample.seed}"


def text_sample_task(config: RunConfig, trained, run) -> int:
    """`python -m diffusion sample` for a text run: samples (optionally AR-guided) and their scores."""
    from diffusion.data import load_dataset

    guide = load_scorer(config.sample.guide_checkpoint, trained.device, "sample.guide_checkpoint",
                        tokenizer=trained.meta["tokenizer"])
    scorer = load_scorer(config.eval.scorer_checkpoint, trained.device) or guide
    if not run.in_place:
        run.create(config)  # after every reference was found: a bad one writes nothing
    validation = load_dataset(trained.config.data, "val")
    started = time.monotonic()
    texts = generate_text(trained.method, trained.model, trained.meta, config.sample, config.sample.num_samples,
                          trained.device, guide=guide, progress=True)
    seconds = time.monotonic() - started
    name = sample_name(trained.config.model_copy(update={"sample": config.sample}))
    path = save_text_samples(texts, run.samples / f"{name}.txt")
    scores = evaluate_text(trained.method, trained.model, trained.meta, validation, texts, trained.device,
                           config.sample.seed, config.eval.val_blocks, scorer)
    record = {"checkpoint": str(trained.path), "step": trained.step, "num_samples": len(texts),
              "sample_seconds": round(seconds, 2), "guidance_alpha": config.sample.guidance_alpha if guide else None,
              "scores": scores, "samples": str(path)}
    run.eval.mkdir(exist_ok=True)
    write_json(run.eval / f"{name}.json", record)
    result = {key: value for key, value in record.items() if key not in ("step", "scores")}
    run.write_record(Summary(status="completed", step=trained.step, scores=scores,
                             collapsed=bool(scores["collapsed"]), result=result))
    print(json.dumps(scores, indent=2))
    print(f"{len(texts)} samples from {trained.path} (step {trained.step}) -> {path}", flush=True)
    return 0
