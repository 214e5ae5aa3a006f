"""``lm:WIDTH,LAYERS``: a small causal transformer language model built from its spec (no hub, no download).

Token windows ``(B, L)`` of integer ids in, next-token logits ``(B, L, V)`` out, where ``V`` is the data's
class count (the vocabulary: inputs and labels share it) and ``L`` at most the window the model was built
for (``in_shape[0]``: learned positions). Pre-norm blocks with causal attention
(``scaled_dot_product_attention(is_causal=True)``), so position ``t`` sees tokens ``0..t`` only. Options: ``heads``
(attention heads, dividing WIDTH), ``ff`` (feed-forward width as a multiple of WIDTH), ``dropout``.

Small enough to train on a CPU in minutes: ``lm:64,2`` on bytes (V = 256) has about 0.13 M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.models.registry import register


class CausalBlock(nn.Module):
    """One pre-norm transformer block: causal multi-head self-attention, then a GELU feed-forward layer,
    each added back to its input (plain ops, so the model exports to ONNX)."""

    def __init__(self, width: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ff = nn.Sequential(nn.Linear(width, ff * width), nn.GELU(), nn.Linear(ff * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, length, width = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(b, length, width)))
        return h + self.drop(self.ff(self.norm2(h)))


class CausalTransformerLM(nn.Module):
    """Token and position embeddings, ``layers`` causal pre-norm transformer blocks, a final norm and a
    linear head to the vocabulary."""

    def __init__(self, vocab: int, context: int, width: int = 64, layers: int = 2, heads: int = 4,
                 ff: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(CausalBlock(width, heads, ff, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length > self.context:
            raise ValueError(f"lm: a window of {length} tokens is longer than the {self.context} this model was "
                             f"built for; build it for the data's window")
        pos = torch.arange(length, device=x.device)
        h = self.drop(self.tokens(x.long()) + self.positions(pos))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


@register("lm")
def _lm(in_shape, num_classes, ints, heads: int = 4, ff: int = 4, dropout: float = 0.0):
    if len(in_shape) != 1:
        raise ValueError(f"lm: needs token windows (L,) per sample, got input shape {tuple(in_shape)}")
    if len(ints) > 2:
        raise ValueError(f"lm: give lm:WIDTH or lm:WIDTH,LAYERS, got {len(ints)} numbers")
    width, layers = (tuple(ints) + (64, 2)[len(ints):])[:2]
    if width < 1 or layers < 1 or heads < 1 or width % heads:
        raise ValueError(f"lm: WIDTH ({width}) and LAYERS ({layers}) must be >= 1 and heads ({heads}) divide WIDTH")
    return CausalTransformerLM(num_classes, int(in_shape[0]), width, layers, heads, ff, dropout)
