"""Hugging Face ``transformers`` models under MPC: BERT, GPT-2 and ViT, built from their configs.

HF's own forward passes do not trace with torch.fx (the attention function is picked at run time,
masks are built with vmap, caches are objects), and transformers 5 ships no fx tracer. Each
supported model is rewritten instead as a module holding the model's own submodules under the same
names (so parameters, ``state_dict`` names and gradients are the model's), with a forward that fx
traces: HF's ``nn.Linear``, ``nn.LayerNorm``, ``nn.Embedding`` and ``nn.Conv2d`` as leaves,
attention as ``F.scaled_dot_product_attention``, GPT-2's ``Conv1D`` as ``x @ weight + bias``, the
activations as ``F.gelu``/``F.relu``/``F.silu``: all run by :mod:`mpcfl.models.transformer`.

What secure inference returns is one tensor: the logits for a model with a head
(``BertForSequenceClassification``, ``GPT2LMHeadModel``, ``ViTForImageClassification``), the last
hidden state for a bare one (``BertModel``, ``GPT2Model``, ``ViTModel``; poolers are not run). The
input is one tensor too: token ids (no attention mask: every token attends to every other, or to
the earlier ones in GPT-2; token types all 0) or pixels. Everything else is refused by name.

:mod:`mpcfl.models.convert` imports this module only for a model whose class comes from
``transformers``, which therefore stays optional.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpcfl.models.transformer import UnsupportedOperationError, decoder_positions

# a leaf in the traced graph: GPT-2's positions continue after a key-value cache's (mpcfl.models.transformer)
torch.fx.wrap("decoder_positions")

Activation = Callable[[torch.Tensor], torch.Tensor]


def _families() -> dict[type, tuple[Callable[[nn.Module], nn.Module], type | None]]:
    """Supported model class -> (its traceable rewrite, the base model class when it has a head)."""
    from transformers import (BertForSequenceClassification, BertModel, GPT2LMHeadModel, GPT2Model,
                              ViTForImageClassification, ViTModel)

    return {
        BertModel: (_Bert, None), BertForSequenceClassification: (_Bert, BertModel),
        GPT2Model: (_GPT2, None), GPT2LMHeadModel: (_GPT2, GPT2Model),
        ViTModel: (_ViT, None), ViTForImageClassification: (_ViT, ViTModel),
    }


@functools.cache
def _activations() -> dict[type, Activation]:
    """HF's activation modules run here -> the torch function of the same value (fx records it)."""
    from transformers import activations as act

    tanh = functools.partial(F.gelu, approximate="tanh")
    return {act.GELUActivation: F.gelu, act.NewGELUActivation: tanh, act.GELUTanh: tanh,
            act.FastGELUActivation: tanh, nn.ReLU: F.relu, nn.SiLU: F.silu, act.SiLUActivation: F.silu}


@functools.cache
def _layers() -> frozenset[type]:
    """Every module type a supported model may hold (HF's blocks, read by the rewrites below)."""
    from transformers.models.bert import modeling_bert as bert
    from transformers.models.gpt2 import modeling_gpt2 as gpt2
    from transformers.models.vit import modeling_vit as vit
    from transformers.pytorch_utils import Conv1D

    return frozenset({
        *_families(), *_activations(),
        bert.BertEmbeddings, bert.BertEncoder, bert.BertLayer, bert.BertAttention, bert.BertSelfAttention,
        bert.BertSelfOutput, bert.BertIntermediate, bert.BertOutput, bert.BertPooler,
        gpt2.GPT2Block, gpt2.GPT2Attention, gpt2.GPT2MLP, Conv1D,
        vit.ViTEmbeddings, vit.ViTPatchEmbeddings, vit.ViTLayer, vit.ViTAttention, vit.ViTMLP, vit.ViTPooler,
        nn.Linear, nn.LayerNorm, nn.Embedding, nn.Conv2d, nn.Dropout, nn.Identity, nn.ModuleList, nn.Tanh,
    })


def traceable(model: nn.Module) -> nn.Module:
    """``model`` (a supported HF model, in eval) as a module torch.fx traces; it shares ``model``'s
    submodules and parameters.

    Raises:
        UnsupportedOperationError: another model class, a layer or a config setting not built here, by name.
    """
    families = _families()
    if type(model) not in families:
        supported = ", ".join(sorted(t.__name__ for t in families))
        raise UnsupportedOperationError(f"Hugging Face model {type(model).__name__} is not supported under MPC "
                                        f"(supported: {supported})")
    config = model.config
    for option in ("output_attentions", "output_hidden_states"):
        if getattr(config, option, False):
            raise UnsupportedOperationError(f"{type(model).__name__} with {option}=True: secure inference returns one "
                                            "tensor (the logits, or the last hidden state of a model without a head)")
    for option in ("is_decoder", "add_cross_attention"):
        if getattr(config, option, False):
            raise UnsupportedOperationError(f"{type(model).__name__} with {option}=True (cross-attention and BERT as "
                                            "a decoder are not built)")
    for name, module in model.named_modules():
        if type(module) not in _layers():
            raise UnsupportedOperationError(f"layer {name!r} ({type(module).__name__}) of {type(model).__name__} "
                                            "is not supported under MPC")
    rewrite, base = families[type(model)]
    return rewrite(model, base)


def _activation(module: nn.Module) -> Activation:
    return _activations()[type(module)]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, H * D) -> (N, H, L, D)."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float, causal: bool) -> torch.Tensor:
    """Multi-head attention of projected (N, L, H * D) queries, keys and values, unmasked or causal."""
    out = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), is_causal=causal,
                                         scale=scale)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def _conv1d(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D: a Linear whose weight is stored transposed, (in, out)."""
    return x @ m.weight + m.bias


class _Rewrite(nn.Module):
    """The HF model's children under their own names; ``base`` is the body a head sits on (None: no head)."""

    def __init__(self, model: nn.Module, base: type | None) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self.body = None if base is None else next(n for n, c in model.named_children() if isinstance(c, base))

    def _base(self) -> Any:
        return self if self.body is None else getattr(self, self.body)


class _Bert(_Rewrite):
    """BertModel (the last hidden state) or BertForSequenceClassification (the logits: pooler, classifier)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        bert = self._base()
        e = bert.embeddings
        x = e.word_embeddings(ids)
        # positions are 0..L-1 (a slice of the table) and token types all 0 (its first row)
        x = e.LayerNorm(x + e.token_type_embeddings.weight[0] + e.position_embeddings.weight[: x.shape[1]])
        for layer in bert.encoder.layer:
            a = layer.attention.self
            context = _attend(a.query(x), a.key(x), a.value(x), a.num_attention_heads, a.scaling, False)
            x = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + x)
            hidden = _activation(layer.intermediate.intermediate_act_fn)(layer.intermediate.dense(x))
            x = layer.output.LayerNorm(layer.output.dense(hidden) + x)
        if self.body is None:
            return x
        return self.classifier(bert.pooler.activation(bert.pooler.dense(x[:, 0])))


class _GPT2(_Rewrite):
    """GPT2Model (the last hidden state) or GPT2LMHeadModel (the logits over the vocabulary); causal."""

    # positions mix only in causal SDPA: generation may run one new position at a time (transformer.cacheable)
    key_value_cache = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        gpt = self._base()
        x = gpt.wte(ids)
        x = x + decoder_positions(gpt.wpe.weight, x.shape[1])
        for block in gpt.h:
            a = block.attn
            qkv = _conv1d(a.c_attn, block.ln_1(x)).split(a.embed_dim, dim=-1)
            x = x + _conv1d(a.c_proj, _attend(qkv[0], qkv[1], qkv[2], a.num_heads, a.scaling, True))
            m = block.mlp
            x = x + _conv1d(m.c_proj, _activation(m.act)(_conv1d(m.c_fc, block.ln_2(x))))
        x = gpt.ln_f(x)
        return x if self.body is None else self.lm_head(x)


class _ViT(_Rewrite):
    """ViTModel (the last hidden state) or ViTForImageClassification (the logits, from the class token)."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        vit = self._base()
        e = vit.embeddings
        x = e.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([e.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + e.position_embeddings
        for layer in vit.layers:
            a = layer.attention
            h = layer.layernorm_before(x)
            x = x + a.o_proj(_attend(a.q_proj(h), a.k_proj(h), a.v_proj(h), a.num_attention_heads, a.scaling, False))
            m = layer.mlp
            x = x + m.fc2(_activation(m.activation_fn)(m.fc1(layer.layernorm_after(x))))
        x = vit.layernorm(x)
        return x if self.body is None else self.classifier(x[:, 0])
