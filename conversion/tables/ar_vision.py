"""Key table of the AR's source-image tokenizer: `model.visual.*` (ViT) and `model.vqmodel.*` (VQ)."""

from __future__ import annotations

from conversion.table import CONV, COPY, LINEAR, Rule

_B = "model.visual.blocks.{i}"

RULES: list[Rule] = [
    Rule("model.visual.patch_embed.proj.weight", "visual.patch_embed.proj.kernel", CONV),
    Rule("model.visual.patch_embed.proj.bias", "visual.patch_embed.proj.bias", COPY),
    Rule("model.visual.embeddings.position_embedding.weight",
         "visual.embeddings.position_embedding.embedding", COPY),
    *[Rule(f"{_B}.{n}.{p}", f"visual.blocks.{{i}}.{n}.{p}", COPY)
      for n in ("norm1", "norm2") for p in ("weight", "bias")],
    *[Rule(f"{_B}.{m}.weight", f"visual.blocks.{{i}}.{m}.kernel", LINEAR)
      for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")],
    *[Rule(f"{_B}.{m}.bias", f"visual.blocks.{{i}}.{m}.bias", COPY)
      for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")],
    *[Rule(f"model.vqmodel.{c}.weight", f"vqmodel.{c}.kernel", CONV) for c in ("quant_conv", "post_quant_conv")],
    *[Rule(f"model.vqmodel.{c}.bias", f"vqmodel.{c}.bias", COPY) for c in ("quant_conv", "post_quant_conv")],
    Rule("model.vqmodel.quantize.embedding.weight", "vqmodel.quantize.embedding.embedding", COPY),
]
