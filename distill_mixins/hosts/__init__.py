"""Host adapters for diffusers video transformers (needs ``pip install 'distill-mixins[diffusers]'``).

Compose a method mixin before a host, as with your own model class::

    from distill_mixins import DMD2Config, DMD2Mixin
    from distill_mixins.hosts import CosmosVideo2WorldHost

    class CosmosDMD2(DMD2Mixin, CosmosVideo2WorldHost):
        pass

    model = CosmosDMD2.from_pretrained("checkpoints/predict2.5/transformer", distill=DMD2Config.cosmos_predict2_5())

- :class:`CosmosVideo2WorldHost`: ``CosmosTransformer3DModel`` (Cosmos Predict2 / Predict2.5 DiT);
- :class:`WanVideo2WorldHost`: ``WanTransformer3DModel`` (Wan 2.1 / 2.2);
- :class:`CausalWanHost`: the same made block-causal with a KV cache (a causal student's host, docs/causal.md);
- :class:`TextConditioner`, :class:`ByteTokenizer`: prompts -> embeddings; :class:`VideoCondition`: the condition;
- :func:`load_transformer`: teacher weights from a local ``save_pretrained`` folder or a ``.safetensors`` file.

See docs/distill_your_model.md. The rest of distill_mixins imports without diffusers.
"""

from __future__ import annotations

try:
    import diffusers  # noqa: F401
    from diffusers import CosmosTransformer3DModel, WanTransformer3DModel  # noqa: F401
except ImportError as err:  # tests/test_hosts_wan.py blocks diffusers to test this
    raise ImportError(
        "distill_mixins.hosts needs diffusers with CosmosTransformer3DModel and WanTransformer3DModel "
        f"({err}): pip install 'distill-mixins[diffusers]'"
    ) from err

from distill_mixins.hosts.base import DiffusersVideoHost
from distill_mixins.hosts.conditioning import ByteTokenizer, TextConditioner, VideoCondition, frame_mask_for
from distill_mixins.hosts.cosmos import CosmosVideo2WorldHost
from distill_mixins.hosts.loading import load_state_dict_strict, load_transformer
from distill_mixins.hosts.wan import WanImageCondition, WanVideo2WorldHost
from distill_mixins.hosts.wan_causal import CausalWanHost

__all__ = [
    "ByteTokenizer",
    "CausalWanHost",
    "CosmosVideo2WorldHost",
    "DiffusersVideoHost",
    "TextConditioner",
    "VideoCondition",
    "WanImageCondition",
    "WanVideo2WorldHost",
    "frame_mask_for",
    "load_state_dict_strict",
    "load_transformer",
]
