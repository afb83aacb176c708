"""The RL rollout sampler (joyjax/rl/sampler.py): greedy decoding through the left-padded latent cache equals
argmax decoding with the full forward pass row by row; its log-probs equal a training forward pass's on the
returned layout; new weights and settings do not recompile; stop tokens, per-row budgets, top-k / top-p and keys
behave; a mesh gives the unsharded result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from joyjax import model
from joyjax.parallel import rules
from joyjax.parallel.mesh import make_mesh
from joyjax.rl.sampler import MAX_STOP_IDS, Sampler, left_pad

P, R = 8, 6                                   # max prompt length, max new tokens
PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27, 28], [31], [41, 42, 43, 44, 45]]  # B = 4: divides 8
LOGPROB_ATOL = 1e-4                           # float32 model: sampler vs training forward log-probs


def sharpen(params):
  """A random tiny model's logits are nearly flat (top-2 gaps ~1e-4); a scaled head makes argmax and top-p
  decisions robust to float noise between the cached and the full forward pass."""
  return dict(params, lm_head={"kernel": params["lm_head"]["kernel"] * 20.0})


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config()
  params = sharpen(model.init(cfg, jax.random.key(0)))
  return cfg, params, Sampler(cfg, max_prompt_len=P, max_new_tokens=R)


def greedy_reference(cfg, params, prompts, n):
  """Argmax decoding with the full forward pass on each row alone (no left padding; right padding is invisible
  to causal attention): n new tokens per prompt."""
  width = max(len(p) for p in prompts) + n
  fwd = jax.jit(lambda p, t: model.forward(cfg, p, t))
  seqs = [list(p) for p in prompts]
  for _ in range(n):
    batch = np.array([s + [0] * (width - len(s)) for s in seqs], np.int32)
    logits = np.asarray(fwd(params, batch))
    for i, s in enumerate(seqs):
      s.append(int(np.argmax(logits[i, len(s) - 1])))
  return [s[len(p):] for s, p in zip(seqs, prompts)]


def train_logprobs(cfg, params, out, temperature):
  """What the trainer recomputes: log_softmax(logits / T) of a forward pass over the rollout layout, slot j's
  logits scoring token j + 1 (returned at j + 1, like the sampler's)."""
  logits = model.forward(cfg, params, jnp.asarray(out.tokens), positions=jnp.asarray(out.positions),
                         segment_ids=jnp.asarray(out.segment_ids))
  lp = jax.nn.log_softmax(logits[:, :-1] / temperature, axis=-1)
  got = jnp.take_along_axis(lp, jnp.asarray(out.tokens)[:, 1:, None], axis=-1)[..., 0]
  return np.pad(np.asarray(got), ((0, 0), (1, 0)))


def test_left_pad():
  tokens, lens = left_pad([[1, 2], [3]], 4, pad_id=9)
  np.testing.assert_array_equal(tokens, [[9, 9, 1, 2], [9, 9, 9, 3]])
  np.testing.assert_array_equal(lens, [2, 1])
  assert tokens.dtype == np.int32 and lens.dtype == np.int32
  with pytest.raises(ValueError, match="prompt 0 has 5 tokens"):
    left_pad([[1] * 5], 4)
  with pytest.raises(ValueError, match="prompt 1 has 0 tokens"):
    left_pad([[1], []], 4)


def test_greedy_equals_full_forward_argmax_per_row(setup):
  """Prompts of 3, 8, 1 and 5 tokens in one left-padded batch: every row's greedy tokens equal argmax decoding
  of that row alone with the full forward pass; the layout fields are right."""
  cfg, params, sampler = setup
  tokens, lens = left_pad(PROMPTS, P)
  out = sampler(params, tokens, lens, jax.random.key(0), temperature=0.0).fetch()
  want = greedy_reference(cfg, params, PROMPTS, R)
  np.testing.assert_array_equal(out.tokens[:, P:], np.array(want))
  np.testing.assert_array_equal(out.tokens[:, :P], tokens)
  np.testing.assert_array_equal(out.lengths, [R] * 4)
  assert not out.stopped.any()
  for i, p in enumerate(PROMPTS):
    start = P - len(p)
    np.testing.assert_array_equal(out.segment_ids[i], [0] * start + [1] * (len(p) + R))
    np.testing.assert_array_equal(out.positions[i], [0] * start + list(range(len(p) + R)))
    np.testing.assert_array_equal(out.response_mask[i], [0] * P + [1] * R)
  assert out.tokens.dtype == np.int32 and out.logprobs.dtype == np.float32
  # greedy log-probs are at temperature 1
  np.testing.assert_allclose(out.logprobs, train_logprobs(cfg, params, out, 1.0) * out.response_mask,
                             atol=LOGPROB_ATOL)


def test_logprobs_equal_training_forward(setup):
  """Sampled with temperature, top-k, top-p, a stop token and per-row budgets: the sampler's log-probs equal
  log_softmax(logits / T) of a training forward pass on the returned tokens / positions / segment ids, on every
  valid response token (within LOGPROB_ATOL), and are 0 elsewhere."""
  cfg, params, sampler = setup
  tokens, lens = left_pad(PROMPTS, P)
  temperature = 0.8
  first = sampler(params, tokens, lens, jax.random.key(3), temperature=temperature, top_k=50, top_p=0.9).fetch()
  stop = int(first.tokens[0, P + 2])  # row 0 stops at its third token (or earlier), so post-stop pads exist
  out = sampler(params, tokens, lens, jax.random.key(3), temperature=temperature, top_k=50, top_p=0.9,
                stop_ids=(stop,), max_new=[R, R, 3, R]).fetch()
  assert out.stopped[0] and out.lengths[0] <= 3 and out.lengths[2] <= 3
  mask = out.response_mask
  want = train_logprobs(cfg, params, out, temperature)
  np.testing.assert_allclose(out.logprobs, want * mask, atol=LOGPROB_ATOL)
  assert np.all(out.logprobs[mask == 1] < 0) and np.all(out.logprobs[mask == 0] == 0)


def test_new_weights_and_settings_do_not_recompile(setup):
  cfg, params, sampler = setup
  tokens, lens = left_pad(PROMPTS, P)
  sampler(params, tokens, lens, jax.random.key(0), temperature=0.0)
  assert sampler.compiles() == 1
  updated = jax.tree.map(lambda x: x * 1.01, params)
  a = sampler(updated, tokens, lens, jax.random.key(1), temperature=1.3, top_p=0.5, top_k=7,
              stop_ids=(1, 2, 3), max_new=[1, 2, 3, 4]).fetch()
  b = sampler(updated, tokens, lens, jax.random.key(2), temperature=0.5, top_k=0, stop_ids=(5,), max_new=2).fetch()
  assert sampler.compiles() == 1
  assert a.lengths.max() <= 4 and b.lengths.max() <= 2
  with pytest.raises(ValueError, match="at most"):
    sampler(params, tokens, lens, jax.random.key(0), temperature=1.0, stop_ids=range(MAX_STOP_IDS + 1))
  with pytest.raises(ValueError, match="max_new"):
    sampler(params, tokens, lens, jax.random.key(0), temperature=1.0, max_new=R + 1)


def test_stop_tokens_and_row_budgets(setup):
  """A constructed case from the greedy tokens: a stop id ends a row at its first occurrence (kept, masked in),
  a budget ends a row unstopped, budget 0 generates nothing; tokens, masks, positions and log-probs beyond each
  row's end are 0."""
  cfg, params, sampler = setup
  tokens, lens = left_pad(PROMPTS, P)
  greedy = sampler(params, tokens, lens, jax.random.key(0), temperature=0.0).fetch()
  resp = greedy.tokens[:, P:]
  stop = int(resp[1, 3])                  # row 1 stops at step 3 (or where that token first appears)
  budgets = np.array([R, R, 2, 0])
  out = sampler(params, tokens, lens, jax.random.key(0), temperature=0.0, stop_ids=(stop, 4095 - stop),
                max_new=budgets).fetch()
  for i in range(4):
    hits = [j for j, t in enumerate(resp[i]) if t in (stop, 4095 - stop)]
    first_stop = hits[0] + 1 if hits else R + 1
    n = min(first_stop, budgets[i])
    assert out.lengths[i] == n, i
    assert out.stopped[i] == (first_stop <= budgets[i]), i
    np.testing.assert_array_equal(out.tokens[i, P:P + n], resp[i, :n])
    assert not out.tokens[i, P + n:].any()
    np.testing.assert_array_equal(out.response_mask[i], [0] * P + [1] * n + [0] * (R - n))
    start = P - len(PROMPTS[i])
    np.testing.assert_array_equal(out.segment_ids[i], [0] * start + [1] * (len(PROMPTS[i]) + n) + [0] * (R - n))
    np.testing.assert_array_equal(out.positions[i, P + n:], 0)
    np.testing.assert_allclose(out.logprobs[i, :P + n], greedy.logprobs[i, :P + n], atol=1e-6)
    assert not out.logprobs[i, P + n:].any()
  assert out.stopped[1] and out.lengths[1] <= 4 and out.lengths[3] == 0 and not out.stopped[3]


def test_truncation_and_keys(setup):
  """top-k 1 and a tiny top-p equal greedy (log-probs at the sampling temperature); temperature sampling is
  reproducible from the key and differs across keys."""
  cfg, params, sampler = setup
  tokens, lens = left_pad(PROMPTS, P)
  greedy = sampler(params, tokens, lens, jax.random.key(0), temperature=0.0).fetch()
  top1 = sampler(params, tokens, lens, jax.random.key(5), temperature=1.0, top_k=1).fetch()
  nucleus = sampler(params, tokens, lens, jax.random.key(6), temperature=1.0, top_p=1e-6).fetch()
  for got in (top1, nucleus):
    np.testing.assert_array_equal(got.tokens, greedy.tokens)
    np.testing.assert_allclose(got.logprobs, greedy.logprobs, atol=1e-6)  # T = 1 both
  draw = lambda k: sampler(params, tokens, lens, jax.random.key(k), temperature=1.0).fetch()
  a, again, other = draw(7), draw(7), draw(8)
  np.testing.assert_array_equal(a.tokens, again.tokens)
  np.testing.assert_array_equal(a.logprobs, again.logprobs)
  assert (a.tokens != other.tokens).any() and (a.tokens != greedy.tokens).any()
  assert sampler.compiles() == 1


@pytest.mark.slow  # the fast RL loop test (tests/test_rl_step.py) samples on the 8-device mesh too
def test_mesh_equals_unsharded():
  """fsdp 4 x expert 2 over the 8 CPU devices (params and batch sharded as in training, expert parallelism in
  the MoE layers): the same rollout as on one device."""
  cfg = tiny_config({"mesh.fsdp": 4, "mesh.expert": 2})
  mesh = make_mesh(cfg)
  params = sharpen(model.init(cfg, jax.random.key(0)))
  tokens, lens = left_pad(PROMPTS * 2, P)  # B = 8
  kw = dict(temperature=0.9, top_k=100, stop_ids=(7,), max_new=[R, 3, R, 2, R, R, 1, R])
  sharded = Sampler(cfg, max_prompt_len=P, max_new_tokens=R, mesh=mesh)
  raw = sharded(params, tokens, lens, jax.random.key(4), **kw)
  assert raw.tokens.sharding.is_equivalent_to(rules.batch_sharding(mesh, rules.get_rules(cfg)), 2)
  got = raw.fetch()
  want = Sampler(cfg, max_prompt_len=P, max_new_tokens=R)(params, tokens, lens, jax.random.key(4), **kw).fetch()
  for name in ("tokens", "positions", "segment_ids", "response_mask", "lengths", "stopped"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
