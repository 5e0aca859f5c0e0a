"""The time-conditioned transformer: shapes, head_index, conditioning, masking, dtypes, remat."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from md4.networks.transformer import Transformer, count_params, local_mix

V, B, L = 5, 3, 8
CONFIG = dict(vocab_size=V, num_embeddings=V + 1, width=32, depth=2, num_heads=4)
TOKENS = jax.random.randint(jax.random.key(0), (B, L), 0, V + 1)
T = jnp.array([0.1, 0.5, 0.9])


def init(model, scale=0.1, seed=1):
  """Initial params plus scale * N(0, 1) noise, so that zero-initialised layers do something."""

  @jax.jit
  def perturbed_init():
    params = model.init(jax.random.key(seed), TOKENS, T)["params"]
    flat, unravel = ravel_pytree(params)
    return unravel(flat + scale * jax.random.normal(jax.random.key(seed + 1), flat.shape))

  return perturbed_init()


@functools.cache
def apply_fn(**overrides):
  """A jitted apply for one configuration (cached so that each compiles once)."""
  model = Transformer(**{**CONFIG, **overrides})

  @functools.partial(jax.jit, static_argnames="train")
  def apply(params, tokens, t, head_index=None, train=False, rng=None):
    rngs = {"dropout": rng} if rng is not None else None
    return model.apply({"params": params}, tokens, t, head_index=head_index, train=train,
                       rngs=rngs)

  return model, apply


@pytest.fixture(scope="module")
def base():
  """Perturbed params of the base configuration (shared by the variants), apply, and output."""
  model, apply = apply_fn()
  params = init(model)
  return params, apply, apply(params, TOKENS, T)


def param_shapes(**overrides):
  model = Transformer(**{**CONFIG, **overrides})
  return jax.eval_shape(model.init, jax.random.key(0), TOKENS, T)["params"]


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_output_shapes_and_head_index_gathers_the_full_output(base):
  params, apply, full = base
  assert full.shape == (B, L, V) and full.dtype == jnp.float32
  # One position per row: int[B] -> [B, V].
  query = jnp.array([2, 7, 0])
  np.testing.assert_allclose(apply(params, TOKENS, T, query), full[jnp.arange(B), query],
                             rtol=1e-5, atol=1e-5)
  # int[G, C]: flat positions within G groups of consecutive rows (G = 1: the whole batch,
  # G = B: each row) -> [G, C, V].
  for index in [jnp.array([[23, 0, 5, 5, 17]]), jnp.array([[1, 7], [0, 0], [6, 3]])]:
    groups = index.shape[0]
    out = apply(params, TOKENS, T, index)
    expected = full.reshape(groups, -1, V)[jnp.arange(groups)[:, None], index]
    assert out.shape == index.shape + (V,) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_head_reduce_runs_the_trunk_once_and_heads_agree(base):
  params, _, full = base
  model = Transformer(**CONFIG)
  index = jnp.array([[1, 7], [0, 0], [6, 3]])
  gathered, whole = model.apply({"params": params}, TOKENS, T,
                                head_reduce=lambda head: (head(index), head(None)))
  np.testing.assert_allclose(whole, full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gathered, full[jnp.arange(B)[:, None], index], rtol=1e-5,
                             atol=1e-5)
  hlo = jax.jit(lambda p: model.apply({"params": p}, TOKENS, T, head_reduce=lambda head: (
      jax.lax.cond(p["head"]["bias"][0] > 0, lambda: head(None)[:, :2],
                   lambda: head(index))))).lower(params).as_text()
  # The trunk is traced once, outside the cond: qkv, mlp_up and mlp_gate ([B, L, 96]) per block.
  qkv = [line for line in hlo.splitlines()
         if "dot_general" in line and line.rstrip().endswith(f"tensor<{B}x{L}x96xf32>")]
  assert len(qkv) == 3 * CONFIG["depth"], qkv


def test_count_params_and_mlp_width():
  params = param_shapes()
  d, n, h = 32, V + 1, 96  # hidden = 2/3 * 4 * 32 = 85.3, rounded up to a multiple of 32
  assert params["block_0"]["mlp_gate"]["kernel"].shape == (d, h)
  assert params["block_0"]["mlp_up"]["kernel"].shape == (d, h)
  time_mlp = 256 * d + d + d * d + d
  block = (d * 6 * d + 6 * d) + 3 * d * d + (d * d + d) + d * 2 * h + (h * d + d)
  expected = n * d + time_mlp + 2 * block + (d * 2 * d + 2 * d) + (d * V + V)
  assert count_params(params) == expected
  # Time-conditioned norms have no parameters of their own, whichever the kind.
  assert count_params(param_shapes(norm="rmsnorm")) == expected
  relu2 = param_shapes(mlp="relu2")  # hidden = 4 * 32, one input projection
  assert "mlp_gate" not in relu2["block_0"]
  assert relu2["block_0"]["mlp_up"]["kernel"].shape == (d, 4 * d)
  assert count_params(relu2) == expected + 2 * (2 * d * 4 * d - (d * 2 * h + h * d))


@pytest.mark.parametrize("mlp, norm", [("swiglu", "layernorm"), ("swiglu", "rmsnorm"),
                                       ("relu2", "layernorm"), ("relu2", "rmsnorm")])
@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_mlp_and_norm_variants_compute_their_formulas(mlp, norm):
  # One block without time input and with a zero QKV kernel, so attention contributes only
  # attn_out's bias; the rest is recomputed in numpy from the (perturbed) parameters.
  model, apply = apply_fn(depth=1, time_conditioning=False, mlp=mlp, norm=norm)
  params = init(model)
  params = {**params, "block_0": {**params["block_0"], "qkv": {
      "kernel": jnp.zeros_like(params["block_0"]["qkv"]["kernel"])}}}
  p = jax.tree.map(np.asarray, params)
  b = p["block_0"]

  def normalise(x, q):
    if norm == "rmsnorm":
      assert set(q) == {"scale"}
      return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * q["scale"]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    return x * q["scale"] + q["bias"]

  x = p["embed"]["embedding"][np.asarray(TOKENS)] + b["attn_out"]["bias"]
  h = normalise(x, b["norm2"])
  up = h @ b["mlp_up"]["kernel"]
  if mlp == "relu2":
    assert "mlp_gate" not in b and up.shape[-1] == 4 * 32
    h = np.maximum(up, 0) ** 2
  else:
    gate = h @ b["mlp_gate"]["kernel"]
    h = gate / (1 + np.exp(-gate)) * up
  x = x + h @ b["mlp_out"]["kernel"] + b["mlp_out"]["bias"]
  expected = normalise(x, p["final_norm"]) @ p["head"]["kernel"] + p["head"]["bias"]
  out = apply(params, TOKENS, None)
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_zero_modulation_makes_blocks_identity_and_time_irrelevant(base):
  params, apply, _ = base
  # adaLN-Zero at init: modulation layers are zero, so every block is the identity, the final
  # modulation is the identity, and the output is head(LayerNorm(embedding)) whatever t is.
  flat = traverse_util.flatten_dict(params, sep="/")
  params = traverse_util.unflatten_dict(
      {k: jnp.zeros_like(v) if "modulation" in k else v for k, v in flat.items()}, sep="/")
  out = apply(params, TOKENS, T)
  np.testing.assert_array_equal(out, apply(params, TOKENS, 1.0 - T))
  x = params["embed"]["embedding"][TOKENS]
  x = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
  expected = x @ params["head"]["kernel"] + params["head"]["bias"]
  assert jnp.abs(expected).max() > 0.1
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_modulation_is_zero_at_init():
  model, _ = apply_fn()
  params = jax.jit(model.init)(jax.random.key(0), TOKENS, T)["params"]
  zero = [params["final_modulation"], params["head"]] + [
      params[f"block_{i}"]["modulation"] for i in range(CONFIG["depth"])]
  assert all(not jnp.any(x) for x in jax.tree_util.tree_leaves(zero))


def test_time_changes_the_output_with_random_params(base):
  params, apply, full = base
  diff = jnp.abs(apply(params, TOKENS, 1.0 - T) - full)
  assert diff[1].max() < 1e-4  # example 1 has t = 0.5 both times
  assert diff[0].max() > 0.1 and diff[2].max() > 0.1


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_without_time_conditioning_t_is_ignored():
  model, apply = apply_fn(time_conditioning=False)
  params = init(model)
  assert "modulation" not in params["block_0"] and "scale" in params["block_0"]["norm1"]
  out = apply(params, TOKENS, None)
  np.testing.assert_array_equal(out, apply(params, TOKENS, T))
  idx = jnp.array([[3, 20]])
  np.testing.assert_allclose(apply(params, TOKENS, None, idx)[0], out.reshape(-1, V)[idx[0]],
                             atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_direction(base, causal):
  params = base[0]
  _, apply = apply_fn(causal=causal)
  out = apply(params, TOKENS, T)
  changed = apply(params, TOKENS.at[:, L - 1].set((TOKENS[:, L - 1] + 1) % (V + 1)), T)
  diff = jnp.abs(changed - out).max(axis=-1)  # [B, L]
  assert diff[:, L - 1].min() > 0.1
  if causal:
    assert diff[:, : L - 1].max() < 1e-5
  else:  # every earlier position of every example sees the change
    assert diff[:, : L - 1].min() > 1e-3, diff


@pytest.mark.parametrize("size, causal", [(1, False), (3, False), (4, False), (3, True)])
def test_local_mix_is_the_depthwise_convolution_it_says(size, causal):
  h = np.random.default_rng(0).normal(size=(2, 7, 5))
  kernel = np.random.default_rng(1).normal(size=(size, 5))
  centre = size - 1 if causal else (size - 1) // 2
  want = np.zeros_like(h)
  for i in range(7):  # out[i] = sum_k kernel[k] h[i + k - centre], zero outside
    for k in range(size):
      if 0 <= i + k - centre < 7:
        want[:, i] += kernel[k] * h[:, i + k - centre]
  np.testing.assert_allclose(local_mix(jnp.asarray(h), jnp.asarray(kernel), causal), want,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_local_branch_starts_at_zero_and_keeps_causality():
  model = Transformer(**CONFIG, causal=True, local_mix=3)
  params = model.init(jax.random.key(0), TOKENS, T)["params"]
  assert all(not params[f"block_{i}"]["local_mix"].any() for i in range(2))
  without = Transformer(**CONFIG, causal=True).apply(
      {"params": {k: {n: w for n, w in v.items() if n != "local_mix"} if k.startswith("block")
                  else v for k, v in params.items()}}, TOKENS, T)
  np.testing.assert_allclose(model.apply({"params": params}, TOKENS, T), without, atol=1e-6)
  params = init(model, seed=3)  # a non-zero local branch: still no position sees a later one
  changed = TOKENS.at[:, L - 1].set((TOKENS[:, L - 1] + 1) % (V + 1))
  diff = jnp.abs(model.apply({"params": params}, changed, T) -
                 model.apply({"params": params}, TOKENS, T)).max(axis=-1)
  assert diff[:, L - 1].min() > 1e-3 and diff[:, :L - 1].max() < 1e-5


def test_bfloat16_keeps_float32_params_and_close_outputs(base):
  params, _, full = base
  _, apply = apply_fn(dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32
             for x in jax.tree_util.tree_leaves(param_shapes(dtype=jnp.bfloat16)))
  out = apply(params, TOKENS, T)
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
  err = jnp.abs(out - full).max() / jnp.abs(full).max()
  assert err < 0.04, err


def test_dropout_only_in_training(base):
  params, _, full = base
  _, apply = apply_fn(dropout=0.3)
  rng = jax.random.key(7)
  np.testing.assert_allclose(apply(params, TOKENS, T, train=False, rng=rng), full, atol=1e-6)
  train_a = apply(params, TOKENS, T, train=True, rng=rng)
  train_b = apply(params, TOKENS, T, train=True, rng=jax.random.key(8))
  assert jnp.abs(train_a - full).max() > 0.1 and jnp.abs(train_a - train_b).max() > 0.1
  np.testing.assert_array_equal(train_a, apply(params, TOKENS, T, train=True, rng=rng))


@pytest.mark.slow  # compile-heavy or end to end (docs/testing.md)
def test_remat_gives_same_output_and_gradients(base):
  params, _, _ = base
  grads = []
  for remat in (False, True):
    model = Transformer(**CONFIG, dropout=0.2, remat=remat)

    def loss(p, model=model):
      out = model.apply({"params": p}, TOKENS, T, train=True,
                        rngs={"dropout": jax.random.key(3)})
      return jnp.mean(out**2)

    grads.append(jax.jit(jax.value_and_grad(loss))(params))
  (loss_a, grad_a), (loss_b, grad_b) = grads
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         grad_a, grad_b)
  assert jnp.abs(grad_a["block_0"]["qkv"]["kernel"]).max() > 1e-3


def test_bfloat16_head_is_a_float32_product_of_the_same_activations():
  # Without time conditioning the head's input is the final norm's output (bfloat16 here).
  model = Transformer(**CONFIG, dtype=jnp.bfloat16, time_conditioning=False)
  params = init(model)
  params = {**params, "head": {**params["head"], "kernel": 30.0 * params["head"]["kernel"]}}
  logits, state = model.apply({"params": params}, TOKENS, None, capture_intermediates=True)
  x = state["intermediates"]["final_norm"]["__call__"][0]
  assert x.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  assert float(jnp.abs(logits).max()) > 5  # logits near 10, where bfloat16 steps are 0.06
  # The float32 head on the same (bfloat16) activations and bfloat16-rounded weights.
  kernel = params["head"]["kernel"].astype(jnp.bfloat16).astype(jnp.float32)
  expected = jnp.einsum("bld,dv->blv", x.astype(jnp.float32), kernel,
                        precision=jax.lax.Precision.HIGHEST) + params["head"]["bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=2e-5)


@pytest.mark.slow  # ~3 min on a shared 2-core machine (many small compiles)
def test_padded_vocabulary_changes_no_nelbo_and_no_sample():
  from md4 import config_lib, methods

  def method(pad):
    c = config_lib.base()
    c.seq_len = 16
    c.model.update(width=32, depth=1, num_heads=2, pad_vocab_to=pad)
    c.diffusion.head_fraction = 0.5
    c.sampling.num_steps = 8
    return methods.create(c, 27)

  plain, padded = method(1), method(128)
  flat, unravel = ravel_pytree(plain.init(jax.random.key(0)))
  params = unravel(flat + 0.1 * jax.random.normal(jax.random.key(1), flat.shape))
  # The same function with zero rows / columns appended to the vocabulary axes.
  pad = lambda x, axis: jnp.pad(x, [(0, 128 * -(-x.shape[axis] // 128) - x.shape[axis])
                                    if a == axis else (0, 0) for a in range(x.ndim)])
  padded_params = {**params, "embed": {"embedding": pad(params["embed"]["embedding"], 0)},
                   "head": {"kernel": pad(params["head"]["kernel"], 1),
                            "bias": pad(params["head"]["bias"], 0)}}
  assert padded_params["head"]["kernel"].shape == (32, 128)
  assert jax.tree.map(jnp.shape, padded_params) == jax.tree.map(
      jnp.shape, jax.eval_shape(padded.init, jax.random.key(0)))
  tokens = jax.random.randint(jax.random.key(2), (8, 16), 0, 27)
  rng = jax.random.key(3)
  for fn in ("evaluate", "loss"):  # full head, and the masked-position head (head_fraction)
    a = jax.jit(getattr(plain, fn))(params, tokens, rng)
    b = jax.jit(getattr(padded, fn))(padded_params, tokens, rng)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), a, b)
  sample = lambda m, p: jax.jit(m.sample, static_argnums=2)(p, jax.random.key(4), 8)
  np.testing.assert_array_equal(sample(plain, params), sample(padded, padded_params))
  # The padded columns are -inf and never drawn.
  logits = padded.model.apply({"params": padded_params}, tokens, jnp.full((8,), 0.5))
  assert logits.shape == (8, 16, 128) and bool(jnp.all(logits[..., 27:] == -jnp.inf))
  draws = jax.random.categorical(jax.random.key(5), logits, shape=(64, 8, 16))
  assert int(draws.max()) < 27
