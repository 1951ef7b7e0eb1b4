"""A Hugging Face BERT classifier (a tiny config, random weights: no download) served between two
real parties and the dealer: token ids one-hot encoded at their owner, the weights at the model
owner, triples from the dealer."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


def test_bert_classifier_between_two_parties_and_the_dealer() -> None:
    import mpcfl as api

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3,
                                     initializer_range=0.1)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 40, (2, 6))
    secure = api.secure_predict_local(model, ids.float(), batch_size=2, timeout_s=60)
    with torch.no_grad():
        error = (secure - model(ids).logits).abs().max().item()
    print(f"two parties and the dealer: max abs error {error:.1e}")
    assert error < 2e-2
