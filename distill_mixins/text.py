"""A vocabulary-free byte-level tokenizer for tiny text encoders (test hosts, the toy teacher): nothing to download.

Used by :class:`distill_mixins.hosts.TextConditioner` tests and by :class:`distill_mixins.toy.text.ToyTextEncoder`;
it needs neither diffusers nor a tokenizer file.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ByteTokenizer:
    """UTF-8 bytes as token ids, so a tiny text encoder needs no vocabulary file.

    Ids: 0 padding, 1 end of sequence, ``3 + byte`` for each byte (``vocab_size`` 259). Called like a transformers
    tokenizer with ``padding="max_length"``: every prompt becomes its bytes plus the end token, truncated to
    ``max_length`` (the end token kept) and right-padded with 0.
    """

    pad_token_id = 0
    eos_token_id = 1
    offset = 3
    vocab_size = 259
    space_id = offset + ord(" ")
    """The id of the space byte, the word separator."""

    def __call__(
        self, text: list[str], *, padding: str = "max_length", max_length: int = 512, truncation: bool = True,
        return_attention_mask: bool = True, return_tensors: str = "pt",
    ) -> dict[str, Tensor]:
        """``{"input_ids": (B, max_length) int64, "attention_mask": (B, max_length) int64}``."""
        if padding != "max_length" or return_tensors != "pt":
            raise ValueError("ByteTokenizer supports padding='max_length' and return_tensors='pt' only.")
        if max_length < 1:
            raise ValueError(f"ByteTokenizer max_length={max_length} must be >= 1.")
        rows = []
        for prompt in text:
            ids = [self.offset + b for b in prompt.encode("utf-8")] + [self.eos_token_id]
            if len(ids) > max_length:
                if not truncation:
                    raise ValueError(
                        f"prompt {prompt!r} of {len(ids)} tokens is longer than max_length={max_length}: shorten it, "
                        "or allow truncation."
                    )
                ids = ids[: max_length - 1] + [self.eos_token_id]
            rows.append(ids + [self.pad_token_id] * (max_length - len(ids)))
        input_ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), max_length)
        out = {"input_ids": input_ids}
        if return_attention_mask:
            out["attention_mask"] = (input_ids != self.pad_token_id).long()
        return out


__all__ = ["ByteTokenizer"]
