"""losses.rollout: per-token log-probs and entropies of rollout rows (left-padded prompt, then the response) at
the sampling temperature, against the full-vocabulary forward pass computed directly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from joyjax import model
from joyjax.losses.rollout import rollout_logps


def _rows():
  """Two rows: a 3-token prompt left-padded by 2 then 4 response tokens; a 5-token prompt then 2 response
  tokens and 2 pads."""
  tokens = np.array([[0, 0, 5, 6, 7, 8, 9, 10, 11], [4, 5, 6, 7, 8, 12, 13, 0, 0]], np.int32)
  seg = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0, 0]], np.int32)
  pos = np.array([[0, 0, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 0, 0]], np.int32)
  resp = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 0, 0]], np.float32)
  return {"tokens": tokens, "segment_ids": seg, "positions": pos, "response_mask": resp}


def test_logps_and_entropy_match_the_full_forward_pass_at_the_temperature():
  cfg = tiny_config({"train.loss_chunk": 5, "model.num_layers": 2, "model.mtp.num_layers": 0})  # several chunks and a padded tail
  params = model.init(cfg, jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in _rows().items()}
  temp = 0.7
  lp, ent, _ = rollout_logps(cfg, params, batch, temperature=temp)
  for r in range(2):  # each row alone, without its padding, positions from 0
    real = np.nonzero(_rows()["segment_ids"][r])[0]
    toks = jnp.asarray(_rows()["tokens"][r, real])[None]
    logits = model.forward(cfg, params, toks)[0] / temp
    logp = jax.nn.log_softmax(logits, axis=-1)
    mask = _rows()["response_mask"][r, real]
    for j in range(1, len(real)):
      got_lp, got_ent = float(lp[r, real[j]]), float(ent[r, real[j]])
      if mask[j]:
        np.testing.assert_allclose(got_lp, float(logp[j - 1, toks[0, j]]), atol=2e-5)
        p = jnp.exp(logp[j - 1])
        np.testing.assert_allclose(got_ent, float(-jnp.sum(p * logp[j - 1])), atol=2e-5)
      else:
        assert got_lp == 0.0 and got_ent == 0.0
  assert float(jnp.sum(jnp.abs(lp) * (1 - batch["response_mask"]))) == 0.0


@pytest.mark.slow  # a metric's gradient; the values are checked in the fast test above
def test_entropy_has_no_gradient_and_logps_do():
  cfg = tiny_config()
  params = model.init(cfg, jax.random.key(1))
  batch = {k: jnp.asarray(v) for k, v in _rows().items()}
  g_ent = jax.grad(lambda p: jnp.sum(rollout_logps(cfg, p, batch, temperature=1.0)[1]))(params)
  g_lp = jax.grad(lambda p: jnp.sum(rollout_logps(cfg, p, batch, temperature=1.0)[0]))(params)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_ent)) == 0.0
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_lp)) > 0.0
