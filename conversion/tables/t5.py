"""Key table between transformers `T5EncoderModel` (the GLM-Image `text_encoder`) and `glm_jax.models.t5`.

The torch module holds the token embedding twice, tied: `shared.weight` and `encoder.embed_tokens.weight`.
`T5EncoderModel.save_pretrained` writes only `shared.weight` (checked with transformers 5.23: 21 of the 22
state-dict entries of the tiny model reach `model.safetensors`) and `from_pretrained` re-ties
`encoder.embed_tokens.weight` to it with no missing or unexpected keys. So:

* import: `shared.weight` -> `shared.embedding`; `encoder.embed_tokens.weight`, when a file or an in-memory
  `state_dict()` has it, is skipped (`IGNORE_ON_IMPORT` / `ignore_on_import`);
* export: only `shared.weight` is written, which is exactly what `save_pretrained` produces.

Only block 0 has `relative_attention_bias`; the rule has no `{i}` on purpose.
"""

from __future__ import annotations

from conversion.table import COPY, LINEAR, Rule

_ATTN = "encoder.block.{i}.layer.0.SelfAttention"
_FF = "encoder.block.{i}.layer.1.DenseReluDense"

RULES: list[Rule] = [
    Rule("shared.weight", "shared.embedding", COPY),
    Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
         "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.embedding", COPY),
    *[Rule(f"{_ATTN}.{name}.weight", f"{_ATTN}.{name}.kernel", LINEAR) for name in ("q", "k", "v", "o")],
    Rule("encoder.block.{i}.layer.0.layer_norm.weight", "encoder.block.{i}.layer.0.layer_norm.weight", COPY),
    *[Rule(f"{_FF}.{name}.weight", f"{_FF}.{name}.kernel", LINEAR) for name in ("wi_0", "wi_1", "wi", "wo")],
    Rule("encoder.block.{i}.layer.1.layer_norm.weight", "encoder.block.{i}.layer.1.layer_norm.weight", COPY),
    Rule("encoder.final_layer_norm.weight", "encoder.final_layer_norm.weight", COPY),
]

# Tied duplicate of `shared.weight`; transformers re-ties it on load, so it is never written on export.
IGNORE_ON_IMPORT: tuple[str, ...] = ("encoder.embed_tokens.weight",)


def ignore_on_import(key: str) -> bool:
    """True for torch keys that carry no parameter of their own (the tied embedding copy)."""
    return key in IGNORE_ON_IMPORT
