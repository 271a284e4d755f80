"""Per-rank activation memory of one forward + backward of a video DiT on one clip under context parallel (CP).

A calculator, not a profiler, the companion of :mod:`distill_mixins.parallel.memory` (which counts the training
state: weights, gradients, optimizer states). It counts the bytes a network saves for backward while its forward
builds the graph, per rank of a CP group of size ``P`` (Ulysses attention, :mod:`distill_mixins.parallel.ulysses`:
each rank keeps ``S / P`` tokens through the blocks), plus the Ulysses all-to-all transient. Assumptions:

- **Tokens.** A clip of ``frames`` video frames at ``height x width`` is encoded by a Wan/Cosmos-style VAE with 4x
  temporal and 8x spatial compression (``T = (frames - 1) / 4 + 1`` latent frames, ``H / 8 x W / 8``), then
  patchified by ``(1, 2, 2)``: ``S = T' * H' * W'`` tokens (:func:`token_grid`). 704 x 1280 (Cosmos-Predict2.5's
  720p): 93 frames -> 24 x 44 x 80 = 84,480 tokens, 121 frames -> 31 x 44 x 80 = 109,120. Batch: one clip.
- **What a block saves** (:func:`block_terms`), per local token, in units of the hidden size ``h`` of the compute
  dtype (bf16: 2 bytes), ``r`` the MLP ratio, ``H`` the heads; ``[x]``: only when the block has feature x:

  ====================  ==========================================================================  ==========
  sublayer              tensors saved for backward                                                  x h
  ====================  ==========================================================================  ==========
  self-attention        norm input 1, [adaLN] modulated norm output 1, q/k/v projection input 1,    8 - 10
                        [qk-norm] q and k norm inputs 2, q, k (after RoPE) and v saved by the
                        attention kernel 3, attention output 1, [adaLN] gated output 1;
                        [fused qkv, P = 1] +2 (v is a view of the fused 3h projection output);
                        [P > 1] +1 (the output projection's input is the head -> sequence
                        all-to-all's copy, not the kernel's own output)
  cross-attention       norm input 1, [adaLN] modulated 1, q projection input 1, [qk-norm] q norm  5 - 7
                        input 1, q 1, attention output 1, [adaLN] gated output 1
  MLP                   norm input 1, [adaLN] modulated 1, fc1 input 1, activation input r, fc2     2 + 2r -
                        input r, [adaLN] gated output 1                                              4 + 2r
  ====================  ==========================================================================  ==========

  plus per local token in float32: 2 per LayerNorm (mean, rstd), ``H`` per attention (the kernel's logsumexp),
  ``H`` per qk-normed tensor (rstd per head); and per block, not divided by ``P``: the text keys and values of the
  cross-attention (``2 h`` per text token, ``+1 h`` for the key norm input). Per block that is ``10 + 2r = 18 h``
  for :class:`~distill_mixins.testing.transformer.TinyVideoDiT` at ``P = 1`` (``17 h`` at ``P > 1``) and
  ``10 + 7 + (4 + 2r) = 29 h`` for a Cosmos block (self-attention, cross-attention, MLP, adaLN-zero,
  qk-RMSNorm) at ``P = 1`` (``30 h`` at ``P > 1``).
- **Attention** is flash / SDPA (flash-attn, cuDNN, PyTorch's fused kernels): it saves q, k, v, the output and
  the logsumexp, never an ``S x S`` score matrix. Under Ulysses a rank's kernel holds all ``S`` tokens of ``H / P``
  heads: the same number of elements as all heads of ``S / P`` tokens, so every per-token term scales as ``1 / P``.
- **Outside the blocks** (:func:`outside_terms`), once: the patch embedding's input (``C * pt * ph * pw`` per
  token), the final norm ([adaLN] modulated) and the output projection's input, the RoPE tables (``head_dim``
  per token: cos and sin of ``head_dim / 2``), and the text context read by every block's cross-attention.
  ``embed_before_split`` models a network that embeds the whole sequence on every rank and splits after
  (TinyVideoDiT): the first block's input then keeps the full-sequence storage and the RoPE tables are full.
  Per-sample terms (time and label embeddings: a few ``h`` per clip) and the loss are left out.
- **Activation checkpointing** ``"full"``: each block saves only its input (``1 h`` per local token; the text and
  the per-sample embedding are shared), and the block being recomputed in the backward holds its own activations
  once more: ``blocks x 1 h + 1 block``.
- **Ulysses transient** (``P > 1``, added to :attr:`ActivationEstimate.total`): the send and receive buffers of
  q, k and v of one attention call, ``2 x 3 x (S / P) x h`` elements, an upper bound that also covers a packed qkv
  exchange (this library exchanges q, k and v one at a time, a third of it at once).
- **Not counted**: the gradients of the activations during the backward (a few block-sized tensors at a time),
  attention kernel workspace, the allocator's fragmentation and caching, the weights and their FSDP all-gather
  (:mod:`~distill_mixins.parallel.memory`), the VAE and the text encoder, the frozen teacher's forward under
  ``no_grad`` (it saves nothing). A distillation step builds the graph of one network at a time (the student in
  student phases, the critic in critic phases; the teacher too when GAN heads tap it), so one row is one phase.
- **Architectures**: Cosmos-Predict2.5 2B (hidden 2048 = 16 heads x 128, 28 blocks) and 14B (5120 = 40 x 128,
  36 blocks), MLP ratio 4, cross-attention to 512 text tokens of 1024 channels (after the text projection),
  adaLN-LoRA 256: the sizes of :data:`~distill_mixins.parallel.memory.COSMOS_PREDICT25_2B` / ``_14B``
  (:func:`cosmos_block_params` recounts their block parameters from these numbers). 17 input channels (16 latent +
  1 condition mask) and 16 output channels. Exact kernels differ (a fused RMSNorm saves less than an eager one, a
  non-fused one more); the formula is the standard count above, bf16 with float32 statistics.

``python -m distill_mixins.parallel.activation_memory`` prints the tables of ``docs/distributed.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from distill_mixins.parallel.memory import BF16, COSMOS_PREDICT25_2B, COSMOS_PREDICT25_14B, FP32, GIB

__all__ = [
    "ActivationEstimate",
    "CLIPS",
    "COSMOS_2B",
    "COSMOS_14B",
    "CP_SIZES",
    "DiTShape",
    "LIMIT_BYTES",
    "Term",
    "activation_table",
    "block_terms",
    "context_split",
    "cosmos_block_params",
    "docs_tables",
    "estimate_activations",
    "latent_frames",
    "outside_terms",
    "tiny_video_dit_shape",
    "token_grid",
]

Grid = tuple[int, int, int]
TEMPORAL, SPATIAL = 4, 8
"""The Wan/Cosmos VAE's compression: 4x in time (the first frame alone), 8x in height and width."""
PATCH: Grid = (1, 2, 2)
"""Cosmos-Predict2.5's (and Wan's) patch size (pt, ph, pw)."""
CLIPS: tuple[tuple[int, int, int], ...] = ((93, 704, 1280), (121, 704, 1280))
"""(video frames, height, width) of the table: Cosmos-Predict2.5's 720p clips (24 and 31 latent frames)."""
CP_SIZES = (1, 2, 4, 8)
LIMIT_BYTES = 80 * GIB
"""Cells above this are marked (an "80 GB" H100 has 79.6 GiB; the training state comes on top)."""
CHECKPOINTING = ("none", "full")


# ------------------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class DiTShape:
    """What the formula needs to know about a DiT: sizes and the features that change what a block saves.

    ``fused_qkv``: one projection computes q, k and v (v a view of its output); ``qk_norm``: an RMSNorm on q and k;
    ``adaln``: adaLN-zero (each norm output modulated by the per-sample scale and shift, each sublayer's output
    multiplied by a gate); ``cross_attention``: a text cross-attention sublayer over ``text_tokens`` tokens of
    ``text_dim`` channels; ``patch_in`` / ``patch_out``: elements per token entering the patch embedding / leaving
    the output projection; ``embed_before_split``: see the module docstring.
    """

    name: str
    hidden: int
    heads: int
    blocks: int
    mlp_ratio: int = 4
    fused_qkv: bool = False
    qk_norm: bool = False
    adaln: bool = False
    cross_attention: bool = False
    text_tokens: int = 0
    text_dim: int = 0
    patch_in: int = 16
    patch_out: int = 16
    embed_before_split: bool = False

    def __post_init__(self) -> None:
        for field in ("hidden", "heads", "blocks", "mlp_ratio", "patch_in", "patch_out"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DiTShape({self.name!r}).{field}={value!r} must be an int >= 1.")
        if self.hidden % self.heads:
            raise ValueError(f"DiTShape({self.name!r}): hidden={self.hidden} is not divisible by heads={self.heads}.")
        if self.cross_attention and (self.text_tokens < 1 or self.text_dim < 1):
            raise ValueError(f"DiTShape({self.name!r}): cross_attention needs text_tokens and text_dim >= 1.")

    @property
    def head_dim(self) -> int:
        """hidden / heads."""
        return self.hidden // self.heads


def _cosmos(name: str, heads: int, blocks: int) -> DiTShape:
    return DiTShape(
        name, heads * 128, heads, blocks, mlp_ratio=4, qk_norm=True, adaln=True, cross_attention=True,
        text_tokens=512, text_dim=1024, patch_in=17 * math.prod(PATCH), patch_out=16 * math.prod(PATCH),
    )


COSMOS_2B = _cosmos(COSMOS_PREDICT25_2B.name, 16, COSMOS_PREDICT25_2B.blocks)
"""Cosmos-Predict2.5-2B: hidden 2048 (16 heads x 128), 28 blocks, MLP ratio 4."""
COSMOS_14B = _cosmos(COSMOS_PREDICT25_14B.name, 40, COSMOS_PREDICT25_14B.blocks)
"""Cosmos-Predict2.5-14B: hidden 5120 (40 heads x 128), 36 blocks, MLP ratio 4."""


def cosmos_block_params(shape: DiTShape, adaln_lora: int = 256) -> int:
    """Parameters of one Cosmos block of ``shape`` (no biases): self-attention q, k, v, out (4 h^2); cross-attention
    q, out (2 h^2) and k, v from ``text_dim`` (2 h text_dim); MLP (2 r h^2); three adaLN-LoRA modulations
    (h x lora + lora x 3h each); q/k RMSNorm weights (head_dim each, 4 of them). Equal to memory.py's counts."""
    h, d = shape.hidden, shape.text_dim
    return 4 * h * h + 2 * h * h + 2 * h * d + 2 * shape.mlp_ratio * h * h + 3 * (h * adaln_lora + adaln_lora * 3 * h) \
        + 4 * shape.head_dim


def tiny_video_dit_shape(model: object, name: str = "TinyVideoDiT") -> DiTShape:
    """The :class:`DiTShape` of a :class:`~distill_mixins.testing.transformer.TinyVideoDiT` (fused qkv, pre-norm
    LayerNorm blocks without adaLN, qk-norm or cross-attention; embeds the whole sequence before the CP split)."""
    blocks = model.blocks  # type: ignore[attr-defined]
    hidden = model.dim  # type: ignore[attr-defined]
    mlp_ratio = blocks[0].mlp[0].out_features // hidden if len(blocks) else 4
    patch = model.channels * math.prod(model.patch)  # type: ignore[attr-defined]
    return DiTShape(
        name, hidden, model.heads, max(len(blocks), 1), mlp_ratio=mlp_ratio,  # type: ignore[attr-defined]
        fused_qkv=True, patch_in=patch, patch_out=patch, embed_before_split=True,
    )


# ------------------------------------------------------------------------------------------------ tokens


def latent_frames(frames: int, temporal: int = TEMPORAL) -> int:
    """Latent frames of ``frames`` video frames: ``(frames - 1) / temporal + 1`` (93 -> 24, 121 -> 31)."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % temporal:
        raise ValueError(
            f"latent_frames: frames={frames!r} must be 1 + a multiple of {temporal} (the VAE encodes the first frame "
            f"alone, then {temporal} frames per latent frame), e.g. 93 or 121."
        )
    return (frames - 1) // temporal + 1


def token_grid(
    frames: int, height: int, width: int, *, patch: Grid = PATCH, temporal: int = TEMPORAL, spatial: int = SPATIAL
) -> Grid:
    """The token grid (T', H', W') of a clip: VAE latent (T, H / 8, W / 8), then divided by ``patch``."""
    latent = (latent_frames(frames, temporal), height // spatial, width // spatial)
    if height % spatial or width % spatial or any(n % p for n, p in zip(latent, patch, strict=True)):
        raise ValueError(
            f"token_grid: {frames} frames at {height}x{width} give the latent {latent}, which the VAE ({spatial}x) "
            f"and the patch {patch} do not divide; use a height and width that are multiples of "
            f"{spatial * max(patch[1:])}."
        )
    return tuple(n // p for n, p in zip(latent, patch, strict=True))  # type: ignore[return-value]


def context_split(grid: Grid, cp: int, heads: int | None = None) -> str:
    """How the tokens of ``grid`` split over ``cp`` ranks: ``"none"`` (cp 1), ``"frames"`` (cp divides T'),
    ``"tokens"`` (cp divides T'*H'*W'); a ValueError when neither does, or when ``cp`` does not divide ``heads``."""
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ValueError(f"context_split: cp={cp!r} must be an int >= 1.")
    if heads is not None and heads % cp:
        raise ValueError(f"context_split: cp={cp} does not divide heads={heads} (Ulysses splits the heads).")
    if cp == 1:
        return "none"
    if grid[0] % cp == 0:
        return "frames"
    if math.prod(grid) % cp == 0:
        return "tokens"
    raise ValueError(f"context_split: cp={cp} divides neither T'={grid[0]} nor T'*H'*W'={math.prod(grid)}.")


# ------------------------------------------------------------------------------------------------ terms


@dataclass(frozen=True)
class Term:
    """One kind of saved tensor: ``elements`` per token of kind ``tokens`` (``"local"``: S / P, ``"remote"``:
    S - S / P, ``"full"``: S, ``"text"``: the text tokens), ``bytes_per_element`` each (``None``: the compute
    dtype), ``per_block``: counted once per block (else once per network)."""

    name: str
    elements: int
    tokens: str = "local"
    bytes_per_element: int | None = None
    per_block: bool = True


def block_terms(shape: DiTShape, cp: int = 1, *, checkpointing: str = "none") -> list[Term]:
    """What one block saves for backward (the table of the module docstring); ``checkpointing="full"``: the input."""
    h, r, heads = shape.hidden, shape.mlp_ratio, shape.heads
    if checkpointing == "full":
        return [Term("block input (checkpointed block)", h)]
    if checkpointing != "none":
        raise ValueError(f"block_terms: checkpointing={checkpointing!r}; choose one of {CHECKPOINTING}.")
    terms = [Term("self-attn: norm input", h)]
    if shape.adaln:
        terms.append(Term("self-attn: modulated norm output", h))
    terms += [Term("self-attn: norm mean, rstd", 2, bytes_per_element=FP32),
              Term("self-attn: q/k/v projection input", h)]
    if shape.qk_norm:
        terms += [Term("self-attn: q, k norm inputs", 2 * h),
                  Term("self-attn: q, k norm rstd", 2 * heads, "local", FP32)]
    terms += [Term("self-attn: q, k, v at the kernel", 3 * h), Term("self-attn: output", h),
              Term("self-attn: logsumexp", heads, bytes_per_element=FP32)]
    if shape.fused_qkv and cp == 1:
        terms.append(Term("self-attn: fused qkv storage (v is a view)", 2 * h))
    if cp > 1:
        terms.append(Term("self-attn: Ulysses head->seq copy (out-proj input)", h))
    if shape.adaln:
        terms.append(Term("self-attn: gated output", h))
    if shape.cross_attention:
        terms.append(Term("cross-attn: norm input", h))
        if shape.adaln:
            terms.append(Term("cross-attn: modulated norm output", h))
        terms += [Term("cross-attn: norm mean, rstd", 2, bytes_per_element=FP32),
                  Term("cross-attn: q projection input", h)]
        if shape.qk_norm:
            terms += [Term("cross-attn: q norm input", h), Term("cross-attn: q norm rstd", heads, "local", FP32)]
        terms += [Term("cross-attn: q at the kernel", h), Term("cross-attn: output", h),
                  Term("cross-attn: logsumexp", heads, bytes_per_element=FP32)]
        if shape.adaln:
            terms.append(Term("cross-attn: gated output", h))
        terms.append(Term("cross-attn: text k, v", 2 * h, "text"))
        if shape.qk_norm:
            terms += [Term("cross-attn: text k norm input", h, "text"),
                      Term("cross-attn: k norm rstd", heads, "text", FP32)]
    terms.append(Term("mlp: norm input", h))
    if shape.adaln:
        terms.append(Term("mlp: modulated norm output", h))
    terms += [Term("mlp: norm mean, rstd", 2, bytes_per_element=FP32), Term("mlp: fc1 input", h),
              Term("mlp: activation input", r * h), Term("mlp: fc2 input", r * h)]
    if shape.adaln:
        terms.append(Term("mlp: gated output", h))
    return terms


def outside_terms(shape: DiTShape, cp: int = 1) -> list[Term]:
    """What the network saves outside its blocks, once (see the module docstring)."""
    h, tables = shape.hidden, "full" if shape.embed_before_split else "local"
    terms = [Term("patch embedding input", shape.patch_in, tables, per_block=False)]
    if shape.embed_before_split and cp > 1:
        terms.append(Term("first block input: full-sequence storage", h, "remote", per_block=False))
    terms.append(Term("final norm input", h, per_block=False))
    if shape.adaln:
        terms.append(Term("final modulated norm output", h, per_block=False))
    terms += [Term("final norm mean, rstd", 2, bytes_per_element=FP32, per_block=False),
              Term("output projection input", h, per_block=False),
              Term("RoPE cos, sin tables", shape.head_dim, tables, per_block=False)]
    if shape.cross_attention:
        terms.append(Term("text context (k/v projection input)", shape.text_dim, "text", per_block=False))
    return terms


# ------------------------------------------------------------------------------------------------ estimate


@dataclass(frozen=True)
class ActivationEstimate:
    """Per-rank bytes of one forward + backward: ``blocks`` (all blocks' saved tensors), ``outside`` (the rest of
    the network), ``recompute`` (checkpointing: one block's activations during its recomputation), ``transient``
    (the Ulysses all-to-all buffers). :attr:`saved` and :attr:`total` add them up."""

    shape: DiTShape
    grid: Grid
    cp: int
    split: str
    checkpointing: str
    blocks: int
    outside: int
    recompute: int
    transient: int

    @property
    def tokens(self) -> int:
        """S = T' * H' * W'."""
        return math.prod(self.grid)

    @property
    def saved(self) -> int:
        """Bytes saved for backward at the peak (the end of the forward, or during a recomputation)."""
        return self.blocks + self.outside + self.recompute

    @property
    def total(self) -> int:
        """:attr:`saved` plus the Ulysses transient."""
        return self.saved + self.transient


def _bytes(terms: Sequence[Term], counts: dict[str, int], dtype_bytes: int) -> int:
    return sum(t.elements * counts[t.tokens] * (dtype_bytes if t.bytes_per_element is None else t.bytes_per_element)
               for t in terms)


def estimate_activations(
    shape: DiTShape, grid: Grid, cp: int = 1, *, checkpointing: str = "none", dtype_bytes: int = BF16
) -> ActivationEstimate:
    """Per-rank activation bytes of ``shape`` on the token grid ``grid`` at CP size ``cp`` (one clip)."""
    split = context_split(grid, cp, shape.heads)
    s = math.prod(grid)
    counts = {"local": s // cp, "remote": s - s // cp, "full": s, "text": shape.text_tokens}
    per_block = _bytes(block_terms(shape, cp, checkpointing=checkpointing), counts, dtype_bytes)
    outside = _bytes(outside_terms(shape, cp), counts, dtype_bytes)
    recompute = _bytes(block_terms(shape, cp), counts, dtype_bytes) if checkpointing == "full" else 0
    transient = 2 * 3 * (s // cp) * shape.hidden * dtype_bytes if cp > 1 else 0
    return ActivationEstimate(shape, grid, cp, split, checkpointing, shape.blocks * per_block, outside, recompute,
                              transient)


# ------------------------------------------------------------------------------------------------ tables


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.1f}"


def activation_table(
    shapes: Sequence[DiTShape] = (COSMOS_2B, COSMOS_14B),
    clips: Sequence[tuple[int, int, int]] = CLIPS,
    cp_sizes: Sequence[int] = CP_SIZES,
    *,
    checkpointing: str = "none",
    limit: int = LIMIT_BYTES,
) -> str:
    """Markdown: rows model x clip, columns CP sizes: GiB per rank (:attr:`ActivationEstimate.total`), ``✗`` above
    ``limit`` (80 GiB), ``✓`` else; the tokens column says how the sequence splits."""
    head = ["model", "clip (frames, HxW)", "tokens T'xH'xW' (split)"] + [f"CP {p}" for p in cp_sizes]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * len(cp_sizes)]
    for shape in shapes:
        for frames, height, width in clips:
            grid = token_grid(frames, height, width)
            splits = sorted({context_split(grid, p, shape.heads) for p in cp_sizes} - {"none"})
            cells = [shape.name, f"{frames}, {height}x{width}",
                     f"{grid[0]}x{grid[1]}x{grid[2]} = {math.prod(grid):,} ({', '.join(splits) or '-'})"]
            for p in cp_sizes:
                total = estimate_activations(shape, grid, p, checkpointing=checkpointing).total
                cells.append(f"{_gib(total)} {'✗' if total > limit else '✓'}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_block_line(shape: DiTShape, cp: int = 1) -> str:
    """e.g. ``29 h + 86 fp32 per token per block (P = 1)``: the formula's per-token coefficients."""
    terms = block_terms(shape, cp)
    h = sum(t.elements for t in terms if t.tokens == "local" and t.bytes_per_element is None) // shape.hidden
    fp32 = sum(t.elements for t in terms if t.tokens == "local" and t.bytes_per_element == FP32)
    return f"{shape.name}: {h} h + {fp32} fp32 per local token per block at P {'= 1' if cp == 1 else '> 1'}"


def docs_tables() -> str:
    """The tables of ``docs/distributed.md``, regenerated."""
    parts = [
        "Activation memory per rank, one clip, one forward + backward, bf16, GiB (✗: above 80 GiB):",
        "", "No activation checkpointing:", "", activation_table(),
        "", 'activation_checkpointing="full" (block inputs + one block recomputed):', "",
        activation_table(checkpointing="full"), "",
    ]
    parts += [per_block_line(s, p) for s in (COSMOS_2B, COSMOS_14B) for p in (1, 2)]
    return "\n".join(parts)


if __name__ == "__main__":
    print(docs_tables())
