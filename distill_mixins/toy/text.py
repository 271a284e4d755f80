"""The toy's text conditioner: a byte-level tokenizer and a tiny transformers BERT encoder built from a config in code.

No vocabulary or weights are downloaded: token ids are the prompt's UTF-8 bytes shifted by the special tokens,
and the encoder's weights ship with the toy teacher (they are trained with it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

PAD, CLS, OFFSET = 0, 1, 4
"""Padding id, the leading token's id, and the shift of byte values (ids ``OFFSET .. OFFSET + 255``)."""
MAX_TOKENS = 40


def tokenize(prompts: Sequence[str], max_tokens: int = MAX_TOKENS) -> tuple[Tensor, Tensor]:
    """Byte-level token ids (B, L) and attention mask (B, L): ``[CLS] bytes... [PAD]...``; L = longest prompt + 1."""
    encoded = [list(p.encode("utf-8")) for p in prompts]
    too_long = [p for p, e in zip(prompts, encoded, strict=True) if len(e) + 1 > max_tokens]
    if too_long:
        raise ValueError(f"prompt {too_long[0]!r} is longer than {max_tokens - 1} bytes, the toy encoder's limit.")
    length = 1 + max((len(e) for e in encoded), default=0)
    ids = torch.full((len(prompts), length), PAD, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, 0] = CLS
        ids[i, 1 : 1 + len(e)] = torch.tensor(e, dtype=torch.long) + OFFSET
    return ids, (ids != PAD).long()


class ToyTextEncoder(nn.Module):
    """Prompts -> embeddings (B, dim): a tiny ``transformers.BertModel``, then a linear map of its token states
    laid out by position (padded to ``MAX_TOKENS``), so every word keeps its weight (a mean over tokens would
    dilute the one word that differs, e.g. the direction, to a few percent of the embedding)."""

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 2) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel  # heavy import, only when a text encoder is built

        config = BertConfig(
            vocab_size=OFFSET + 256, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=2 * dim, max_position_embeddings=MAX_TOKENS, pad_token_id=PAD,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.bert = BertModel(config, add_pooling_layer=False)
        self.out = nn.Linear(MAX_TOKENS * dim, dim)
        self.dim = dim

    def forward(self, prompts: Sequence[str]) -> Tensor:
        """Embeddings (B, dim) of the prompts."""
        device = self.out.weight.device
        ids, mask = (t.to(device) for t in tokenize(prompts))
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        hidden = hidden * mask[..., None].to(hidden.dtype)
        padded = torch.nn.functional.pad(hidden, (0, 0, 0, MAX_TOKENS - hidden.shape[1]))
        return self.out(padded.flatten(1))
