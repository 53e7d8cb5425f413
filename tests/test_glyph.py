"""Glyph path parity: T5 encoder vs transformers `T5EncoderModel`, ByT5 ids vs `ByT5Tokenizer`, glyph texts and
batched glyph embeddings vs diffusers' `GlmImagePipeline`, and the T5 key table round trip (tiny fp32 models)."""

from __future__ import annotations

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conversion.apply import load_state_dict_into, torch_state_dict
from conversion.tables import t5 as t5_table
from glm_jax import glyph
from glm_jax.models.t5 import T5Config, T5Encoder, relative_position_buckets
from tests.tiny_torch import tiny_t5
from tests.util import rel_err, torch_to_numpy_state

PROMPTS = [
    "A plain photo of a cat on a sofa",                                  # no quotes -> [""]
    'A shop sign that says "OPEN"',                                      # one
    'Poster with "SALE" and "50% OFF" in red',                           # two: even-count leading pad
    "Label 'a', \u201cbb\u201d and \u300cccc\u300d",                     # three, pattern order != text order
    "it's and don't forget",                                             # apostrophes are quotes
    "Curly \u201cHello world\u201d quotes",
    "CJK \u300c\u4f60\u597d\uff0c\u4e16\u754c\u300d sign",
    'Menu: "Caf\u00e9 cr\u00e8me \u2013 3\u20ac" and "na\u00efve \U0001F600" and "\u00fc"',
    '"a </s> b" and "x <pad>y" and "<extra_id_7>z<unk>" and "<extra_id_1234>"',
]


def _pipeline_cls():
    from diffusers.pipelines.glm_image.pipeline_glm_image import GlmImagePipeline
    return GlmImagePipeline


def _pipeline_stub(text_encoder):
    """The attributes `_get_glyph_embeds` / `encode_prompt` read from `self`, around the unbound methods."""
    from transformers import ByT5Tokenizer
    cls = _pipeline_cls()
    stub = types.SimpleNamespace(tokenizer=ByT5Tokenizer(), text_encoder=text_encoder,
                                 _execution_device=torch.device("cpu"))
    stub.get_glyph_texts = lambda p: cls.get_glyph_texts(stub, p)
    stub._get_glyph_embeds = lambda *a, **k: cls._get_glyph_embeds(stub, *a, **k)
    return stub


@pytest.fixture(scope="module")
def models():
    torch_model = tiny_t5(seed=3)
    cfg = T5Config.from_hf(torch_model.config.to_dict())
    module = T5Encoder(cfg, rngs=nnx.Rngs(0))
    load_state_dict_into(module, torch_to_numpy_state(torch_model), t5_table.RULES,
                         ignore=t5_table.ignore_on_import)
    return torch_model, module


def test_config_from_hf():
    d = tiny_t5().config.to_dict()
    cfg = T5Config.from_hf(d)
    assert (cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads, cfg.vocab_size) == (32, 8, 64, 2, 4, 384)
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"
    assert T5Config.from_hf({**d, "feed_forward_proj": "relu"}).is_gated_act is False
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config.from_hf({**d, "feed_forward_proj": "gated-swish-x"})
    with pytest.raises(ValueError, match="not supported"):
        T5Config.from_hf({**d, "feed_forward_proj": "gated-mish"})


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (32, 20), (64, 256), (8, 16)])
def test_relative_position_buckets_match_torch(num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention
    q, k = 700, 701
    rel = torch.arange(k)[None, :] - torch.arange(q)[:, None]
    want = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(q, k, num_buckets, max_distance), want)


def test_t5_encoder_parity(models):
    torch_model, module = models
    B, S = 2, 150                                     # S > max_distance: exercises the log and clipped buckets
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 384, (B, S))
    mask = np.ones((B, S), np.int64)
    mask[1, 97:] = 0                                  # right padding in row 1
    with torch.no_grad():
        want = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    got = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(module, jnp.asarray(ids), jnp.asarray(mask)))
    assert got.shape == (B, S, 32)
    err = rel_err(got, want)
    assert err < 1e-5, err


def test_t5_relu_variant_parity():
    from transformers import T5Config as HFConfig
    from transformers import T5EncoderModel
    torch.manual_seed(1)
    tm = T5EncoderModel(HFConfig(vocab_size=300, d_model=24, d_kv=6, d_ff=40, num_layers=2, num_heads=3,
                                 feed_forward_proj="relu", dropout_rate=0.0)).eval()
    module = T5Encoder(T5Config.from_hf(tm.config.to_dict()), rngs=nnx.Rngs(0))
    load_state_dict_into(module, torch_to_numpy_state(tm), t5_table.RULES, ignore=t5_table.ignore_on_import)
    ids = np.random.default_rng(1).integers(0, 300, (2, 13))
    with torch.no_grad():
        want = tm(torch.tensor(ids)).last_hidden_state.numpy()
    assert rel_err(module(jnp.asarray(ids)), want) < 1e-5


def test_glyph_texts_match_pipeline():
    cls = _pipeline_cls()
    want = cls.get_glyph_texts(None, PROMPTS)
    assert [glyph.quoted_texts(p) for p in PROMPTS] == want
    assert [glyph.glyph_texts(p) for p in PROMPTS] == [w or [""] for w in want]
    assert glyph.glyph_texts("it's don't") == ["s don"]
    assert glyph.glyph_texts("Label 'a', \u201cbb\u201d and \u300cccc\u300d") == ["a", "bb", "ccc"]


@pytest.mark.parametrize("max_length", [2048, 6, 1])
def test_byt5_ids_match_tokenizer(max_length):
    from transformers import ByT5Tokenizer
    tok = ByT5Tokenizer()
    texts = [t for p in PROMPTS for t in glyph.glyph_texts(p)] + [
        "", "ab</s>", "</s>", "  spaced  <pad>  out ", "\t<unk>\n", "<<pad>>", "<extra_id_12><extra_id_124>",
        "<extra_id_125>", "</s", "a" * 3000, "\u00e9" * 1500, "x" * 2046 + "</s>", "\u00a0<pad>\u3000z"]
    want = tok(texts, max_length=max_length, truncation=True).input_ids
    assert [glyph.byt5_ids(t, max_length) for t in texts] == want
    # Random strings built from fragments of special tokens, whitespace and multi-byte characters.
    rng = np.random.default_rng(max_length)
    parts = ["<", ">", "/", "s", "pad", "unk", "extra_id_", "1", "2", "9", " ", "\n", "\u00e9", "\u4e2d", "</s>",
             "<pad>", "<unk>", "<extra_id_3>", "'", '"']
    fuzz = ["".join(rng.choice(parts, rng.integers(0, 12))) for _ in range(300)]
    assert [glyph.byt5_ids(t, max_length) for t in fuzz] == tok(fuzz, max_length=max_length,
                                                                  truncation=True).input_ids


def test_glyph_token_ids_even_count_pad():
    from transformers import ByT5Tokenizer
    tok = ByT5Tokenizer()
    for p in PROMPTS:
        texts = glyph.glyph_texts(p)
        ids = tok(texts, max_length=2048, truncation=True).input_ids
        want = [[tok.pad_token_id] * ((len(ids) + 1) % 2) + x for x in ids]    # the pipeline's expression
        assert glyph.glyph_token_ids(texts) == want
    assert glyph.glyph_token_ids(glyph.glyph_texts('"ab" and "c"')) == [[0, 100, 101, 1], [0, 102, 1]]
    assert glyph.glyph_token_ids(glyph.glyph_texts('"ab"')) == [[100, 101, 1]]
    assert glyph.glyph_token_ids(glyph.glyph_texts("none")) == [[1]]


@pytest.mark.parametrize("batch,max_length", [(PROMPTS, 2048), (PROMPTS[2:4], 2048), (PROMPTS[7:], 5),
                                              (PROMPTS[:1], 2048)])
def test_glyph_embeds_match_pipeline(models, batch, max_length):
    torch_model, module = models
    stub = _pipeline_stub(torch_model)
    with torch.no_grad():
        want = _pipeline_cls()._get_glyph_embeds(stub, batch, max_length, torch.device("cpu"), torch.float32)
    got, lengths = glyph.glyph_embeds(module, batch, max_length=max_length)
    assert got.shape == tuple(want.shape)
    want = want.numpy()
    # Left zero padding: exactly zero where the pipeline pads, nonzero where it has tokens.
    for b, n in enumerate(lengths):
        assert np.all(np.asarray(got[b, :got.shape[1] - n]) == 0)
        assert np.all(np.abs(want[b, want.shape[1] - n:]).sum(-1) > 0)
    err = rel_err(got, want)
    assert err < 1e-5, err
    unbucketed, _ = glyph.glyph_embeds(module, batch, max_length=max_length, bucket=False)
    assert rel_err(unbucketed, want) < 1e-5


def test_encode_prompt_positive_and_negative(models):
    torch_model, module = models
    stub = _pipeline_stub(torch_model)
    batch = PROMPTS[1:4]
    with torch.no_grad():
        pos, neg = _pipeline_cls().encode_prompt(stub, batch, do_classifier_free_guidance=True,
                                                 device=torch.device("cpu"), dtype=torch.float32)
    got_pos, _ = glyph.glyph_embeds(module, batch)
    got_neg = glyph.negative_glyph_embeds(module, len(batch))
    assert got_neg.shape == tuple(neg.shape) == (3, 1, 32)
    assert rel_err(got_pos, pos.numpy()) < 1e-5
    assert rel_err(got_neg, neg.numpy()) < 1e-5


def test_key_table_round_trip(models, tmp_path):
    from safetensors.numpy import save_file
    from transformers import T5EncoderModel
    torch_model, module = models
    src = torch_to_numpy_state(torch_model)
    assert set(src) - {k for k in src if t5_table.ignore_on_import(k)} == set(torch_state_dict(module,
                                                                                               t5_table.RULES))
    out = torch_state_dict(module, t5_table.RULES)
    for k, v in out.items():
        assert v.dtype == src[k].dtype and np.array_equal(v, src[k]), k
    # What save_pretrained writes is exactly the exported key set.
    ref_dir = tmp_path / "ref"
    torch_model.save_pretrained(ref_dir)
    from safetensors import safe_open
    with safe_open(str(ref_dir / "model.safetensors"), "np") as f:
        assert set(f.keys()) == set(out)
    # The export loads into transformers with no missing or unexpected keys, tied embedding restored.
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(exp_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (exp_dir / "config.json").write_text(json.dumps(torch_model.config.to_dict()))
    reloaded, info = T5EncoderModel.from_pretrained(exp_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, torch_model.state_dict()[k]), k
    assert reloaded.encoder.embed_tokens.weight.data_ptr() == reloaded.shared.weight.data_ptr()
