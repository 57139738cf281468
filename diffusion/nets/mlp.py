"""A residual MLP with FiLM conditioning, for vectors: 2-D points and an autoencoder's latents.

Each block: LayerNorm, then FiLM (scale and shift from the time and class embedding, zero-initialised
so that every block starts unconditioned), then Linear, SiLU, Linear, added back to the stream.
Conditioning as in the UNet: a sinusoidal embedding of t through an MLP, plus an optional class
embedding with a null class (index num_classes) for classifier-free guidance, plus (`two_times`)
the embedding of a second time through its own MLP (MeanFlow's interval t - r).

Optionally (`fourier_features` F > 0) the input enters as [x, sin(2 pi x B), cos(2 pi x B)] with a
fixed random B (D, F) ~ N(0, fourier_scale^2) (Tancik et al. 2020, "Fourier Features Let Networks
Learn High Frequency Functions in Low Dimensional Domains"): an MLP on 2-D input otherwise learns
sharp edges slowly, and MeanFlow's one-step map from noise to eight separate modes is all edges.
B is a buffer: it is saved with the weights, and the EMA copy shares its value.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.nets.layers import Linear, TimeEmbedding, second_time_embedding, timestep_embedding


class FiLMBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = Linear(emb_dim, 2 * width)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.fc1 = Linear(width, width)
        self.fc2 = Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        gamma, beta = self.film(F.silu(emb)).chunk(2, dim=1)
        x = (1 + gamma) * self.norm(h) + beta
        return h + self.fc2(self.dropout(F.silu(self.fc1(x))))


class FiLMMLP(nn.Module):
    """(x (B, D), t (B,), class_labels (B,) long or None, second_time (B,) or None) -> (B, D).

    dim: D, the vector size; hidden_dim: the width of the residual stream; num_layers: FiLM blocks;
    time_embedding_dim: the conditioning embedding's width (None: 4 x min(hidden_dim, 128));
    num_classes: None for an unconditional net; two_times: it takes a second time;
    fourier_features: F random frequencies of the input (0: none); fourier_scale: their standard
    deviation, in cycles per unit of x."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int = 256,
        num_layers: int = 4,
        time_embedding_dim: int | None = None,
        num_classes: int | None = None,
        dropout: float = 0.0,
        two_times: bool = False,
        fourier_features: int = 0,
        fourier_scale: float = 1.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        emb_dim = time_embedding_dim or 4 * min(hidden_dim, 128)
        self.time_dim = emb_dim // 4
        self.time_mlp = nn.Sequential(Linear(self.time_dim, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
        self.class_embedding = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        self.second_time_embedding = TimeEmbedding(self.time_dim, emb_dim) if two_times else None
        # Drawn from the global RNG like the weights, so a seeded run builds the same net.
        frequencies = torch.randn(dim, fourier_features) * fourier_scale if fourier_features else None
        self.register_buffer("frequencies", frequencies)
        self.proj_in = Linear(dim + 2 * fourier_features, hidden_dim)
        self.blocks = nn.ModuleList(FiLMBlock(hidden_dim, emb_dim, dropout) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(hidden_dim)
        self.proj_out = Linear(hidden_dim, dim)

    def forward(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, second_time: Tensor | None = None
    ) -> Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(self.time_mlp[0].weight.dtype))
        emb = emb + second_time_embedding(self.second_time_embedding, second_time, x.shape[0])
        if self.class_embedding is not None:
            if class_labels is None:  # no label: the null class, as in the UNet
                class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embedding(class_labels)
        if self.frequencies is not None:
            # Outside autocast: bfloat16 is too coarse for angles of several turns.
            with torch.autocast(x.device.type, enabled=False):
                angles = 2 * torch.pi * x.to(self.frequencies.dtype) @ self.frequencies
            x = torch.cat([x, angles.sin(), angles.cos()], dim=1)
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.proj_out(F.silu(self.norm_out(h)))
