"""Text methods on a synthetic corpus: the Transformer, autoregressive, masked (MDLM) and embedding
(Diffusion-LM) diffusion, guided decoding, the sqrt schedule. Tiny models, CPU, seconds each."""

import math
from types import SimpleNamespace

import pytest
import torch

from diffusion.config import MethodConfig, RunConfig
from diffusion.data import DataSpec
from diffusion.methods import Parent, build_method
from diffusion.methods.autoregressive import Autoregressive
from diffusion.methods.ddpm import DDPM
from diffusion.methods.embedding import EmbeddingDiffusion
from diffusion.methods.guided import guided_sample
from diffusion.methods.masked import MaskedDiffusion
from diffusion.nets.transformer import Transformer, rotary_tables, rotate
from diffusion.schedulers import NoiseSchedule

V, L = 65, 16
META = DataSpec("text", (L,), vocab_size=V)
TINY = SimpleNamespace(n_layer=2, n_head=2, n_embd=32, dropout=0.0, positions="rotary")
# The corpus: one fixed cycle of 8 tokens, each sequence starting at a random phase.
PATTERN = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:8]


def toy_batch(n: int, generator: torch.Generator, length: int = L) -> torch.Tensor:
    phase = torch.randint(0, len(PATTERN), (n, 1), generator=generator)
    return PATTERN[(phase + torch.arange(length)) % len(PATTERN)]


def train(method, model, steps: int, lr: float = 3e-3, callback=None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        loss = method.loss(model, {"tokens": toy_batch(32, generator)})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if callback:
            callback(step)
    return model


def embedding_method(**kwargs) -> EmbeddingDiffusion:
    return EmbeddingDiffusion(num_train_timesteps=200, beta_schedule="sqrt", embedding_dim=16, **kwargs)


class Raises(torch.nn.Module):
    """A model that must not be called."""

    block_size = L

    def forward(self, *args, **kwargs):
        raise AssertionError("this model must not be called")


# --- the Transformer -----------------------------------------------------------------------------


def test_transformer_shapes_for_tokens_and_vectors():
    torch.manual_seed(0)
    net = Transformer(vocab_size=V + 1, block_size=L, n_layer=2, n_head=2, n_embd=32, out_dim=V)
    assert net(torch.randint(0, V + 1, (3, L))).shape == (3, L, V)
    assert net(torch.randint(0, V + 1, (3, 5))).shape == (3, 5, V)  # shorter than the block
    with pytest.raises(AssertionError):
        net(torch.randint(0, V, (1, L + 1)))

    net = Transformer(
        vocab_size=None, block_size=L, n_layer=2, n_head=2, n_embd=32, in_dim=8, out_dim=8, time_conditioning=True
    )
    x = torch.randn(3, L, 8)
    out = net(x, torch.tensor([0, 10, 999]))
    assert out.shape == (3, L, 8)
    # The conditioning reaches the output: the same x at another timestep gives another output.
    assert not torch.allclose(out, net(x, torch.tensor([500, 10, 999])))
    torch.testing.assert_close(out[1:], net(x, torch.tensor([500, 10, 999]))[1:])
    assert net(x, torch.rand(3)).shape == (3, L, 8)  # float timesteps too


@pytest.mark.parametrize("causal", [True, False])
def test_causal_attention_sees_only_the_past(causal):
    torch.manual_seed(0)
    net = Transformer(vocab_size=V, block_size=L, n_layer=2, n_head=2, n_embd=32, causal=causal).eval()
    tokens = torch.randint(0, V, (2, L))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % V
    before, after = net(tokens), net(changed)
    assert not torch.allclose(before[:, 10:], after[:, 10:])
    if causal:
        torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(before[:, :10], after[:, :10])


def test_rotary_attention_scores_depend_only_on_the_offset():
    head_size = 8
    q, k = torch.randn(2, head_size, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary_tables(L, head_size)
    # The same query and key at every position, rotated by position: scores[i, j] = q_i . k_j.
    scores = (
        rotate(q.expand(1, 1, L, head_size), cos, sin)[0, 0] @ rotate(k.expand(1, 1, L, head_size), cos, sin)[0, 0].T
    )
    for offset in range(-3, 4):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), rtol=0, atol=1e-5)
    # ...and do depend on it: a neighbour scores differently from a token three away.
    assert abs(scores[5, 4] - scores[5, 2]) > 1e-3


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_positions_learned_or_rotary(positions):
    torch.manual_seed(0)
    net = Transformer(vocab_size=V, block_size=L, n_layer=1, n_head=2, n_embd=32, positions=positions)
    # Rotary tables are derived, not saved: a checkpoint holds parameters only.
    assert ("wpe.weight" in net.state_dict()) == (positions == "learned")
    assert not any("rotary" in key for key in net.state_dict())
    # Order matters either way (without positions, attention sees a bag of tokens): swapping two
    # other tokens changes the output at position 4.
    tokens = torch.arange(L)[None]
    swapped = tokens.clone()
    swapped[0, [2, 9]] = swapped[0, [9, 2]]
    assert not torch.allclose(net(tokens)[0, 4], net(swapped)[0, 4])
    with pytest.raises(ValueError, match="positions='absolute'"):
        Transformer(vocab_size=V, block_size=L, n_layer=1, n_head=2, n_embd=32, positions="absolute")


# --- schedules and build_method ------------------------------------------------------------------


def test_transformer_takes_one_timestep_per_sequence_or_per_position():
    torch.manual_seed(0)
    net = Transformer(None, L, 2, 2, 32, in_dim=8, out_dim=8, time_conditioning=True).eval()
    x = torch.randn(3, L, 8)
    per_sequence = net(x, torch.tensor([5, 90, 5]))
    per_position = net(x, torch.tensor([5, 90, 5])[:, None].expand(3, L))
    torch.testing.assert_close(per_position, per_sequence)
    mixed = torch.full((3, L), 90)
    mixed[:, :4] = 0
    assert not torch.allclose(net(x, mixed), net(x, torch.full((3,), 90)))


def test_sqrt_schedule_is_diffusion_lms():
    T, s = 1000, 1e-4
    alphas_cumprod = NoiseSchedule(T, "sqrt").alphas_cumprod
    assert alphas_cumprod[0] > 0.97 and alphas_cumprod[-1] < 1e-5
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    # alphas_cumprod[t] is alpha_bar after t + 1 steps, relative to alpha_bar(0) = 1 - sqrt(s).
    for t in [0, 1, 10, 100, 500, 900, 990]:
        expected = (1 - math.sqrt((t + 1) / T + s)) / (1 - math.sqrt(s))
        assert alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-9)


def test_build_method_dispatches_on_name():
    ddpm = build_method(MethodConfig(embedding_dim=8, rounding_weight=3.0))  # text fields don't reach DDPM
    assert isinstance(ddpm, DDPM)
    assert isinstance(build_method(MethodConfig(name="autoregressive")), Autoregressive)
    assert isinstance(build_method(MethodConfig(name="masked")), MaskedDiffusion)
    embedding = build_method(
        MethodConfig(
            name="embedding", beta_schedule="sqrt", num_train_timesteps=100, embedding_dim=8, rounding_weight=0.5
        )
    )
    assert isinstance(embedding, EmbeddingDiffusion)
    assert (embedding.embedding_dim, embedding.rounding_weight, embedding.num_train_timesteps) == (8, 0.5, 100)
    assert embedding.schedule.alphas_cumprod[-1] < 1e-4


# --- autoregressive ------------------------------------------------------------------------------


def test_autoregressive_nll_equals_the_product_of_its_next_token_probabilities():
    # Training and decoding must window the sequence alike (BOS first): the exact NLL of a
    # sequence is the sum of -log p(next token) over a left-to-right pass with next_token_logits.
    method = Autoregressive()
    torch.manual_seed(0)
    model = train(method, method.build_model(TINY, META), 100).eval()
    # Random tokens, where every bit of context changes the prediction.
    tokens = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(5))
    nll = 0.0
    for i in range(L):
        logits = method.next_token_logits(model, tokens[:, :i], L, None)
        nll -= torch.log_softmax(logits, dim=-1).gather(1, tokens[:, i : i + 1]).sum().item()
    assert method.bits_per_token(model, tokens, None) == pytest.approx(nll / (4 * L) / math.log(2), rel=1e-4)
    assert method.bits_per_token(model, toy_batch(4, torch.Generator().manual_seed(5)), None) < 1.0  # learned the cycle
    greedy = method.generate(model, 2, 3 * L, None, greedy=True)  # longer than the window
    start = (PATTERN == greedy[0, 0]).nonzero().item()
    assert greedy[0].tolist() == PATTERN[(start + torch.arange(3 * L)) % 8].tolist()


# --- masked diffusion ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_masked():
    method = MaskedDiffusion()
    torch.manual_seed(0)
    model = method.build_model(TINY, META)
    val = toy_batch(32, torch.Generator().manual_seed(123))
    initial_bits = method.bits_per_token(model, val, torch.Generator().manual_seed(0))
    train(method, model, 300)
    return method, model.eval(), val, initial_bits


def test_masked_bits_per_token_starts_at_log2_vocab_and_falls(trained_masked):
    method, model, val, initial_bits = trained_masked
    assert abs(initial_bits - math.log2(V)) < 0.3
    bits = method.bits_per_token(model, val, torch.Generator().manual_seed(0))
    assert bits < math.log2(V) - 2.5  # at least the 8 tokens of the cycle are learned
    # Stable: another draw of the masks agrees closely.
    assert bits == pytest.approx(method.bits_per_token(model, val, torch.Generator().manual_seed(1)), abs=0.05)


def test_masked_bits_per_token_estimates_the_training_nelbo(trained_masked):
    # bits_per_token integrates t out analytically; the training loss samples t. Same NELBO.
    method, model, val, _ = trained_masked
    with torch.no_grad():
        losses = []
        for seed in range(100):
            torch.manual_seed(seed)
            losses.append(method.loss(model, {"tokens": val}).item())
    losses = torch.tensor(losses) / math.log(2)
    bits = method.bits_per_token(model, val, torch.Generator().manual_seed(0), num_draws=32)
    assert abs(losses.mean().item() - bits) < 4 * losses.std().item() / 10 + 0.02


@pytest.mark.parametrize("block_length", [None, 4, 6])
def test_masked_sampler_returns_only_real_tokens(trained_masked, block_length):
    method, model, _, _ = trained_masked
    length = L if block_length is None else 2 * L + 3  # longer than the window, with a ragged last block
    samples = method.generate(
        model,
        5,
        length,
        torch.Generator().manual_seed(0),
        num_inference_steps=4,
        block_length=block_length,
        temperature=0.8,
        top_k=10,
    )
    assert samples.shape == (5, length) and samples.dtype == torch.long
    assert samples.min() >= 0 and samples.max() < V  # never the mask id V
    # Seeded: the same generator seed gives the same samples.
    again = method.generate(
        model,
        5,
        length,
        torch.Generator().manual_seed(0),
        num_inference_steps=4,
        block_length=block_length,
        temperature=0.8,
        top_k=10,
    )
    assert torch.equal(samples, again)


def test_masked_sampler_untrained_model_single_step_unmasks_everything():
    method = MaskedDiffusion()
    torch.manual_seed(0)
    model = method.build_model(TINY, META)
    samples = method.generate(model, 8, L, torch.Generator().manual_seed(0), num_inference_steps=1)
    assert samples.max() < V and samples.min() >= 0
    with pytest.raises(ValueError, match="block_length"):
        method.generate(model, 1, L + 1, None)


# --- embedding diffusion -------------------------------------------------------------------------


def embedding_spread(model) -> float:
    """Mean distance between the cycle's tokens' embeddings, relative to their norm."""
    embeddings = model.embeddings()[PATTERN]
    return torch.cdist(embeddings, embeddings).sum().item() / (8 * 7) / embeddings.norm(dim=-1).mean().item()


def test_embeddings_keep_their_scale_and_stay_apart():
    norms, spreads = {}, {}
    for rounding_weight in (1.0, 0.0):
        method = embedding_method(rounding_weight=rounding_weight)
        torch.manual_seed(0)
        model = method.build_model(TINY, META)
        initial_norm, initial_spread = method.embedding_norm(model), embedding_spread(model)
        assert 1.2 < method.embedding_spread(model) < 1.5  # random rows: nearly orthogonal, about sqrt(2)
        history = []
        train(method, model, 300, lr=1e-2, callback=lambda step: history.append(method.embedding_norm(model)))
        norms[rounding_weight] = [norm / initial_norm for norm in history]
        spreads[rounding_weight] = embedding_spread(model) / initial_spread
    # The normalisation holds the scale throughout (exactly sqrt(embedding_dim) per row).
    assert initial_norm == pytest.approx(4.0)
    assert all(0.5 < ratio < 2.0 for ratio in norms[1.0] + norms[0.0])
    # The MSE alone collapses the embeddings onto one point (denoising made trivial); the rounding
    # cross-entropy on the predicted x0 keeps them apart.
    assert spreads[0.0] < 0.2
    assert spreads[1.0] > 0.7


def test_rounding_loss_is_on_the_predicted_x0():
    method = embedding_method()
    torch.manual_seed(0)
    model = method.build_model(TINY, META)
    terms = method.loss_terms(model, {"tokens": toy_batch(8, torch.Generator().manual_seed(0))})
    terms["rounding"].backward()
    # On the clean embeddings the rounding term would not reach the denoiser at all.
    denoiser_grad = sum(p.grad.abs().sum() for p in model.denoiser.parameters() if p.grad is not None)
    assert denoiser_grad > 0
    assert model.embedding.weight.grad.abs().sum() > 0


def test_pretrained_embeddings_go_through_a_learned_projection():
    method = embedding_method()
    pretrained = torch.randn(V + 1, 24)  # an AR run's table: the vocabulary and its start token
    ar_run = RunConfig.model_validate(
        {
            "data": {"dataset": "shakespeare"},
            "model": {"name": "transformer", "n_embd": 24, "n_head": 2},
            "method": {"name": "autoregressive"},
        }
    )
    model = method.build_model(TINY, META, Parent(ar_run, META, {"wte.weight": pretrained}, {}))
    assert torch.equal(model.pretrained, pretrained[:V])
    # Without weights (a checkpoint of this run will hold them): a table of the same shape.
    assert method.build_model(TINY, META, Parent(ar_run, META, None, {})).pretrained.shape == (V, 24)
    assert model.embeddings().shape == (V, 16)
    torch.testing.assert_close(model.embeddings().norm(dim=-1), torch.full((V,), 4.0))
    method.loss(model, {"tokens": toy_batch(8, torch.Generator().manual_seed(0))}).backward()
    assert model.projection.weight.grad is not None and model.projection.weight.grad.abs().sum() > 0
    assert "pretrained" not in dict(model.named_parameters())  # the pretrained table itself is fixed


@pytest.mark.parametrize("sampler,clamp", [("ddim", True), ("ddpm", False)])
def test_embedding_sampler_and_bound(sampler, clamp):
    method = embedding_method()
    torch.manual_seed(0)
    model = train(method, method.build_model(TINY, META), 100, lr=1e-2).eval()
    samples = method.generate(
        model, 4, L, torch.Generator().manual_seed(0), sampler=sampler, num_inference_steps=10, eta=0.5, clamp=clamp
    )
    assert samples.shape == (4, L) and samples.min() >= 0 and samples.max() < V
    assert torch.equal(
        samples,
        method.generate(
            model, 4, L, torch.Generator().manual_seed(0), sampler=sampler, num_inference_steps=10, eta=0.5, clamp=clamp
        ),
    )
    val = toy_batch(16, torch.Generator().manual_seed(123))
    bits = method.bits_per_token(model, val, torch.Generator().manual_seed(0))
    untrained = method.build_model(TINY, META)
    assert 0 < bits < method.bits_per_token(untrained, val, torch.Generator().manual_seed(0))
    assert bits == pytest.approx(method.bits_per_token(model, val, torch.Generator().manual_seed(1)), rel=0.1)


def test_embedding_model_learns_to_continue_a_given_prefix():
    # The next token of the cycle, from one pass with the prefix at timestep 0 and noise after it.
    method = embedding_method()
    torch.manual_seed(0)
    model = train(method, method.build_model(TINY, META), 300).eval()
    tokens = toy_batch(64, torch.Generator().manual_seed(5))
    for P in (3, 8, 15):
        logits = method.next_token_logits(model, tokens[:, :P], L, torch.Generator().manual_seed(0))
        assert (logits.argmax(dim=-1) == tokens[:, P]).float().mean() > 0.75  # chance: 1/65


def test_embedding_training_gives_prefixes_at_timestep_zero():
    # With every sequence given a prefix, the denoiser sees timestep 0 on 1 to L - 1 leading
    # positions of each sequence and one drawn timestep on the rest.
    method = embedding_method(prefix_fraction=1.0)
    torch.manual_seed(0)
    model = method.build_model(TINY, META)
    seen = []
    model.denoiser.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    method.loss(model, {"tokens": toy_batch(64, torch.Generator().manual_seed(0))})
    timesteps = seen[0]
    assert timesteps.shape == (64, L)
    prefix_lengths = (timesteps == 0).long().cumprod(dim=1).sum(dim=1)
    assert prefix_lengths.min() >= 1 and prefix_lengths.max() <= L - 1 and len(prefix_lengths.unique()) > 5
    rest = torch.arange(L)[None, :] >= prefix_lengths[:, None]
    drawn = timesteps.gather(1, prefix_lengths[:, None])
    assert torch.equal(torch.where(rest, timesteps, drawn), drawn.expand(-1, L))  # one timestep on the rest
    # None given: one timestep per sequence, as in plain Diffusion-LM.
    method = embedding_method(prefix_fraction=0.0)
    seen.clear()
    method.loss(model, {"tokens": toy_batch(64, torch.Generator().manual_seed(0))})
    assert seen[0].shape == (64,)


def test_guided_decoding_needs_an_embedding_model_trained_on_prefixes():
    from diffusion.config import ConfigError

    method = embedding_method(prefix_fraction=0.0)
    model = method.build_model(TINY, META).eval()
    with pytest.raises(ConfigError, match=r"method.prefix_fraction: 0 is not allowed"):
        method.next_token_logits(model, torch.zeros((2, 3), dtype=torch.long), L, None)


# --- data parallel -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method", [Autoregressive(), MaskedDiffusion(), embedding_method()], ids=["autoregressive", "masked", "embedding"]
)
def test_shard_losses_consume_the_full_batchs_random_numbers(method):
    torch.manual_seed(0)
    model = method.build_model(TINY, META)
    batch = {"tokens": toy_batch(8, torch.Generator().manual_seed(0))}
    torch.manual_seed(42)
    full = method.loss(model, batch)
    shards = []
    for shard in (slice(0, 4), slice(4, 8)):
        torch.manual_seed(42)  # every rank starts from the same RNG state
        shards.append(method.loss(model, batch, shard))
    assert (shards[0] + shards[1]).item() / 2 == pytest.approx(full.item(), abs=1e-6)
    assert shards[0].item() != pytest.approx(shards[1].item(), abs=1e-6)  # different halves of the batch


# --- guided generation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ar_pair():
    method = Autoregressive()
    torch.manual_seed(1)
    return method, train(method, method.build_model(TINY, META), 30).eval()


def test_guided_alpha_zero_is_autoregressive_greedy(ar_pair):
    ar_method, ar_model = ar_pair
    guided = guided_sample(
        ar_method, ar_model, MaskedDiffusion(), Raises(), 3, 20, 0.0, torch.Generator().manual_seed(0)
    )
    assert torch.equal(guided, ar_method.generate(ar_model, 3, 20, None, greedy=True))


@pytest.mark.parametrize("diffusion_method", [MaskedDiffusion(), embedding_method()], ids=["masked", "embedding"])
def test_guided_alpha_one_never_calls_the_autoregressive_model(diffusion_method):
    torch.manual_seed(0)
    model = diffusion_method.build_model(TINY, META).eval()
    length = 6
    guided = guided_sample(
        Autoregressive(), Raises(), diffusion_method, model, 3, length, 1.0, torch.Generator().manual_seed(0)
    )
    # The diffusion method's own greedy left-to-right choice, with the same generator.
    generator = torch.Generator().manual_seed(0)
    tokens = torch.empty((3, 0), dtype=torch.long)
    for _ in range(length):
        logits = diffusion_method.next_token_logits(model, tokens, length, generator)
        assert logits.shape == (3, V)
        tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(guided, tokens)


def test_guided_mixes_log_probabilities(ar_pair):
    ar_method, ar_model = ar_pair
    masked = MaskedDiffusion()
    torch.manual_seed(0)
    masked_model = masked.build_model(TINY, META).eval()
    first = guided_sample(ar_method, ar_model, masked, masked_model, 4, 5, 0.3, None)[:, 0]
    empty = torch.empty((4, 0), dtype=torch.long)
    masked_logits = masked.next_token_logits(masked_model, empty, 5, None)
    ar_logits = ar_method.next_token_logits(ar_model, empty, 5, None)
    mixed = 0.3 * torch.log_softmax(masked_logits, -1) + 0.7 * torch.log_softmax(ar_logits, -1)
    assert torch.equal(first, mixed.argmax(dim=-1))
