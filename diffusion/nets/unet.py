"""A DDPM-style UNet: a function of (x, t, class_labels) that knows nothing about diffusion.

Layout (Ho et al. 2020): conv in; per level `num_res_blocks` residual blocks, then a stride-2 conv
down (except at the last level); a middle of ResBlock, self-attention, ResBlock at the lowest
resolution; self-attention after every residual block of the levels whose resolution is in
`attention_resolutions` (e.g. 16 and 8 for 32x32 CIFAR-10, as in Ho et al.); per level on the way up `num_res_blocks + 1` residual blocks, each taking one skip
concatenated, then a nearest upsample and conv (except at the first level); GroupNorm, SiLU, conv out.

Conditioning: a sinusoidal embedding of t through an MLP, plus an optional class embedding, enters
every residual block by FiLM (scale and shift after the second GroupNorm).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.nets.layers import TimeEmbedding, second_time_embedding, timestep_embedding


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, norm_groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_channels)
        # Zero init: every block starts unconditioned (gamma = beta = 0), so the net begins as a plain
        # UNet and the conditioning grows in from there instead of starting as large random noise.
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        gamma, beta = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = (1 + gamma) * self.norm2(h) + beta
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int, norm_groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention_heads={heads} must divide the lowest level's channels ({channels})")
        self.heads = heads
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x))
        # (B, 3C, H, W) -> q, k, v each (B, heads, H*W, C/heads): every pixel is a token.
        qkv = qkv.reshape(b, 3, self.heads, c // self.heads, height * width)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj(out)


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 64,
        channel_mults: tuple[int, ...] | list[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention: bool = True,
        attention_heads: int = 4,
        norm_groups: int = 8,
        dropout: float = 0.0,
        num_classes: int | None = None,
        attention_resolutions: tuple[int, ...] | list[int] = (),
        image_size: int | None = None,
        two_times: bool = False,
    ):
        """attention_resolutions: sizes (of an `image_size` input) at which levels get attention;
        two_times: the net takes a second time (MeanFlow's t - r), embedded by its own MLP and added."""
        super().__init__()
        self.base_channels = base_channels
        self.num_classes = num_classes
        emb_dim = 4 * base_channels
        level_channels = [base_channels * mult for mult in channel_mults]

        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Index num_classes is the null class: "no label", for classifier-free guidance.
        self.class_embedding = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        self.second_time_embedding = TimeEmbedding(base_channels, emb_dim) if two_times else None

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, norm_groups, dropout)

        sizes = [image_size or 0]
        for _ in level_channels[1:]:
            sizes.append((sizes[-1] + 1) // 2)  # a stride-2 conv with padding 1 rounds up
        if attention_resolutions and image_size is None:
            raise ValueError("attention_resolutions needs the image_size")

        def attention_at(level: int, level_ch: int) -> nn.Module:
            return (
                SelfAttention(level_ch, attention_heads, norm_groups)
                if sizes[level] in attention_resolutions
                else nn.Identity()
            )

        # conv_in gives the first level's channels (not base_channels) so every GroupNorm sees a
        # multiple of some level's channels, which is all the config checks norm_groups against.
        channels = level_channels[0]
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        skip_channels = [channels]
        self.down_levels = nn.ModuleList()
        self.down_attentions = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for level, level_ch in enumerate(level_channels):
            blocks, attentions = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(res_block(channels, level_ch))
                attentions.append(attention_at(level, level_ch))
                channels = level_ch
                skip_channels.append(channels)
            self.down_levels.append(blocks)
            self.down_attentions.append(attentions)
            if level < len(level_channels) - 1:
                self.downsamples.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
                skip_channels.append(channels)

        self.mid_block1 = res_block(channels, channels)
        self.mid_attention = SelfAttention(channels, attention_heads, norm_groups) if attention else nn.Identity()
        self.mid_block2 = res_block(channels, channels)

        self.up_levels = nn.ModuleList()
        self.up_attentions = nn.ModuleList()
        self.upsample_convs = nn.ModuleList()
        for level in reversed(range(len(level_channels))):
            blocks, attentions = nn.ModuleList(), nn.ModuleList()
            # One more block than on the way down: it takes the skip the downsample conv left.
            for _ in range(num_res_blocks + 1):
                blocks.append(res_block(channels + skip_channels.pop(), level_channels[level]))
                attentions.append(attention_at(level, level_channels[level]))
                channels = level_channels[level]
            self.up_levels.append(blocks)
            self.up_attentions.append(attentions)
            if level > 0:
                self.upsample_convs.append(nn.Conv2d(channels, channels, 3, padding=1))

        self.norm_out = nn.GroupNorm(norm_groups, channels)
        self.conv_out = nn.Conv2d(channels, in_channels if out_channels is None else out_channels, 3, padding=1)

    def forward(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, second_time: Tensor | None = None
    ) -> Tensor:
        """x: (B, C, H, W); t: (B,) or scalar, float or int, in the method's units (e.g. 0..999);
        class_labels: (B,) ints in [0, num_classes], None meaning the null class; second_time: like t,
        for a net built with two_times, else None."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(self.time_mlp[0].weight.dtype))
        emb = emb + second_time_embedding(self.second_time_embedding, second_time, x.shape[0])
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("class_labels given, but the model is unconditional (num_classes=None)")
        else:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embedding(class_labels)

        h = self.conv_in(x)
        skips = [h]
        for level, (blocks, attentions) in enumerate(zip(self.down_levels, self.down_attentions)):
            for block, attention in zip(blocks, attentions):
                h = attention(block(h, emb))
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
                skips.append(h)

        h = self.mid_block1(h, emb)
        h = self.mid_attention(h)
        h = self.mid_block2(h, emb)

        for level, (blocks, attentions) in enumerate(zip(self.up_levels, self.up_attentions)):
            for block, attention in zip(blocks, attentions):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), emb))
            if level < len(self.upsample_convs):
                # Upsample to the skip's size, not by 2: odd sizes round up going down (7 -> 4).
                h = F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest")
                h = self.upsample_convs[level](h)

        return self.conv_out(F.silu(self.norm_out(h)))
