"""joyjax.quant: the INT4 / FP8 formats against independent numpy references, packing round trips, the
straight-through gradient, which parameters QAT quantizes (from the model's metadata), and config errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from joyjax import quant


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
