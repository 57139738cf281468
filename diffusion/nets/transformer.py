"""A GPT-style Transformer for text, in the manner of nanoGPT's model.py.

It knows nothing about diffusion: it maps tokens (B, L) or vectors (B, L, in_dim), plus optional
timestep-like conditioning, to (B, L, out_dim) outputs. Causal or bidirectional attention,
pre-LayerNorm blocks, and positions either learned (GPT-2: a table added to the input) or rotary
(RoFormer, Su et al. 2021: queries and keys rotated by an angle proportional to their position, so
that attention scores depend on the offset between two tokens).

Rotary matters for a bidirectional model of masked text. A causal model reads the current token in
its own residual stream, so bigram statistics come for free; a mask token carries nothing, and
everything the model knows about it must come through attention to its neighbours. With learned
absolute positions that starts at noise level and took masked diffusion ~800 steps of unigram-level
loss to discover; with rotary, "look one to the left" is a fixed direction from the first step.

Time conditioning: a sinusoidal embedding of `timesteps` (any float or integer scale) through an
MLP, added to the input: one value per sequence (B,), or one per position (B, L) for a sequence
whose parts sit at different noise levels (a given prefix and a noisy rest). Simpler than adaLN and
enough for a denoiser whose input already carries the noise level.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.nets.layers import timestep_embedding


def rotary_tables(block_size: int, head_size: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin, each (block_size, head_size / 2): the angle of position p in frequency band i
    is p / base^(2i / head_size)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[..., i], x[..., i + half]) of x (B, n_head, L, head_size) by its angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, causal: bool):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_head={n_head} must divide n_embd={n_embd}")
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head = n_head
        self.dropout = dropout
        self.causal = causal

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None) -> Tensor:
        B, L, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, L, C) -> (B, n_head, L, head_size)
        q, k, v = (z.view(B, L, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal
        )
        y = y.transpose(1, 2).contiguous().view(B, L, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, causal: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout, causal)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), rotary)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(
        self,
        vocab_size: int | None,
        block_size: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float = 0.0,
        causal: bool = False,
        in_dim: int | None = None,
        out_dim: int | None = None,
        time_conditioning: bool = False,
        positions: str = "rotary",
    ):
        super().__init__()
        if in_dim is None and vocab_size is None:
            raise ValueError("give vocab_size (token input) or in_dim (vector input)")
        if out_dim is None and vocab_size is None:
            raise ValueError("give out_dim or vocab_size (the output size)")
        if positions not in ("learned", "rotary"):
            raise ValueError(f"positions={positions!r}: must be 'learned' or 'rotary'")
        if positions == "rotary" and (n_embd // n_head) % 2:
            raise ValueError(f"rotary positions need an even head size, got n_embd / n_head = {n_embd // n_head}")
        self.block_size = block_size
        self.n_embd = n_embd
        # Vectors come in through a Linear; otherwise tokens through their own embedding table.
        self.wte = nn.Linear(in_dim, n_embd) if in_dim is not None else nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd) if positions == "learned" else None
        if positions == "rotary":
            # Not parameters and not saved: derived from the shape, like the causal mask.
            cos, sin = rotary_tables(block_size, n_embd // n_head)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.time_mlp = (
            nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.SiLU(), nn.Linear(4 * n_embd, n_embd))
            if time_conditioning
            else None
        )
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout, causal) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, out_dim if out_dim is not None else vocab_size)

        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), so that the residual
        # stream's variance does not grow with depth at initialisation.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, x: Tensor, timesteps: Tensor | None = None) -> Tensor:
        L = x.shape[1]
        assert L <= self.block_size, f"cannot forward a sequence of length {L}, block size is {self.block_size}"
        h = self.wte(x)
        rotary = None
        if self.wpe is not None:
            h = h + self.wpe.weight[:L]
        else:
            rotary = (self.rotary_cos[:L], self.rotary_sin[:L])
        if self.time_mlp is not None:
            # The MLP runs once per distinct value: per-position timesteps hold only a few.
            values, index = timesteps.flatten().unique(return_inverse=True)
            emb = self.time_mlp(timestep_embedding(values, self.n_embd).to(h.dtype))[index]
            h = h + emb.view(x.shape[0], -1, self.n_embd)  # (B, 1, n_embd) or (B, L, n_embd)
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, rotary)
        return self.head(self.ln_f(h))
