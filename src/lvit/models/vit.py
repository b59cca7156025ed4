"""The ViT branch of LViT: patch embeddings, transformer blocks, DownViT / UpViT levels, and Reconstruct.

Every level works on the same patch grid (``H/16 x W/16``; 14x14 = 196 patches at 224x224): level i sees the
CNN map of stride ``2**(i-1)`` with patch size ``16 / 2**(i-1)`` and the width of that CNN level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvTransBN


class PatchEmbedding(nn.Module):
    """Non-overlapping patch projection + learned position embedding + dropout.

    ``[B, C, H, W] -> [B, h*w, C]`` with ``(h, w) = (H / patch, W / patch)``. The position embedding is
    learned on the reference grid and resized bicubically when the runtime grid differs (any input size).
    """

    def __init__(self, channels: int, patch_size: int, grid: tuple[int, int], dropout: float):
        super().__init__()
        self.grid = grid
        self.proj = nn.Conv2d(channels, channels, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], channels))
        self.dropout = nn.Dropout(dropout)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:  # [1, h*w, C]
        if tuple(grid) == self.grid:
            return self.pos_embed
        c = self.pos_embed.shape[-1]
        as_map = self.pos_embed.transpose(1, 2).reshape(1, c, *self.grid)
        as_map = F.interpolate(as_map, size=grid, mode="bicubic", align_corners=False)
        return as_map.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        patches = self.proj(x)  # [B, C, h, w]
        grid = (patches.shape[-2], patches.shape[-1])
        tokens = patches.flatten(2).transpose(1, 2)  # [B, h*w, C] (a view; the add below materialises it)
        return self.dropout(tokens + self.position_embedding(grid))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch's fused SDPA kernel."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, C]
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, C/heads]; SDPA takes the strided views as they are
        # Default scale 1/sqrt(head_dim), as the official code.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))  # [B, N, C]


class MLP(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> GELU -> dropout.

    The GELU after fc2 is not the usual ViT MLP, but it is what the official ``nets/Vit.py`` computes, and the
    published weights depend on it.
    """

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        # The official initialisation: Xavier-uniform weights, near-zero biases.
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.gelu(self.fc1(x)))
        return self.dropout(F.gelu(self.fc2(x)))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``. ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, dropout: float) -> nn.Sequential:
    return nn.Sequential(*(TransformerBlock(dim, num_heads, mlp_ratio, dropout) for _ in range(depth)))


class DownViTLevel(nn.Module):
    """One encoder level of the ViT branch.

    ``feature_map [B, C, H_i, W_i]`` (the CNN features of this level) -> patch embedding (+ the text patches at
    level 1) -> transformer blocks. Level 1 returns its tokens ``[B, N, C]``. Deeper levels halve their width
    with a CTBN and concatenate the level above's output ``skip [B, N, C/2]``, returning ``[B, N, C]``.
    """

    def __init__(self, width: int, patch_size: int, grid: tuple[int, int], *, takes_skip: bool, depth: int,
                 num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.embed = PatchEmbedding(width, patch_size, grid, dropout)
        self.blocks = _blocks(width, depth, num_heads, mlp_ratio, dropout)
        self.reduce = ConvTransBN(width, width // 2) if takes_skip else None

    def forward(self, feature_map: torch.Tensor, skip: torch.Tensor | None = None,
                text_patches: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.embed(feature_map)  # [B, N, C]
        if text_patches is not None:
            tokens = tokens + text_patches  # official order: after the embedding dropout
        tokens = self.blocks(tokens)
        if self.reduce is None:
            return tokens
        return torch.cat((self.reduce.forward_tokens(tokens), skip), dim=2)  # [B, N, C/2 + C/2]


class UpViTLevel(nn.Module):
    """One decoder level of the ViT branch: ``blocks(tokens) + CTBN(deeper)``; the deepest level has no
    ``deeper`` input. ``tokens [B, N, C]``, ``deeper [B, N, 2C]`` -> ``[B, N, C]``."""

    def __init__(self, width: int, *, takes_deeper: bool, depth: int, num_heads: int, mlp_ratio: float,
                 dropout: float):
        super().__init__()
        self.blocks = _blocks(width, depth, num_heads, mlp_ratio, dropout)
        self.merge = ConvTransBN(width * 2, width) if takes_deeper else None

    def forward(self, tokens: torch.Tensor, deeper: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.blocks(tokens)
        if self.merge is None:
            return tokens
        return tokens + self.merge.forward_tokens(deeper)


class Reconstruct(nn.Module):
    """Brings a ViT level back to its CNN level: tokens -> grid -> 1x1 conv + BN + ReLU -> nearest upsample.

    ``tokens [B, h*w, C]`` -> ``[B, Cout, H_i, W_i]``. The official order upsamples first; a 1x1 convolution,
    BatchNorm and ReLU are per-pixel, so they commute with nearest upsampling (the forward is identical,
    train and eval) and running them on the ``h x w`` grid saves 1.64 GFLOPs and four full-resolution
    activations per 224x224 image. (Only BatchNorm's running-variance update differs, by the Bessel factor
    ``n/(n-1)`` with ``n`` the number of grid cells rather than pixels: negligible.)
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        b, _, c = tokens.shape
        grid_map = tokens.transpose(1, 2).reshape(b, c, *grid)  # [B, C, h, w]
        out = F.relu(self.norm(self.conv(grid_map)), inplace=True)
        return F.interpolate(out, size=size, mode="nearest")  # [B, Cout, H_i, W_i]
