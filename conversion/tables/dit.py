"""Key table between diffusers `GlmImageTransformer2DModel` and `glm_jax.models.dit.GlmImageDiT`.

Names mirror torch except diffusers' `FeedForward` (`net.0.proj` -> `proj_in`, `net.2` -> `proj_out`) and the
attention output (`attn1.to_out.0` -> `attn1.to_out`). The fused adaLN linears stay fused: `norm1.linear` holds the
12 modulation chunks in torch's order, `norm_out.linear` is `[scale; shift]`. Every rule is COPY or LINEAR; the
affine-free norms and the RoPE have no tensors.
"""

from __future__ import annotations

from conversion.table import COPY, LINEAR, Rule


def _linear(torch_name: str, jax_name: str) -> list[Rule]:
    return [Rule(f"{torch_name}.weight", f"{jax_name}.kernel", LINEAR),
            Rule(f"{torch_name}.bias", f"{jax_name}.bias", COPY)]


def _ff(torch_name: str, jax_name: str) -> list[Rule]:
    return _linear(f"{torch_name}.net.0.proj", f"{jax_name}.proj_in") + _linear(f"{torch_name}.net.2",
                                                                                f"{jax_name}.proj_out")


_B = "transformer_blocks.{i}"
_TE = "time_condition_embed"

RULES: list[Rule] = [
    *_linear("image_projector.proj", "image_projector.proj"),
    *_ff("glyph_projector", "glyph_projector"),
    Rule("prior_token_embedding.weight", "prior_token_embedding.embedding", COPY),
    *_ff("prior_projector", "prior_projector"),
    *[r for emb in ("timestep_embedder", "condition_embedder") for n in ("linear_1", "linear_2")
      for r in _linear(f"{_TE}.{emb}.{n}", f"{_TE}.{emb}.{n}")],
    *_linear(f"{_B}.norm1.linear", f"{_B}.norm1.linear"),
    *[r for n in ("to_q", "to_k", "to_v") for r in _linear(f"{_B}.attn1.{n}", f"{_B}.attn1.{n}")],
    *_linear(f"{_B}.attn1.to_out.0", f"{_B}.attn1.to_out"),
    *_ff(f"{_B}.ff", f"{_B}.ff"),
    *_linear("norm_out.linear", "norm_out.linear"),
    *_linear("proj_out", "proj_out"),
]
