"""The toy's text conditioner: byte-level tokens and a tiny transformers BERT encoder built from a config in code.

No vocabulary or weights are downloaded: token ids come from :class:`distill_mixins.text.ByteTokenizer`, and the
encoder's weights ship with the toy teacher. The token states are averaged within each word and laid out by
word, so the one word the first frame cannot show (the direction) is a quarter of the embedding whatever the
lengths of the words before it (a layout by byte position moves every later word when the colour's name is
longer, and the direction is then lost among those shifts: measured, docs/toy.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill_mixins.text import ByteTokenizer

MAX_TOKENS = 40
"""Longest prompt in tokens (its bytes and the end token)."""
MAX_WORDS = 6
"""Most words in a prompt."""


def tokenize(prompts: Sequence[str], max_tokens: int = MAX_TOKENS) -> tuple[Tensor, Tensor]:
    """Byte token ids (B, max_tokens) and attention mask (B, max_tokens) of the prompts (:class:`ByteTokenizer`);
    a prompt longer than ``max_tokens - 1`` bytes raises ValueError."""
    out = ByteTokenizer()(list(prompts), max_length=max_tokens, truncation=False)
    return out["input_ids"], out["attention_mask"]


def word_membership(ids: Tensor, max_words: int = MAX_WORDS) -> Tensor:
    """(B, L, max_words) one-hot word index of every byte token of ids (B, L); spaces, end and padding: all 0."""
    word = torch.cumsum((ids == ByteTokenizer.space_id).long(), dim=1)  # words seen before each token
    is_byte = (ids >= ByteTokenizer.offset) & (ids != ByteTokenizer.space_id)
    too_many = (word * is_byte).amax(dim=1) >= max_words
    if bool(too_many.any()):
        raise ValueError(f"a prompt has more than {max_words} words, the toy encoder's limit: shorten it.")
    member = is_byte[..., None] & (word[..., None] == torch.arange(max_words, device=ids.device))
    return member.float()


class ToyTextEncoder(nn.Module):
    """Prompts -> embeddings (B, dim): a tiny ``transformers.BertModel`` over byte tokens, its states averaged in
    each word and normalised (LayerNorm), the words laid out in order (padded to ``MAX_WORDS``), a linear map and
    a LayerNorm. The empty prompt (the uncondition) has no words: its embedding is the map's bias, normalised."""

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 2) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel  # heavy import, only when a text encoder is built

        config = BertConfig(
            vocab_size=ByteTokenizer.vocab_size, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=2 * dim, max_position_embeddings=MAX_TOKENS, pad_token_id=ByteTokenizer.pad_token_id,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.bert = BertModel(config, add_pooling_layer=False)
        self.word_norm = nn.LayerNorm(dim)
        self.out = nn.Linear(MAX_WORDS * dim, dim)
        self.out_norm = nn.LayerNorm(dim)
        self.dim = dim

    def forward(self, prompts: Sequence[str]) -> Tensor:
        """Embeddings (B, dim) of the prompts."""
        device = self.out.weight.device
        ids, mask = (t.to(device) for t in tokenize(prompts))
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        member = word_membership(ids).to(hidden.dtype)  # (B, L, W)
        count = member.sum(dim=1)[..., None]  # (B, W, 1)
        words = torch.einsum("blw,bld->bwd", member, hidden) / count.clamp(min=1)
        words = self.word_norm(words) * (count > 0).to(hidden.dtype)  # absent words are zeros
        return self.out_norm(self.out(words.flatten(1)))
