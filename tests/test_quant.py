"""joyjax.quant: the INT4 / FP8 formats against independent numpy references, packing round trips, the
straight-through gradient, which parameters QAT quantizes (from the model's metadata), and config errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import tiny_config
from joyjax import model, quant
from joyjax.errors import ConfigError
from joyjax.train import loop


def _np_int4(w, group_size, axis):
  """float64 reference: groups along ``axis`` (moved last), scale = amax / 7, zero groups scale 1."""
  w = np.moveaxis(np.asarray(w, np.float64), axis, -1)
  g = w.reshape(w.shape[:-1] + (w.shape[-1] // group_size, group_size))
  amax = np.abs(g).max(-1, keepdims=True)
  scale = np.where(amax > 0, amax / 7.0, 1.0)
  q = np.clip(np.round(g / scale), -8, 7)
  deq = (q * scale).reshape(w.shape)
  return (np.moveaxis(q.reshape(w.shape), -1, axis), np.moveaxis(scale[..., 0], -1, axis),
          np.moveaxis(deq, -1, axis))


@pytest.mark.parametrize("shape,axis,gs", [((64, 24), 0, 16), ((3, 32, 8), 1, 32), ((5, 64), -1, 8)])
def test_int4_matches_numpy(shape, axis, gs):
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  w[(0,) * (len(shape) - 1)] = 0.0  # a row of zeros: some all-zero groups along the last axis
  q, scale = quant.int4_quantize(jnp.asarray(w), gs, axis)
  rq, rs, rdeq = _np_int4(w, gs, axis)
  assert q.dtype == jnp.int8 and scale.dtype == jnp.float32
  exp_scale_shape = list(shape)
  exp_scale_shape[axis] //= gs
  assert scale.shape == tuple(exp_scale_shape)
  np.testing.assert_allclose(np.asarray(scale), rs, rtol=1e-6)
  # float32 vs float64 division may flip a value sitting exactly on a .5 boundary: allow a handful
  assert np.mean(np.asarray(q) != rq) < 1e-3
  assert int(np.asarray(q).min()) >= -8 and int(np.asarray(q).max()) <= 7
  deq = np.asarray(quant.int4_dequantize(q, scale, gs, axis))
  assert deq.dtype == np.float32 and np.all(np.isfinite(deq))
  step = np.moveaxis(np.repeat(np.moveaxis(rs, axis, -1), gs, -1), -1, axis)
  assert np.all(np.abs(deq - rdeq) <= step * 1.0001)
  assert np.all(np.abs(deq - w) <= step / 2 * 1.0001)  # rounding error at most half a step


def test_int4_zero_group_and_bad_group_size():
  w = jnp.zeros((4, 16))
  q, s = quant.int4_quantize(w, 8, 1)
  deq = quant.int4_dequantize(q, s, 8, 1)
  assert np.all(np.asarray(deq) == 0) and np.all(np.isfinite(np.asarray(s)))
  with pytest.raises(ValueError, match="group_size 5"):
    quant.int4_quantize(w, 5, 1)


def test_int4_hand_example():
  # group [0.7, -1.4, 0.1, 0.0]: scale 0.2, q = [4 (3.5 -> 4, half to even), -7, 0 (0.5 -> 0), 0]
  w = jnp.asarray([[0.7, -1.4, 0.1, 0.0]], jnp.float32)
  q, s = quant.int4_quantize(w, 4, 1)
  np.testing.assert_allclose(np.asarray(s), [[0.2]], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(q), [[4, -7, 0, 0]])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_pack_unpack_round_trip(axis):
  q = np.random.default_rng(1).integers(-8, 8, size=(6, 8, 10)).astype(np.int8)
  packed = quant.pack_int4(jnp.asarray(q), axis)
  assert packed.dtype == jnp.uint8
  shape = list(q.shape)
  shape[axis] //= 2
  assert packed.shape == tuple(shape)
  np.testing.assert_array_equal(np.asarray(quant.unpack_int4(packed, axis)), q)


def test_pack_nibble_order():
  # [1, -1] -> low nibble 0x1, high nibble 0xF -> 0xF1; [-8, 7] -> 0x78
  packed = quant.pack_int4(jnp.asarray([[1, -1, -8, 7]], jnp.int8))
  np.testing.assert_array_equal(np.asarray(packed), [[0xF1, 0x78]])


@pytest.mark.parametrize("shape", [(256, 128), (200, 300), (2, 130, 129)])
def test_fp8_block_matches_numpy(shape):
  w = np.random.default_rng(2).normal(size=shape).astype(np.float32) * 3
  w[..., :128, :128] = 0.0  # one all-zero block
  w_fp8, s = quant.fp8_block_quantize(jnp.asarray(w))
  rows, cols = shape[-2:]
  nr, nc = -(-rows // 128), -(-cols // 128)
  assert w_fp8.dtype == jnp.float8_e4m3fn and s.shape == shape[:-2] + (nr, nc) and s.dtype == jnp.float32
  # numpy reference, block by block
  ref_s = np.ones(shape[:-2] + (nr, nc))
  ref_q = np.zeros(shape, np.float32)
  for i in range(nr):
    for j in range(nc):
      blk = w[..., i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].astype(np.float64)
      amax = np.abs(blk).max(axis=(-2, -1))
      sc = np.where(amax > 0, amax / 448.0, 1.0)
      ref_s[..., i, j] = sc
      ref_q[..., i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (
          (blk / sc[..., None, None]).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
  np.testing.assert_allclose(np.asarray(s), ref_s, rtol=1e-6)
  got_q = np.asarray(w_fp8.astype(jnp.float32))
  assert np.mean(got_q != ref_q) < 1e-3  # rounding-boundary ties only
  deq = np.asarray(quant.fp8_block_dequantize(w_fp8, s))
  assert deq.dtype == np.float32 and np.all(np.isfinite(deq))
  full_s = np.repeat(np.repeat(ref_s, 128, -2), 128, -1)[..., :rows, :cols]
  # e4m3 has 3 mantissa bits: relative error <= 2^-4 of each value (plus subnormal spacing 2^-9 of the scale)
  assert np.all(np.abs(deq - w) <= np.abs(w) / 16 + full_s * 2.0 ** -9 + 1e-12)
  assert np.all(deq[..., :128, :128] == 0)


def test_fake_quantize_values_and_straight_through_gradient():
  w = jax.random.normal(jax.random.key(0), (32, 16))
  for fmt in ("int4", "fp8"):
    fq = quant.fake_quantize(w, fmt, 8, 0)
    want = quant.quantize_dequantize(w, fmt, 8, 0)
    np.testing.assert_array_equal(np.asarray(fq), np.asarray(want))
    assert not np.allclose(np.asarray(fq), np.asarray(w))
    cot = jax.random.normal(jax.random.key(1), w.shape)
    g = jax.grad(lambda x: jnp.sum(quant.fake_quantize(x, fmt, 8, 0) * cot))(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(cot))  # identity
  wb = w.astype(jnp.bfloat16)
  assert quant.fake_quantize(wb, "int4", 8, 0).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="format"):
    quant.fake_quantize(w, "int8", 8, 0)


# ------------------------------------------------------------------------------------ params and config

GROUP_LEAVES = {  # hand-written reference: which leaves (by path) each quant.targets group holds
    "attention": lambda p: "attn" in p and p[-1] in ("q_a", "q_b", "q", "kv_a", "kv_b", "o"),
    "dense": lambda p: p[0] == "dense_layers" and p[-2:-1] == ("mlp",) and p[-1] in ("gate", "up", "down"),
    "shared": lambda p: "shared" in p and p[-1] in ("gate", "up", "down"),
    "routed": lambda p: p[-1] in ("wi_gate", "wi_up", "wo"),
}


def _paths(tree):
  return {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _qcfg(**over):
  keys = {"quant.format": "int4", "quant.group_size": 16}
  keys.update({k.replace("__", "."): v for k, v in over.items()})
  return tiny_config(keys)


@pytest.mark.parametrize("targets", ["attention", "dense", "shared", "routed", "attention,dense,shared,routed"])
def test_selection_covers_exactly_the_group(targets):
  sel = _paths(quant.selection(_qcfg(quant__targets=targets)))
  want = {p for p in sel if any(GROUP_LEAVES[t](p) for t in targets.split(","))}
  assert want and {p for p, on in sel.items() if on} == want
  for never in [("embed", "embedding"), ("lm_head", "kernel"), ("moe_layers", "mlp", "router"),
                ("moe_layers", "mlp", "router_bias"), ("mtp", "eh_proj"), ("moe_layers", "attn_norm", "scale")]:
    assert not sel.get(never, False), never
  assert not any(_paths(quant.selection(_qcfg(quant__format="none", quant__targets=targets))).values())


def test_fake_quantize_params_matches_numpy_on_the_matrix_view():
  cfg = _qcfg()
  params = model.init(cfg, jax.random.key(0))
  out = _paths(jax.jit(lambda p: quant.fake_quantize_params(cfg, p))(params))
  src = _paths(params)
  sel = _paths(quant.selection(cfg))
  for p, w in src.items():
    if not sel[p]:
      assert out[p] is w or np.array_equal(np.asarray(out[p]), np.asarray(w)), p
  # o: [layers, heads, head_dim, embed] with inputs (heads, head_dim): groups run along heads * head_dim
  o = np.asarray(src[("moe_layers", "attn", "o")], np.float64)
  lay, h, d, e = o.shape
  ref = _np_int4(o.reshape(lay, h * d, e), 16, 1)[2].reshape(o.shape)
  got = np.asarray(out[("moe_layers", "attn", "o")], np.float64)
  step = np.abs(o).max() / 7
  assert np.mean(np.abs(got - ref) > 1e-6) < 1e-3 and np.all(np.abs(got - ref) <= step + 1e-6)
  # routed experts [layers, expert, embed, mlp]: groups along embed for each (layer, expert)
  wi = np.asarray(src[("moe_layers", "mlp", "wi_gate")], np.float64)
  ref = _np_int4(wi, 16, 2)[2]
  assert np.mean(np.abs(np.asarray(out[("moe_layers", "mlp", "wi_gate")]) - ref) > 1e-6) < 1e-3


def test_fake_quantize_params_gradient_is_identity_and_start_step():
  cfg = _qcfg(quant__format="fp8", quant__start_step=5)
  params = model.init(cfg, jax.random.key(0))
  cot = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)), params)
  loss = lambda p, s: sum(jnp.sum(a * c) for a, c in zip(  # noqa: E731
      jax.tree.leaves(quant.fake_quantize_params(cfg, p, s)), jax.tree.leaves(cot)))
  grad = jax.jit(jax.grad(loss))
  for s in (4, 5):
    g = grad(params, jnp.int32(s))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(cot)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  fq = jax.jit(lambda p, s: quant.fake_quantize_params(cfg, p, s))
  before, after = _paths(fq(params, jnp.int32(4))), _paths(fq(params, jnp.int32(5)))
  key = ("dense_layers", "mlp", "down")
  assert np.array_equal(np.asarray(before[key]), np.asarray(_paths(params)[key]))
  assert not np.array_equal(np.asarray(after[key]), np.asarray(_paths(params)[key]))


def test_enabled_is_a_format_other_than_none():
  assert not quant.enabled(tiny_config()) and not quant.targets(tiny_config())
  for fmt in ("int4", "fp8"):
    assert quant.enabled(_qcfg(quant__format=fmt)) and quant.targets(_qcfg(quant__format=fmt))


@pytest.mark.parametrize("over,key", [({"quant.format": "int8"}, "quant.format"),
                                      ({"quant.format": "int4", "quant.targets": "experts"}, "quant.targets"),
                                      ({"quant.format": "int4", "quant.group_size": 0}, "quant.group_size"),
                                      ({"quant.format": "fp8", "quant.start_step": -1}, "quant.start_step")])
def test_config_errors_are_one_line(over, key):
  with pytest.raises(ConfigError, match=key) as e:
    tiny_config(over)
  assert "\n" not in str(e.value)


def test_group_size_must_divide_input_dims():
  with pytest.raises(ConfigError, match="quant.group_size=48") as e:
    quant.check(_qcfg(quant__group_size=48))
  assert "\n" not in str(e.value)
  quant.check(_qcfg(quant__group_size=48, quant__format="fp8"))  # fp8 has no groups


def test_objectives_without_qat_refuse_a_quant_format():
  with pytest.raises(ConfigError, match="quant.format='fp8'.*not dpo"):
    loop.train(_qcfg(quant__format="fp8"), objective=loop.DPO)
  with pytest.raises(ConfigError, match="quant.group_size=48"):  # before any data is read
    loop.train(_qcfg(quant__group_size=48), objective=loop.SFT)
