"""Key table of the AR model (transformers `GlmImageForConditionalGeneration`) <-> `glm_jax.models.ar.GlmImageAR`.

Text decoder and head rules are here; the ViT / VQ rules (`visual.*`, `vqmodel.*`) come from
`conversion.tables.ar_vision`. Fused weights stay fused (`mlp.gate_up_proj`), so every rule is COPY or LINEAR.
"""

from __future__ import annotations

from conversion.table import COPY, LINEAR, Rule
from conversion.tables import ar_vision

_T = "model.language_model"
_L = f"{_T}.layers.{{i}}"

TEXT_RULES: list[Rule] = [
    Rule(f"{_T}.embed_tokens.weight", "text.embed_tokens.embedding", COPY),
    *[Rule(f"{_L}.self_attn.{p}.weight", f"text.layers.{{i}}.self_attn.{p}.kernel", LINEAR)
      for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
    *[Rule(f"{_L}.self_attn.{p}.bias", f"text.layers.{{i}}.self_attn.{p}.bias", COPY)
      for p in ("q_proj", "k_proj", "v_proj")],
    Rule(f"{_L}.mlp.gate_up_proj.weight", "text.layers.{i}.mlp.gate_up_proj.kernel", LINEAR),
    Rule(f"{_L}.mlp.down_proj.weight", "text.layers.{i}.mlp.down_proj.kernel", LINEAR),
    *[Rule(f"{_L}.{n}.weight", f"text.layers.{{i}}.{n}.weight", COPY)
      for n in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm")],
    Rule(f"{_T}.norm.weight", "text.norm.weight", COPY),
    Rule("lm_head.weight", "lm_head.kernel", LINEAR),
]

RULES: list[Rule] = TEXT_RULES + list(ar_vision.RULES)

# torch keys that exist in the checkpoint but have no parameter here (e.g. the unused VQ post_quant_conv)
IGNORE_ON_IMPORT: tuple[str, ...] = tuple(getattr(ar_vision, "IGNORE_ON_IMPORT", ()))
