"""``lm:WIDTH,LAYERS``: a small causal transformer language model built from its spec (no hub, no download).

Token windows ``(B, L)`` of integer ids in, next-token logits ``(B, L, V)`` out, where ``V`` is the data's
class count (the vocabulary: inputs and labels share it) and ``L`` at most the window the model was built
for (``in_shape[0]``: learned positions). Pre-norm blocks (``torch.nn.TransformerEncoderLayer`` with
``norm_first``) under a causal mask, so position ``t`` sees tokens ``0..t`` only. Options: ``heads``
(attention heads, dividing WIDTH), ``ff`` (feed-forward width as a multiple of WIDTH), ``dropout``.

Small enough to train on a CPU in minutes: ``lm:64,2`` on bytes (V = 256) has about 0.13 M parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from kdistill.models.registry import register


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
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, ff * width, dropout, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length > self.context:
            raise ValueError(f"lm: a window of {length} tokens is longer than the {self.context} this model was "
                             f"built for; build it for the data's window")
        pos = torch.arange(length, device=x.device)
        h = self.drop(self.tokens(x.long()) + self.positions(pos))
        mask = self.mask[:length, :length]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
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
