"""The GGM method's auxiliary rows (ggm.aux_queries): one network call for the whole batch, one
query id in the first rows and aux_queries in the rest (the loss itself: tests/test_glauber.py)."""

import jax
import numpy as np

from md4 import config_lib, methods
from md4.methods import text


def test_aux_rows_query_several_visits_and_the_rest_one(monkeypatch):
  config = config_lib.base()
  config.model_type, config.vocab_size, config.seq_len = "ggm", 27, 8
  config.model.update(width=32, depth=1, num_heads=2)
  config.ggm.update(aux_queries=3, aux_rows=0.25)
  method = methods.create(config, config.vocab_size)
  params = method.init(jax.random.key(0))
  seen = []
  original = text.query_head_fn

  def recording(*args, **kw):
    logits_fn = original(*args, **kw)
    def record(x_in, t):
      seen.append((x_in, kw.get("every_position", False)))
      return logits_fn(x_in, t)
    return record

  monkeypatch.setattr(text, "query_head_fn", recording)
  tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, 27)

  @jax.jit
  def step(params):  # the recorded network input leaves the traced function as an output
    (loss, metrics), grads = jax.value_and_grad(method.loss, has_aux=True)(
      params, tokens, jax.random.key(2))
    return loss, metrics, grads, seen[0][0]

  loss, metrics, grads, x_in = step(params)
  assert len(seen) == 1 and seen[0][1]  # one call, the head at every position
  queries = (np.asarray(x_in) == config.vocab_size).sum(axis=1)
  np.testing.assert_array_equal(queries, [1] * 6 + [3] * 2)
  assert np.isfinite(float(loss)) and np.isfinite(float(metrics["one_visit_loss"]))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  # Without auxiliary rows: the head at the queried position only, one query id per row.
  config.ggm.aux_queries = 0
  seen.clear()
  plain = methods.create(config, config.vocab_size)
  loss, metrics, x_in = jax.jit(lambda p: (*plain.loss(p, tokens, jax.random.key(2)),
                                           seen[0][0]))(params)
  assert set(metrics) == {"loss"} and not seen[0][1]
  assert (np.asarray(x_in) == config.vocab_size).sum(axis=1).tolist() == [1] * 8
