"""Infilling: templates and image regions, and samplers that never change known tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import config_lib, methods
from md4.data import tokenizers
from md4.evaluation import infill

CHAR = tokenizers.CharTokenizer()
needs_gpt2 = pytest.mark.skipif(
  not tokenizers.DEFAULT_GPT2_RANKS.is_file(),
  reason="data/gpt2.tiktoken absent: run `python -m md4.data.prepare gpt2 --out data`",
)


def test_text_template_char():
  known, mask = infill.text_template("to be __ not", CHAR, 16)
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
  assert CHAR.decode(np.where(mask, known, CHAR.vocab_size)) == "to be __ not____"
  known, mask = infill.text_template("x_y", CHAR, 3, gap="_")
  assert mask.tolist() == [True, False, True] and known[[0, 2]].tolist() == [23, 24]


def test_prompt_is_known_text_at_the_start_cut_to_seq_len():
  known, mask = infill.prompt("to be", CHAR, 8)
  assert mask.tolist() == [True] * 5 + [False] * 3 and known.dtype == np.int32
  assert CHAR.decode(known[:5]) == "to be" and known[5:].tolist() == [0, 0, 0]
  known, mask = infill.prompt("to be or not", CHAR, 4)
  assert mask.all() and CHAR.decode(known) == "to b"


@needs_gpt2
def test_text_template_gpt2_gap_is_one_token_and_pieces_are_encoded_alone():
  tok = tokenizers.get_tokenizer("gpt2")
  known, mask = infill.text_template("Hello___ world", tok, 8)
  assert mask.tolist() == [True, False, False, False, True, False, False, False]
  assert known[0] == 15496 and known[4] == 995  # "Hello", " world"


@pytest.mark.parametrize("template, seq_len, message", [
    ("abcdef", 4, "6 tokens long, more than seq_len 4"),
    ("abcd", 4, "fills all 4 tokens"),
    ("ab_C", 8, "only a-z and space"),
])
def test_text_template_errors(template, seq_len, message):
  with pytest.raises(ValueError, match=message):
    infill.text_template(template, CHAR, seq_len)


def test_image_regions():
  unknown = lambda region: ~infill.image_region((4, 6, 2), region)
  assert unknown("top")[:2].all() and not unknown("top")[2:].any()
  assert unknown("bottom")[2:].all() and not unknown("bottom")[:2].any()
  assert unknown("left")[:, :3].all() and not unknown("left")[:, 3:].any()
  assert unknown("right")[:, 3:].all() and not unknown("right")[:, :3].any()
  center = np.zeros((4, 6, 2), bool)
  center[1:3, 1:5] = True
  np.testing.assert_array_equal(unknown("center"), center)
  explicit = np.zeros((4, 6, 2), bool)
  explicit[1:, :2] = True
  np.testing.assert_array_equal(unknown("1:,:2"), explicit)


@pytest.mark.parametrize("region, message", [
    ("middle", "unknown infill region 'middle'"),
    ("0:9,0:2", "outside the 4x6 image"),
    ("2:2,0:6", "is empty"),
])
def test_image_region_errors(region, message):
  with pytest.raises(ValueError, match=message):
    infill.image_region((4, 6, 1), region)


def test_side_by_side():
  known = np.full((2, 2, 2, 1), 9)
  mask = np.zeros((2, 2, 1), bool)
  mask[0] = True
  out = infill.side_by_side(known, mask, np.full((2, 2, 2, 1), 3), fill=5)
  assert out.shape == (2, 2, 5, 1)
  np.testing.assert_array_equal(out[0, :, :, 0], [[9, 9, 5, 3, 3], [5, 5, 5, 3, 3]])


def perturbed_params(method, seed=0, scale=0.5):
  """Random weights everywhere (the output heads start at zero), so the model has preferences."""
  params = jax.jit(method.init)(jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                      for p, k in zip(leaves, keys, strict=True)])


def tiny_config(model_type):
  c = config_lib.base()
  c.model_type = model_type
  c.seq_len = 32
  c.model.update(width=32, depth=1, num_heads=2)
  c.sampling.update(num_steps=8)
  c.ggm.sweeps = 1
  if model_type == "md4_pixels":
    c.image_shape = (8, 8, 1)
    c.unet.update(base_channels=8, channel_mults=(1,), attn_resolutions=(), embed_dim=8)
  return c


@pytest.mark.parametrize("model_type, renoise", [("md4", False), ("genmd4", False),
                                                 ("ggm", False), ("ggm", True)])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_text_infill_never_changes_known_tokens(model_type, renoise):
  config = tiny_config(model_type)
  config.ggm.renoise_known = renoise
  method = methods.create(config, CHAR.vocab_size)
  known, mask = infill.text_template("the ____ of _____ is ___", CHAR, config.seq_len)
  samples = np.asarray(jax.jit(method.sample, static_argnums=2)(
      perturbed_params(method), jax.random.key(3), 16, jnp.asarray(known), jnp.asarray(mask)))
  assert samples.shape == (16, 32)
  np.testing.assert_array_equal(samples[:, mask], np.broadcast_to(known[mask], (16, mask.sum())))
  free = samples[:, ~mask]
  assert free.min() >= 0 and free.max() < CHAR.vocab_size  # every gap filled, no mask id left
  assert len(np.unique(free)) > 5  # the gaps are drawn, not copied


@pytest.mark.slow  # UNet compilation takes ~20 s on a CPU
def test_image_infill_never_changes_known_pixels():
  config = tiny_config("md4_pixels")
  method = methods.create(config, 256)
  known = np.asarray(jax.random.randint(jax.random.key(4), (6, 8, 8, 1), 0, 256))
  mask = np.broadcast_to(infill.image_region((8, 8, 1), "center"), known.shape)
  samples = np.asarray(jax.jit(method.sample, static_argnums=2)(
      perturbed_params(method), jax.random.key(5), 6, jnp.asarray(known), jnp.asarray(mask)))
  np.testing.assert_array_equal(samples[mask], known[mask])
  assert samples[~mask].min() >= 0 and samples[~mask].max() < 256
  assert (samples[~mask] != known[~mask]).mean() > 0.9  # filled by the model, not copied
