"""A small BERT-shaped classifier over token ids, for secure inference (``configs/text_inference.yaml``).

Token embeddings plus learnt positions, two pre-norm encoder layers, the tokens averaged, two
logits. ``examples/make_text_model.py`` trains it in plaintext on a synthetic lookup task that
needs attention: does the first token appear again later in the sequence?
"""

import torch
from torch import nn

VOCAB, LENGTH, WIDTH = 16, 8, 32


class TextClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.randn(1, LENGTH, WIDTH) * 0.1)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids) + self.position).mean(1))


def text_classifier() -> nn.Module:
    return TextClassifier()
