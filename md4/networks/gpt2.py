"""GPT-2 (Radford et al. 2019) in Flax, loading Hugging Face checkpoints: the standard judge of
text samples (generative perplexity; docs/gpt2.md).

A checkpoint is a local snapshot directory of a Hugging Face GPT-2 model (gpt2, gpt2-medium,
gpt2-large, gpt2-xl): `config.json` and `model.safetensors`, read with `safetensors` (numpy, no
torch). Pre-LayerNorm blocks, GELU (tanh approximation), learned positions, output head tied to
the token embedding. Hugging Face stores the projections as Conv1D weights [in, out], which is
Flax's Dense kernel layout, so they load untransposed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The fields of a Hugging Face GPT-2 config.json that the forward pass needs."""

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  layer_norm_epsilon: float = 1e-5

  @classmethod
  def from_json(cls, path: str) -> GPT2Config:
    with open(path) as f:
      saved = json.load(f)
    if saved.get("model_type", "gpt2") != "gpt2":
      raise ValueError(f"{path} is a {saved['model_type']!r} config, not a GPT-2 one")
    activation = saved.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
      raise ValueError(f"{path}: activation_function {activation!r} is not GPT-2's gelu_new")
    return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


class Block(nn.Module):
  """ln_1 -> causal self-attention (attn) -> residual; ln_2 -> MLP (mlp) -> residual."""

  hparams: GPT2Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.hparams
    batch, length, width = x.shape
    heads = lambda t: t.reshape(batch, length, c.n_head, width // c.n_head)
    h = nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_1")(x)
    q, k, v = jnp.split(nn.Dense(3 * width, name="c_attn")(h), 3, axis=-1)
    attended = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    x = x + nn.Dense(width, name="attn_c_proj")(attended.reshape(batch, length, width))
    h = nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_2")(x)
    h = nn.gelu(nn.Dense(4 * width, name="c_fc")(h), approximate=True)
    return x + nn.Dense(width, name="mlp_c_proj")(h)


class GPT2(nn.Module):
  """tokens int[B, L] (L <= n_positions) -> next-token logits float32[B, L, vocab_size]."""

  hparams: GPT2Config

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    c = self.hparams
    wte = nn.Embed(c.vocab_size, c.n_embd, name="wte")
    x = wte(tokens) + nn.Embed(c.n_positions, c.n_embd, name="wpe")(jnp.arange(tokens.shape[1]))
    for i in range(c.n_layer):
      x = Block(c, name=f"h_{i}")(x)
    return wte.attend(nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_f")(x))


# Hugging Face parameter name (in block i: "h.{i}." + name) -> its path in our params.
_BLOCK_NAMES = {
  "ln_1.weight": ("ln_1", "scale"), "ln_1.bias": ("ln_1", "bias"),
  "attn.c_attn.weight": ("c_attn", "kernel"), "attn.c_attn.bias": ("c_attn", "bias"),
  "attn.c_proj.weight": ("attn_c_proj", "kernel"), "attn.c_proj.bias": ("attn_c_proj", "bias"),
  "ln_2.weight": ("ln_2", "scale"), "ln_2.bias": ("ln_2", "bias"),
  "mlp.c_fc.weight": ("c_fc", "kernel"), "mlp.c_fc.bias": ("c_fc", "bias"),
  "mlp.c_proj.weight": ("mlp_c_proj", "kernel"), "mlp.c_proj.bias": ("mlp_c_proj", "bias"),
}
_TOP_NAMES = {"wte.weight": ("wte", "embedding"), "wpe.weight": ("wpe", "embedding"),
              "ln_f.weight": ("ln_f", "scale"), "ln_f.bias": ("ln_f", "bias")}
_BUFFERS = ("attn.bias", "attn.masked_bias")  # a block's causal mask, not a parameter


def params_from_hf(weights: dict[str, np.ndarray], hparams: GPT2Config) -> dict[str, Any]:
  """Our params from Hugging Face's GPT-2 state dict (names with or without "transformer.";
  the output head "lm_head.weight", tied to wte, is not read)."""
  params: dict[str, Any] = {}
  for name, value in weights.items():
    name = name.removeprefix("transformer.")
    layer, _, rest = name.removeprefix("h.").partition(".")
    block = name.startswith("h.") and layer.isdigit()
    if name == "lm_head.weight" or (block and rest in _BUFFERS):
      continue
    if name in _TOP_NAMES:
      path = _TOP_NAMES[name]
    elif block and rest in _BLOCK_NAMES:
      path = (f"h_{layer}", *_BLOCK_NAMES[rest])
    else:
      raise ValueError(f"unexpected GPT-2 parameter {name!r}")
    target = params
    for key in path[:-1]:
      target = target.setdefault(key, {})
    target[path[-1]] = jnp.asarray(value, jnp.float32)
  expected = jax.eval_shape(GPT2(hparams).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  got = jax.tree.map(lambda x: x.shape, params)
  want = jax.tree.map(lambda x: x.shape, expected["params"])
  if got != want:
    raise ValueError(f"the GPT-2 weights do not match config.json: got {got}, want {want}")
  return params


def load_gpt2(path: str) -> tuple[GPT2, dict[str, Any]]:
  """(module, params) of the Hugging Face GPT-2 snapshot in directory `path`."""
  from safetensors.numpy import load_file

  files = [os.path.join(path, name) for name in ("config.json", "model.safetensors")]
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise FileNotFoundError(f"GPT-2 checkpoint {path}: {', '.join(missing)} not found (a Hugging "
                            "Face snapshot directory holds config.json and model.safetensors)")
  hparams = GPT2Config.from_json(files[0])
  return GPT2(hparams), params_from_hf(load_file(files[1]), hparams)


def token_nats(model: GPT2, params: Any, tokens: jax.Array, weights: jax.Array) -> jax.Array:
  """Nats of tokens[:, 1:] given their prefixes, weighted by weights float[B, L - 1] and summed
  per row: float32[B]."""
  logits = model.apply({"params": params}, tokens[:, :-1])
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
  return -(picked * weights).sum(-1)
