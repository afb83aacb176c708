"""The cuDNN attention path (joyjax/model/fused_attention.py) off the GPU: the same wrapper with
``implementation="xla"`` (v padded to the q/k width, the output sliced, the within-document mask with
``is_causal``) equals ``blockwise_attention`` on packed documents, forward and every gradient; ``model.attention_impl``
``auto`` / ``cudnn`` resolve once from the platform (``cudnn`` where it cannot run is a ConfigError, not a
fallback); and the model's ``cudnn`` branch, with the kernel call routed to XLA, gives the blockwise logits.
The packed layout (``model.attention_max_segments``): the segment runs of a hand-made batch, written out by hand;
the wrapper through the layout's mask, and through the mask path when a row has too many documents, equals
``blockwise_attention``; the model's packed branch hands cuDNN's private call the documented arguments."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from joyjax import model
from joyjax.errors import ConfigError
from joyjax.kernels import pallas_backend
from joyjax.model import fused_attention
from joyjax.model.blockwise import blockwise_attention

# float32 on the CPU: both paths are exact softmax attention; they differ by summation order only.
TOL = 2e-5


def _problem(dk, dv, s=40, b=2, h=3, seed=0):
  rng = np.random.default_rng(seed)
  q, k = (jnp.asarray(rng.normal(size=(b, s, h, dk)), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(b, s, h, dv)), jnp.float32)
  seg = np.ones((b, s), np.int32)  # row 0: three packed documents (cuts off block edges); row 1: one
  seg[0, 13:] = 2
  seg[0, 27:] = 3
  return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize("dk,dv", [(24, 16), (16, 24), (16, 16)])  # MLA (v narrower), wider v, equal
def test_wrapper_matches_blockwise_forward_and_gradients(dk, dv):
  q, k, v, seg = _problem(dk, dv)
  scale = dk ** -0.5
  ct = jax.random.normal(jax.random.key(3), q.shape[:3] + (dv,), jnp.float32)

  def run(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(ct)

  fused = jax.jit(lambda a, b_, c: fused_attention.mla_dot_product_attention(a, b_, c, seg, scale=scale,
                                                                             implementation="xla"))
  block = jax.jit(lambda a, b_, c: blockwise_attention(a, b_, c, seg, scale=scale, block_q=16, block_k=16))
  got, want = run(fused), run(block)
  assert got[0].shape == want[0].shape == v.shape
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    err = float(jnp.max(jnp.abs(g - w))) / max(float(jnp.max(jnp.abs(w))), 1e-12)
    assert err <= TOL, (name, err)
  # no attention across documents: the first token of document 2 sees only itself
  np.testing.assert_allclose(got[0][0, 13], v[0, 13], atol=1e-6)


def test_auto_is_blockwise_off_gpu_and_cudnn_is_a_config_error():
  assert pallas_backend.hardware().platform == "cpu"
  assert fused_attention.resolve_attention_impl("auto", 192, "bfloat16") == "blockwise"
  assert fused_attention.resolve_attention_impl("blockwise", 192, "bfloat16") == "blockwise"
  assert fused_attention.resolve_attention_impl("xla", 192, "float32") == "xla"
  with pytest.raises(ConfigError, match="attention_impl='cudnn'.*NVIDIA GPU"):
    fused_attention.resolve_attention_impl("cudnn", 192, "bfloat16")
  for impl in ("cudnn", "auto"):  # both are valid config values
    assert tiny_config([f"--config.model.attention_impl={impl}"]).model.attention_impl == impl
  with pytest.raises(ConfigError, match="attention_impl"):
    tiny_config(["--config.model.attention_impl=flash"])


@pytest.fixture
def fake_hopper(monkeypatch):
  """pallas_backend.hardware() says: an NVIDIA compute capability 9.0 GPU; the resolution cache is cleared
  before and after (it is per process)."""
  hw = dataclasses.replace(pallas_backend.hardware(), platform="gpu", compute_capability=(9, 0))
  monkeypatch.setattr(pallas_backend, "hardware", lambda: hw)
  fused_attention.resolve_attention_impl.cache_clear()
  fused_attention.packed_segments.cache_clear()
  yield
  fused_attention.resolve_attention_impl.cache_clear()
  fused_attention.packed_segments.cache_clear()


def test_auto_picks_cudnn_on_an_nvidia_gpu_within_its_limits(fake_hopper):
  resolve = fused_attention.resolve_attention_impl
  assert resolve("auto", 192, "bfloat16") == "cudnn"
  assert resolve("auto", 192, "float32") == "blockwise"      # no float32 flash kernel
  assert resolve("auto", 264, "bfloat16") == "blockwise"     # wider than 256
  with pytest.raises(ConfigError, match="model.dtype='float32'"):
    resolve("cudnn", 192, "float32")


def test_model_cudnn_branch_equals_blockwise(monkeypatch, fake_hopper):
  """The tiny model (float32, two packed documents) with attention_impl=auto on a pretended Hopper GPU takes the
  cuDNN branch; with the kernel call routed to XLA its logits equal the blockwise path's."""
  base = ["--config.model.dtype=float32", "--config.model.attention_block=8", "--config.model.num_layers=2",
          "--config.model.mtp.num_layers=0"]
  cfg_b = tiny_config(base, "--config.model.attention_impl=blockwise")
  cfg_a = tiny_config(base, "--config.model.attention_impl=auto")
  params = model.init(cfg_b, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg_b.model.vocab_size)
  seg = jnp.asarray(np.repeat([[1] * 11 + [2] * 13], 2, axis=0), jnp.int32)
  pos = jnp.asarray(np.repeat([list(range(11)) + list(range(13))], 2, axis=0), jnp.int32)
  want = model.forward(cfg_b, params, tokens, segment_ids=seg, positions=pos)

  monkeypatch.setattr(fused_attention, "cudnn_unsupported_reason", lambda qk, dt: None)  # float32 here
  calls = []
  real = jax.nn.dot_product_attention

  def as_xla(*a, **kw):
    calls.append(kw["implementation"])
    return real(*a, **{**kw, "implementation": "xla"})

  monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
  got = model.forward(cfg_a, params, tokens, segment_ids=seg, positions=pos)
  assert calls and set(calls) == {"cudnn"}
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ the packed layout


def test_segment_runs_by_hand():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0],     # two documents and a padding tail: three runs
                     [3, 3, 3, 3, 3, 3, 3],     # one document
                     [1, 2, 3, 3, 4, 4, 4]], jnp.int32)
  lengths, offsets, fits = fused_attention.segment_runs(seg, 4)
  np.testing.assert_array_equal(lengths, [[3, 2, 2, -1], [7, -1, -1, -1], [1, 1, 2, 3]])
  np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1], [0, 1, 2, 4, -1]])
  assert bool(fits)
  lengths, offsets, fits = fused_attention.segment_runs(seg, 3)     # row 2 has 4 runs
  assert not bool(fits)
  np.testing.assert_array_equal(lengths[:2], [[3, 2, 2], [7, -1, -1]])
  np.testing.assert_array_equal(offsets[2], [0, 1, 2, -1])


@pytest.mark.parametrize("max_segments", [3, 8, 2])   # 2: row 0's three documents do not fit -> the mask path
def test_packed_wrapper_matches_blockwise_forward_and_gradients(max_segments):
  q, k, v, seg = _problem(24, 16)
  seg = seg.at[1, 33:].set(0)      # row 1: a document, then a padding tail (its own run)
  scale = 24 ** -0.5
  ct = jax.random.normal(jax.random.key(4), q.shape[:3] + (16,), jnp.float32)

  def run(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(ct)

  packed = jax.jit(lambda a, b_, c: fused_attention.mla_dot_product_attention(
      a, b_, c, seg, scale=scale, implementation="xla", max_segments=max_segments))
  block = jax.jit(lambda a, b_, c: blockwise_attention(a, b_, c, seg, scale=scale, block_q=16, block_k=16))
  got, want = run(packed), run(block)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    err = float(jnp.max(jnp.abs(g - w))) / max(float(jnp.max(jnp.abs(w))), 1e-12)
    assert err <= TOL, (name, err)


def test_packed_segments_only_on_hopper(monkeypatch):
  fused_attention.packed_segments.cache_clear()
  try:
    assert fused_attention.packed_segments(8) == 0      # this CPU: the mask
    for cc, want in (((8, 0), 0), ((9, 0), 8)):
      hw = dataclasses.replace(pallas_backend.hardware(), platform="gpu", compute_capability=cc)
      monkeypatch.setattr(pallas_backend, "hardware", lambda hw=hw: hw)
      fused_attention.packed_segments.cache_clear()
      assert fused_attention.packed_segments(8) == want
  finally:
    fused_attention.packed_segments.cache_clear()
  with pytest.raises(ConfigError, match="attention_max_segments"):
    tiny_config(["--config.model.attention_max_segments=-1"])


def test_model_packed_branch_hands_cudnn_the_documented_layout(monkeypatch, fake_hopper):
  """attention_max_segments=4 on a pretended Hopper GPU: the model calls jax._src.cudnn's dot_product_attention
  with the packed layout (per-row document lengths and offsets, padding-causal, BTNH); a stand-in that reads those
  arguments as that function's docstring defines them (through ``packed_layout_mask``) gives the blockwise
  logits."""
  base = ["--config.model.dtype=float32", "--config.model.attention_block=8", "--config.model.num_layers=2",
          "--config.model.mtp.num_layers=0"]
  cfg_b = tiny_config(base, "--config.model.attention_impl=blockwise")
  cfg_p = tiny_config(base, "--config.model.attention_impl=cudnn", "--config.model.attention_max_segments=4")
  params = model.init(cfg_b, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg_b.model.vocab_size)
  seg = jnp.asarray([[1] * 11 + [2] * 13, [1] * 20 + [0] * 4], jnp.int32)
  pos = jnp.asarray([list(range(11)) + list(range(13)), list(range(20)) + [0] * 4], jnp.int32)
  want = model.forward(cfg_b, params, tokens, segment_ids=seg, positions=pos)

  monkeypatch.setattr(fused_attention, "cudnn_unsupported_reason", lambda qk, dt: None)  # float32 here
  real = jax.nn.dot_product_attention
  # the mask branch of the cond is traced too: routed to XLA as in test_model_cudnn_branch_equals_blockwise
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: real(*a, **{**kw, "implementation": "xla"}))
  calls = []

  def stand_in(q, k, v, bias, mask, q_seqlen, kv_seqlen, q_offsets, kv_offsets, *, scale, mask_type, qkv_layout):
    assert bias is None and mask is None and qkv_layout == "BTNH"
    assert mask_type == fused_attention.cudnn_fa.MaskType.PADDING_CAUSAL
    assert q_seqlen.shape == (2, 4) and q_offsets.shape == (2, 5) and q_seqlen.dtype == jnp.int32
    calls.append(1)
    return real(q, k, v, mask=fused_attention.packed_layout_mask(q_seqlen, q_offsets, q.shape[1]), scale=scale,
                implementation="xla")

  monkeypatch.setattr(fused_attention.cudnn_fa, "dot_product_attention", stand_in)
  got = model.forward(cfg_p, params, tokens, segment_ids=seg, positions=pos)
  assert calls
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
