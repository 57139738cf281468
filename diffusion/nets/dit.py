"""DiT: a Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

A function of (x (B, C, H, W), t (B,), class_labels (B,) or None, second_time (B,) or None) ->
(B, C, H, W) that knows nothing about diffusion: for pixels and for an autoencoder's latent grids.

Layout, as in the paper's code: a Conv2d with kernel = stride = patch_size cuts x into
(H / p) * (W / p) tokens of width hidden_size; a fixed 2-D sin-cos positional embedding (MAE's,
not learned) is added; `depth` transformer blocks; a final adaLN layer and a linear map each token
back to its p * p * C values, which are put back into place (unpatchify).

Conditioning: c = TimeEmbedding(t) (a 256-dim sinusoid through a two-layer MLP, DiT's
TimestepEmbedder) + a class embedding (index num_classes is the null class, "no label", for
classifier-free guidance) + with two_times a second TimeEmbedding of second_time (MeanFlow's other
time). Times are floats (or ints) in the caller's units; the sinusoid suits values of order 0..1000.

adaLN-Zero blocks: LayerNorm without affine, then modulate(x, shift, scale) = x * (1 + scale) + shift
with shift, scale and a gate regressed from c by SiLU -> Linear(hidden, 6 * hidden), once for the
attention and once for the MLP (GELU, tanh), each added back as x + gate * branch. That Linear is
zero-initialised, so every gate starts at 0: at initialisation every block is exactly the identity,
and since the final layer's modulation and linear are zero-initialised too, the net's output is
exactly zero, whatever x, t and the label. The rest is initialised as DiT does (xavier-uniform
linears and patch conv, zero biases, N(0, 0.02) time MLPs and class table).

Attention is F.scaled_dot_product_attention (fused kernels where the device has them). Its fused
kernels have no forward-mode derivative, so a caller that differentiates the net forward (MeanFlow)
selects the math kernel (torch.nn.attention.sdpa_kernel(SDPBackend.MATH)).

Sizes (DIT_SIZES): "tiny" for CPU tests, "S" (DiT-S, 33M parameters at patch 2 on 32x32x4 latents)
and "B" (DiT-B, 130M).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.nets.layers import TimeEmbedding

DIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"depth": 4, "hidden_size": 128, "num_heads": 4},  # CPU tests and benches
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},  # DiT-S
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},  # DiT-B
}

TIME_FEATURES = 256  # the sinusoid's size, as DiT's TimestepEmbedder


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(N,) positions -> (N, dim): [sin(p * w_i), cos(p * w_i)], w_i = 10000 ** (-i / (dim/2)), as MAE."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> Tensor:
    """(grid_size ** 2, dim) float32, row-major over the grid: MAE's get_2d_sincos_pos_embed, which
    DiT uses. The first half of each row encodes the column, the second half the row."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    return emb.float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, N, D), shift and scale (B, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
    """Multi-head self-attention (see the module doc for forward-mode derivatives)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        # (B, N, 3D) -> q, k, v each (B, heads, N, D / heads)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.dropout(self.proj(out))


class DiTBlock(nn.Module):
    """x + gate * attention(modulate(norm(x))), then x + gate * mlp(modulate(norm(x))): adaLN-Zero."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, dropout)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            nn.Linear(mlp_hidden, hidden_size),
            nn.Dropout(dropout),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None, :] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None, :] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """modulate(norm(x)) -> linear to patch_size ** 2 * out_channels values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """(x (B, C, H, W), t (B,) or 0-dim, class_labels (B,) long or None, second_time (B,) or 0-dim
    or None) -> (B, C, H, W). H = W = image_size.

    patch_size: p, tokens are p x p patches (image_size % p == 0); hidden_size, depth, num_heads,
    mlp_ratio: the transformer (see DIT_SIZES); num_classes: None for an unconditional net;
    two_times: take a second time (MeanFlow), embedded by its own TimeEmbedding and added to c."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        two_times: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}")
        if hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of 4 (the 2-D sin-cos embedding)")
        self.in_channels = in_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.two_times = two_times
        self.grid_size = image_size // patch_size

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # Fixed, not learned; not saved either (it is a function of the sizes), so state_dicts carry
        # parameters only. Cast and moved with the module like any buffer.
        self.register_buffer("pos_embed", sincos_2d(hidden_size, self.grid_size)[None], persistent=False)
        self.t_embedder = TimeEmbedding(TIME_FEATURES, hidden_size)
        self.r_embedder = TimeEmbedding(TIME_FEATURES, hidden_size) if two_times else None
        # Index num_classes is the null class: "no label", for classifier-free guidance.
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes is not None else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation; the adaLN-Zero linears and the output linear last, at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch conv as a linear (timm's PatchEmbed, as DiT initialises it).
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for embedder in (self.t_embedder, self.r_embedder):
            if embedder is not None:
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        zero = [block.adaLN_modulation[-1] for block in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def embed_time(self, embedder: TimeEmbedding, t: Tensor, batch: int) -> Tensor:
        return embedder(t.expand(batch) if t.ndim == 0 else t)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p * p * C) -> (B, C, H, W)."""
        p, g, c = self.patch_size, self.grid_size, self.in_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, second_time: Tensor | None = None
    ) -> Tensor:
        """x (B, C, H, W) -> (B, C, H, W). t, second_time: (B,) or 0-dim, in the caller's units;
        class_labels: (B,) ints in [0, num_classes], None meaning the null class."""
        batch = x.shape[0]
        c = self.embed_time(self.t_embedder, t, batch)
        if self.r_embedder is None:
            if second_time is not None:
                raise ValueError("second_time given, but the model takes one time (two_times=False)")
        else:
            if second_time is None:
                raise ValueError("the model takes two times (two_times=True), but second_time is None")
            c = c + self.embed_time(self.r_embedder, second_time, batch)
        if self.y_embedder is None:
            if class_labels is not None:
                raise ValueError("class_labels given, but the model is unconditional (num_classes=None)")
        else:
            if class_labels is None:
                class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(class_labels)

        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D), row-major patches
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))
