"""MTP speculative decoding (joyjax/rl/speculative.py through Sampler(draft_tokens=k)): greedy output equals
greedy output without drafting, token for token, whatever the drafts' quality (random: mostly rejected; an
"oracle" MTP module: always accepted, the bonus token used; a near-oracle: partial, rows accepting different
counts); the sampling-mode token distribution is unchanged (chi-square against the exact distribution from full
forward passes); stop ids and budgets cut an accepted run; one compile; the stream API yields the batch call's
tokens."""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_config
from joyjax import model
from joyjax.errors import ConfigError
from joyjax.parallel.mesh import make_mesh
from joyjax.rl import speculative
from joyjax.rl.sampler import Sampler, left_pad
from joyjax.train.sample import generate

P, R = 8, 12
PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27, 28], [31], [41, 42, 43, 44, 45], [7, 8], [99] * 6]
RESIDUAL_LEAVES = ("o", "down", "wo")  # the weights that write into the residual stream (attention, MLPs, experts)


def sharpen(params, factor=20.0):
  """A random tiny model's logits are nearly flat; a scaled head makes argmax decisions robust to the float
  noise between a one-token step and a (k + 1)-token verify pass."""
  return dict(params, lm_head={"kernel": params["lm_head"]["kernel"] * factor})


def _scale_residual(tree, factor):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * factor if getattr(path[-1], "key", None) in RESIDUAL_LEAVES else x, tree)


def oracle(params, mix):
  """Params whose MTP module drafts the model's own next token when ``mix`` is 0: every block's residual writes
  are scaled by ``mix`` (0: the model is x = emb(t), next token f(t) = argmax head(norm(emb(t)))), the MTP
  block writes nothing and its input projection keeps only the embedding half, so it predicts f(t_{i+1}), the
  model's token after the next. With ``mix`` > 0 attention and MLPs move the model off f: partial acceptance."""
  h = params["embed"]["embedding"].shape[1]
  out = {k: (_scale_residual(v, mix) if k in ("dense_layers", "moe_layers") else v) for k, v in params.items()}
  mtp = _scale_residual(params["mtp"], 0.0)
  eye = jnp.concatenate([jnp.eye(h), jnp.zeros((h, h))], axis=0)[None]
  out["mtp"] = dict(mtp, eh_proj=eye.astype(mtp["eh_proj"].dtype))
  return out


@pytest.fixture(scope="module")
def cfg():
  return tiny_config()


@pytest.fixture(scope="module")
def samplers(cfg):
  return {k: Sampler(cfg, max_prompt_len=P, max_new_tokens=R, draft_tokens=k) for k in (0, 1, 2, 3)}


@pytest.fixture(scope="module")
def models(cfg):
  base = sharpen(jax.jit(lambda key: model.init(cfg, key))(jax.random.key(0)))
  return {"random": base, "oracle": oracle(base, 0.0), "partial": oracle(base, 0.5)}


@pytest.mark.parametrize("k", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)])
def test_greedy_equals_plain_greedy(cfg, samplers, models, k):
  """k draft tokens on random, oracle and partly right drafts, six left-padded prompts of 1 to 8 tokens: the
  tokens, lengths, masks and log-probs equal plain greedy decoding's. The oracle accepts every draft (each step
  emits k + 1 tokens, the last step cut by the budget); the partial model accepts some, rows differently."""
  tokens, lens = left_pad(PROMPTS, P)
  key = jax.random.key(0)
  for name, params in models.items():
    want = samplers[0](params, tokens, lens, key, temperature=0.0).fetch()
    assert want.acceptance_length() == 1.0
    got = samplers[k](params, tokens, lens, key, temperature=0.0).fetch()
    for field in ("tokens", "positions", "segment_ids", "response_mask", "lengths", "stopped"):
      np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=f"{name} k={k} {field}")
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4, err_msg=f"{name} k={k}")
    accept = got.acceptance_length()
    if name == "oracle":  # R - 1 tokens after the prefill's, k + 1 per step
      np.testing.assert_array_equal(got.steps, [math.ceil((R - 1) / (k + 1))] * len(PROMPTS))
    elif name == "partial":
      assert 1.0 < accept < k + 1, (k, accept)
      assert len(set(got.steps.tolist())) > 1, got.steps  # rows accepted different counts
    else:
      assert accept < 1.0 + 0.5 * k, (k, accept)
  assert samplers[0].compiles() == 1 and samplers[k].compiles() == 1


def test_stop_ids_and_budgets_cut_accepted_runs(cfg, samplers, models):
  """Stop ids taken from inside the oracle's accepted runs and per-row budgets (0, 1, odd ones): the rollout
  equals plain decoding's, field by field."""
  params = models["oracle"]
  tokens, lens = left_pad(PROMPTS, P)
  key = jax.random.key(0)
  free = samplers[0](params, tokens, lens, key, temperature=0.0).fetch()
  stops = (int(free.tokens[0, P + 5]), int(free.tokens[3, P + 2]))
  budgets = [R, 7, 0, R, 1, 4]
  want = samplers[0](params, tokens, lens, key, temperature=0.0, stop_ids=stops, max_new=budgets).fetch()
  assert want.stopped[0] and want.stopped[3] and want.lengths[2] == 0 and want.lengths[4] == 1
  got = samplers[2](params, tokens, lens, key, temperature=0.0, stop_ids=stops, max_new=budgets).fetch()
  for field in ("tokens", "positions", "segment_ids", "response_mask", "lengths", "stopped"):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
  assert samplers[2].compiles() == 1


def test_sampled_logprobs_equal_training_forward(cfg, samplers, models):
  """Sampled with drafts (k = 2, T = 0.8, top-k 50, per-row budgets): each valid response token's log-prob is
  log_softmax(logits / T) of a training forward pass over the returned layout, what RL's trainer recomputes;
  0 elsewhere."""
  params = models["partial"]
  tokens, lens = left_pad(PROMPTS, P)
  out = samplers[2](params, tokens, lens, jax.random.key(5), temperature=0.8, top_k=50,
                    max_new=[R, 5, R, 9, 2, R]).fetch()
  assert out.acceptance_length() > 1.0
  logits = model.forward(cfg, params, jnp.asarray(out.tokens), positions=jnp.asarray(out.positions),
                         segment_ids=jnp.asarray(out.segment_ids))
  lp = jax.nn.log_softmax(logits[:, :-1] / 0.8, axis=-1)
  want = np.pad(np.asarray(jnp.take_along_axis(lp, jnp.asarray(out.tokens)[:, 1:, None], axis=-1)[..., 0]),
                ((0, 0), (1, 0)))
  np.testing.assert_allclose(out.logprobs, want * out.response_mask, atol=1e-4)
  assert samplers[2].compiles() == 1


@pytest.mark.slow  # compiles the stream's prefill and step (k = 0 and 2) and a batch of one
def test_stream_yields_the_batch_tokens(cfg, samplers, models):
  """Sampler.stream (one prompt): the concatenated steps equal the batch call's response, greedy and sampled
  (same key), with and without drafting; steps of 1 .. k + 1 tokens; a stop id ends the stream after it."""
  params = models["partial"]
  tokens, lens = left_pad([PROMPTS[3]], P)
  for k in (0, 2):
    s = samplers[k]
    for kw in (dict(temperature=0.0), dict(temperature=0.9, top_k=20), dict(temperature=0.0, max_new=5)):
      key = jax.random.key(3)
      want = s(params, tokens, lens, key, **kw).fetch()
      steps = list(s.stream(params, tokens, lens, key, **kw))
      assert all(x.dtype == np.int32 and 1 <= x.size <= k + 1 for x in steps)
      np.testing.assert_array_equal(np.concatenate(steps), want.tokens[0, P:P + want.lengths[0]], err_msg=str(kw))
    stop = int(want.tokens[0, P + 2])
    steps = list(s.stream(params, tokens, lens, jax.random.key(3), temperature=0.0, stop_ids=(stop,)))
    flat = np.concatenate(steps)
    assert flat[-1] == stop and stop not in flat[:-1]
    assert s.stream_compiles() == 2
  with pytest.raises(ValueError, match="B = 1"):
    next(samplers[0].stream(params, *left_pad(PROMPTS[:2], P), jax.random.key(0), temperature=0.0))


def test_draft_tokens_need_an_mtp_module():
  with pytest.raises(ValueError, match="mtp.num_layers"):
    Sampler(tiny_config({"model.mtp.num_layers": 0}), max_prompt_len=4, max_new_tokens=4, draft_tokens=2)


# -------------------------------------------------------------------------------------------- distribution

V = 16
SAMPLES = 4096   # rows per sampled batch: one prompt repeated, each row an independent draw
ALPHA = 1e-4     # significance: a correct rule fails with probability 1e-4 per statistic (fixed seeds: never)


def _chi2_pvalue(counts, probs):
  """Pearson chi-square of observed ``counts`` against ``probs`` (cells expected below 5 pooled); p-value from
  the regularised upper incomplete gamma function Q(dof / 2, x / 2)."""
  n = counts.sum()
  expected = probs * n
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  keep = exp > 0
  stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
  dof = int(keep.sum()) - 1
  return float(jax.scipy.special.gammaincc(dof / 2.0, stat / 2.0)), stat


def _exact_marginals(cfg, params, prompt, n, temperature, top_k):
  """The exact marginal distribution of each of the first ``n`` generated tokens under plain sampling (float64,
  top-k then softmax at ``temperature``), by full forward passes over every continuation prefix."""
  fwd = jax.jit(lambda p, t: model.forward(cfg, p, t))

  def dist(prefixes):  # [m, L] -> [m, V] next-token distribution
    logits = np.asarray(fwd(params, np.asarray(prefixes, np.int32))[:, -1], np.float64) / temperature
    if top_k:
      kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
      logits = np.where(logits >= kth, logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  prefixes, weights, marginals = np.array([prompt]), np.ones(1), []
  for _ in range(n):
    d = dist(prefixes) * weights[:, None]  # joint of (prefix, next token)
    marginals.append(d.sum(0))
    prefixes = np.concatenate([np.repeat(prefixes, V, axis=0), np.tile(np.arange(V), len(prefixes))[:, None]], 1)
    weights = d.reshape(-1)
  return marginals


@pytest.mark.slow  # ~10 s each: test_accept_rule_on_known_distributions is the fast check of the rule
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.8, 5)])
def test_sampling_distribution_unchanged(temperature, top_k):
  """Vocabulary of 16, a random model and an MTP module drafting the model's bare-embedding guess, k = 2 (drafts
  kept ~1.4-1.6 tokens per step): over 4096 independent rows the first three tokens' marginals match the exact
  plain-sampling marginals (chi-square, p > 1e-4; measured p 0.02 .. 0.7). The second and third tokens come from
  verify steps (accepted drafts, residual draws, bonus tokens). Checked by breaking the rule by hand: accepting
  every draft gives p < 1e-28 here, drawing the rejection's replacement from p instead of max(0, p - q) p < 1e-28."""
  cfg = tiny_config({"model.vocab_size": V, "data.tokenizer_vocab_size": V})
  params = oracle(sharpen(model.init(cfg, jax.random.key(1)), 8.0), 1.0)  # the MTP drafts f(t): often right
  prompt = [3, 1, 4, 1, 5]
  n = 3
  sampler = Sampler(cfg, max_prompt_len=len(prompt), max_new_tokens=n, draft_tokens=2)
  tokens, lens = left_pad([prompt] * SAMPLES, len(prompt))
  out = sampler(params, tokens, lens, jax.random.key(7), temperature=temperature, top_k=top_k).fetch()
  accept = out.acceptance_length()
  assert 1.2 < accept < 2.0, accept  # drafts are sometimes kept, sometimes not: both branches of the rule run
  exact = _exact_marginals(cfg, params, prompt, n, temperature, top_k)
  for j in range(n):
    counts = np.bincount(out.tokens[:, len(prompt) + j], minlength=V).astype(np.float64)
    pvalue, stat = _chi2_pvalue(counts, exact[j])
    assert pvalue > ALPHA, (j, stat, pvalue, counts, exact[j] * SAMPLES)


def test_accept_rule_on_known_distributions():
  """speculative.accept on hand-made p and q (V = 4, k = 1): a draft where p = q is always kept; a draft p gives
  probability 0 is never kept, and the replacement comes from norm(max(0, p - q)); over many rows the kept
  fraction of a draft with p(d) / q(d) = 0.5 is 0.5."""
  b = 4000
  p1 = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
  q = np.array([0.0, 0.4, 0.6, 0.0])  # drafts drawn from q; token 1: p / q = 0.5, token 2: p / q = 0.5
  drafts = np.where(np.arange(b) % 2 == 0, 1, 2)
  p_logits = jnp.asarray(np.broadcast_to(p1, (b, 2, 4)), jnp.float32)
  q_probs = jnp.asarray(np.broadcast_to(q, (b, 1, 4)), jnp.float32)
  accept = jax.jit(speculative.accept)
  accepted, token = accept(p_logits, jnp.asarray(drafts[:, None], jnp.int32), q_probs, jax.random.key(0),
                           jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0))
  accepted, token = np.asarray(accepted), np.asarray(token)
  assert abs(accepted.mean() - 0.5) < 0.05  # binomial std 0.008
  # rejected rows draw from max(0, p - q) = [0.1, 0, 0, 0.4] / 0.5
  rej = token[accepted == 0]
  np.testing.assert_allclose(np.bincount(rej, minlength=4) / rej.size, [0.2, 0, 0, 0.8], atol=0.05)
  # kept rows draw their bonus token from p
  np.testing.assert_allclose(np.bincount(token[accepted == 1], minlength=4) / (accepted == 1).sum(),
                             [0.1, 0.2, 0.3, 0.4], atol=0.05)
  # p == q: always kept
  same = accept(jnp.asarray(np.broadcast_to(np.log(q + 1e-30), (b, 2, 4)), jnp.float32),
                jnp.full((b, 1), 2, jnp.int32), q_probs, jax.random.key(1), jnp.float32(1.0), jnp.float32(1.0),
                jnp.int32(0))[0]
  np.testing.assert_array_equal(np.asarray(same), 1)


@pytest.mark.slow  # two more batch shapes, compiled with and without drafting
@pytest.mark.parametrize("batch", [1, 5])
def test_greedy_equals_plain_greedy_batch_sizes(cfg, models, batch):
  """Random prompts of 1 to P tokens in batches of 1 and 5, k = 3, the partly right drafts: plain greedy output."""
  rng = np.random.default_rng(batch)
  prompts = [rng.integers(1, cfg.model.vocab_size, rng.integers(1, P + 1)).tolist() for _ in range(batch)]
  tokens, lens = left_pad(prompts, P)
  params, key = models["partial"], jax.random.key(0)
  want = Sampler(cfg, max_prompt_len=P, max_new_tokens=R)(params, tokens, lens, key, temperature=0.0).fetch()
  got = Sampler(cfg, max_prompt_len=P, max_new_tokens=R, draft_tokens=3)(params, tokens, lens, key,
                                                                          temperature=0.0).fetch()
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  assert got.acceptance_length() > 1.0


def test_config_keys_validated():
  """train.sample_draft_tokens and rl.draft_tokens: 0 .. 8, and 0 without an MTP module (one-line ConfigError)."""
  assert tiny_config({"train.sample_draft_tokens": 3, "rl.draft_tokens": 2}).rl.draft_tokens == 2
  for override in ({"train.sample_draft_tokens": 2, "model.mtp.num_layers": 0},
                   {"rl.draft_tokens": 1, "model.mtp.num_layers": 0}):
    with pytest.raises(ConfigError, match="model.mtp.num_layers is 0"):
      tiny_config(override)
  with pytest.raises(ConfigError, match="rl.draft_tokens"):
    tiny_config({"rl.draft_tokens": -1})


@pytest.mark.slow  # two more sampler compiles
def test_generate_with_drafts(cfg, models):
  """train.sample.generate (text sampling, `joyjax sample`) with train.sample_draft_tokens = 2: the greedy text
  of drafts off."""
  params = models["partial"]
  on = tiny_config({"train.sample_draft_tokens": 2})
  prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
  assert generate(on, params, prompts, max_tokens=10) == generate(cfg, params, prompts, max_tokens=10)


@pytest.mark.slow  # two sampler compiles
def test_decode_benchmark_runs(tmp_path):
  """benchmarks/decode.py at a tiny size: a row per (batch, k), tokens/s and acceptance, the JSON written."""
  spec = importlib.util.spec_from_file_location("decode_bench", os.path.join(REPO_ROOT, "benchmarks", "decode.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = tmp_path / "decode.json"
  res = bench.main(["--batch", "2", "--drafts", "0,2", "--prompt-len", "4", "--new-tokens", "6", "--iters", "1",
                    "--out", str(out)])
  assert [(r["batch"], r["draft_tokens"]) for r in res["rows"]] == [(2, 0), (2, 2)]
  for r in res["rows"]:
    assert r["tokens"] == 12 and r["tokens_per_s"] > 0 and r["compiles"] == 1 and r["acceptance_length"] >= 1.0
  assert json.loads(out.read_text())["rows"][1]["speedup"] > 0


@pytest.mark.slow  # two sharded compiles on the 8 CPU devices
def test_mesh_equals_unsharded_with_drafts(models):
  """fsdp 4 x expert 2 (params and batch sharded as in training, expert parallelism in the MoE layers and the MTP
  block): the speculative rollout (k = 2, sampled, stop id, budgets) is the unsharded one."""
  cfg = tiny_config({"mesh.fsdp": 4, "mesh.expert": 2})
  params = models["partial"]
  tokens, lens = left_pad(PROMPTS + PROMPTS[:2], P)  # B = 8
  kw = dict(temperature=0.9, top_k=100, stop_ids=(7,), max_new=[R, 3, R, 2, R, R, 1, R])
  sharded = Sampler(cfg, max_prompt_len=P, max_new_tokens=R, mesh=make_mesh(cfg), draft_tokens=2)
  got = sharded(params, tokens, lens, jax.random.key(4), **kw).fetch()
  want = Sampler(cfg, max_prompt_len=P, max_new_tokens=R, draft_tokens=2)(params, tokens, lens,
                                                                          jax.random.key(4), **kw).fetch()
  for name in ("tokens", "positions", "segment_ids", "response_mask", "lengths", "stopped", "steps"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
