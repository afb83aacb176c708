"""The whole model as pure functions over a params dict, built from Flax NNX modules via split/merge.

params = {
  'embed':        {'embedding': [vocab, embed]},
  'dense_layers': Block params stacked over the first ``first_k_dense`` layers (leading 'layers' axis),
  'moe_layers':   Block params stacked over the remaining layers,
  'final_norm':   {'scale': [embed]},
  'lm_head':      {'kernel': [embed, vocab]}          (absent when embeddings are tied),
  'mtp':          MTP module params stacked over ``mtp.num_layers`` modules,
}
Stacks are run with ``lax.scan`` (compile time independent of depth) under the configured remat policy.
With LoRA on (``model.lora.rank`` > 0) each adapted weight ``W`` has siblings ``W_lora_a`` / ``W_lora_b``
(``model/adapters.py``, ``model/lora.py``) and every other leaf is frozen (``freeze_base``).
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from joyjax.axes import batch_axes, get_rules
from joyjax.config import REMAT_POLICIES
from joyjax.model import adapters
from joyjax.model.attention import MLA
from joyjax.model.layers import RMSNorm, dtype_of, param
from joyjax.model.moe import MLP, MoE

MTP_STACK = "mtp"
LORA_STREAM = 1  # fold_in of a part's key that seeds its adapters' ``lora`` rng stream
STACKS = ("dense_layers", "moe_layers", MTP_STACK)  # params stacked over a leading 'layers' axis


class Embedding(nnx.Module):

  def __init__(self, cfg, *, rngs, param_dtype):
    # A lookup table, not a matrix applied to inputs: AdamW, no weight decay (also when tied to the head).
    self.embedding = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), std=cfg.init_std,
                           dtype=param_dtype, inputs=None, decay=False)


class Head(nnx.Module):

  def __init__(self, cfg, *, rngs, param_dtype):
    self.kernel = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std,
                        dtype=param_dtype, inputs=None)  # the output head: AdamW (as Moonlight)


class FinalNorm(nnx.Module):

  def __init__(self, cfg, *, param_dtype):
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", param_dtype=param_dtype)


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)); then x + mlp(norm(x)) with a dense MLP or the MoE."""

  def __init__(self, cfg, *, moe: bool, rngs: nnx.Rngs, dtype, param_dtype):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", param_dtype=param_dtype)
    self.attn = MLA(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", param_dtype=param_dtype)
    if moe:
      self.mlp = MoE(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    else:
      lora = adapters.settings(cfg)
      self.mlp = MLP(cfg.hidden_size, cfg.dense_intermediate_size, std=cfg.init_std, rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype, group="dense", lora=lora if lora and lora.on("dense") else None)
    self.is_moe = moe

  def __call__(self, x, positions, segment_ids, cache=None, token_axes=None):
    h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache)
    x = x + h
    if self.is_moe:
      h, aux = self.mlp(self.mlp_norm(x), token_axes)
    else:
      h, aux = self.mlp(self.mlp_norm(x)), {}
    return x + h, aux, cache


class MTPLayer(nnx.Module):
  """DeepSeek-V3 multi-token prediction module k: h' = block(eh_proj([enorm(emb(t_{i+k})); hnorm(h_{i})])),
  normed by its own final norm and read out by the shared head."""

  def __init__(self, cfg, *, rngs, dtype, param_dtype):
    h = cfg.hidden_size
    self.enorm = RMSNorm(h, cfg.rms_norm_eps, "embed", param_dtype=param_dtype)
    self.hnorm = RMSNorm(h, cfg.rms_norm_eps, "embed", param_dtype=param_dtype)
    self.eh_proj = param(rngs, (2 * h, h), ("mtp_in", "embed"), std=cfg.init_std, dtype=param_dtype,
                         inputs=("mtp_in",))
    self.block = Block(cfg, moe=cfg.moe.num_experts > 0, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.final_norm = RMSNorm(h, cfg.rms_norm_eps, "embed", param_dtype=param_dtype)
    self.dtype = dtype

  def __call__(self, emb, hidden, positions, segment_ids, token_axes=None):
    x = jnp.concatenate([self.enorm(emb), self.hnorm(hidden)], axis=-1) @ self.eh_proj[...].astype(self.dtype)
    x, aux, _ = self.block(x, positions, segment_ids, token_axes=token_axes)
    return x, self.final_norm(x), aux

  def decode(self, emb, hidden, positions, cache, token_axes=None):
    """The module over cached positions (speculative drafting): its block attends to its own latent cache
    (``cache``: ``c``, ``k_rope``, ``index``, ``start`` as MLA takes it). Returns (x, normed x, new cache)."""
    x = jnp.concatenate([self.enorm(emb), self.hnorm(hidden)], axis=-1) @ self.eh_proj[...].astype(self.dtype)
    x, _, cache = self.block(x, positions, jnp.ones(positions.shape, jnp.int32), cache, token_axes)
    return x, self.final_norm(x), cache


# ------------------------------------------------------------------------------------------- structure


def model_cfg(cfg):
  """Accepts the full config or its ``model`` group."""
  return cfg.model if "model" in cfg else cfg


def _key(cfg) -> str:
  return model_cfg(cfg).to_json()


def stack_sizes(cfg) -> dict[str, int]:
  m = model_cfg(cfg)
  return {"dense_layers": m.first_k_dense, "moe_layers": m.num_layers - m.first_k_dense, "mtp": m.mtp.num_layers}


def _constructors(m):
  dtype, pdtype = dtype_of(m.dtype), adapters.base_param_dtype(m)  # LoRA: frozen base in model.lora.base_dtype
  ctors = {
      "embed": lambda r: Embedding(m, rngs=r, param_dtype=pdtype),
      "dense_layers": lambda r: Block(m, moe=False, rngs=r, dtype=dtype, param_dtype=pdtype),
      "moe_layers": lambda r: Block(m, moe=True, rngs=r, dtype=dtype, param_dtype=pdtype),
      "final_norm": lambda r: FinalNorm(m, param_dtype=pdtype),
      "mtp": lambda r: MTPLayer(m, rngs=r, dtype=dtype, param_dtype=pdtype),
  }
  if not m.tie_embeddings:
    ctors["lm_head"] = lambda r: Head(m, rngs=r, param_dtype=pdtype)
  return ctors


def parts(m) -> dict:
  sizes = stack_sizes(m)
  return {k: v for k, v in _constructors(m).items() if sizes.get(k, 1) > 0}


@functools.lru_cache(maxsize=64)
def _abstract(key: str, name: str):
  m = ml_collections.ConfigDict(json.loads(key))
  return nnx.eval_shape(lambda: _constructors(m)[name](nnx.Rngs(0)))


def abstract_module(cfg, name: str) -> nnx.Module:
  """The NNX module of part ``name`` (one layer of a stack) with abstract parameters (cached per config)."""
  return _abstract(_key(cfg), name)


@functools.lru_cache(maxsize=64)
def _adapter_flags(key: str, name: str) -> dict:
  """Part ``name``'s params tree with True at LoRA adapters, False at every other leaf."""
  state = nnx.state(_abstract(key, name))
  flags = jax.tree.map(lambda v: v.get_metadata().get("adapter") is not None, state,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(flags) if isinstance(flags, nnx.State) else flags


def lora_enabled(cfg) -> bool:
  """Whether ``model.lora.rank`` > 0: only the adapters train; every other parameter is frozen."""
  return adapters.settings(model_cfg(cfg)) is not None


def freeze_base(cfg, name: str, part):
  """With LoRA on, every leaf of part ``name`` but the adapters behind ``stop_gradient``: the backward pass
  skips the base weights' gradients (their matmuls and buffers), which the optimizer would zero anyway.
  ``part`` unchanged without LoRA."""
  if not lora_enabled(cfg):
    return part
  return jax.tree.map(lambda x, adapter: x if adapter else jax.lax.stop_gradient(x), part,
                      _adapter_flags(_key(cfg), name))


def _frozen(cfg, w):
  """A weight read directly from the params (embedding, head), frozen under LoRA like ``freeze_base``."""
  return jax.lax.stop_gradient(w) if lora_enabled(cfg) else w


def _merge(cfg, name: str, part: dict):
  """The NNX module ``name`` with its parameters replaced by the arrays in ``part`` (base weights frozen under
  LoRA: ``freeze_base``)."""
  graphdef, state = nnx.split(abstract_module(cfg, name))
  nnx.replace_by_pure_dict(state, freeze_base(cfg, name, part))
  return nnx.merge(graphdef, state)


def init(cfg, key: jax.Array) -> dict:
  """Random parameters (a pure dict of arrays). Jit it with out_shardings to initialise already sharded."""
  m = model_cfg(cfg)
  sizes = stack_sizes(m)
  params = {}
  for i, (name, ctor) in enumerate(parts(m).items()):
    k = jax.random.fold_in(key, i)

    def make(k, ctor=ctor):  # adapters draw from their own stream: the base weights do not depend on LoRA
      return nnx.to_pure_dict(nnx.state(ctor(nnx.Rngs(params=k, lora=jax.random.fold_in(k, LORA_STREAM)))))

    if name in STACKS:
      params[name] = jax.vmap(make)(jax.random.split(k, sizes[name]))
    else:
      params[name] = make(k)
  return params


def abstract_params(cfg) -> dict:
  """Shapes and dtypes of ``init(cfg, key)`` without allocating anything."""
  return jax.eval_shape(lambda: init(cfg, jax.random.key(0)))


# ------------------------------------------------------------------------------------------- forward


# What each ``model.remat`` name (``config.REMAT_POLICIES``) saves for the backward pass; "none" saves everything.
_REMAT_SAVEABLE = dict(zip(REMAT_POLICIES[1:], (None, jax.checkpoint_policies.checkpoint_dots,
                                                 jax.checkpoint_policies.dots_with_no_batch_dims_saveable)))
assert REMAT_POLICIES[0] == "none" and len(_REMAT_SAVEABLE) == len(REMAT_POLICIES) - 1, REMAT_POLICIES


def _remat(fn, policy: str):
  if policy == "none":
    return fn
  return jax.checkpoint(fn, policy=_REMAT_SAVEABLE[policy], prevent_cse=False)


def _run_stack(cfg, name, stacked, x, positions, segment_ids, cache, token_axes=None):
  """Applies the stacked blocks ``name`` in order. Returns (x, stacked aux, stacked new cache)."""
  m = model_cfg(cfg)

  def body(x, layer):
    layer_params, layer_cache = layer
    block = _merge(m, name, layer_params)
    if layer_cache is not None:
      layer_cache = dict(layer_cache, index=cache["index"], start=cache["start"])
    x, aux, new_cache = block(x, positions, segment_ids, layer_cache, token_axes)
    if new_cache is not None:
      new_cache = {"c": new_cache["c"], "k_rope": new_cache["k_rope"]}
    return x, (aux, new_cache)

  layer_caches = None if cache is None else cache[name]
  if m.scan_layers:
    body = _remat(body, m.remat if cache is None else "none")
    x, (aux, new_cache) = jax.lax.scan(body, x, (stacked, layer_caches))
    return x, aux, new_cache
  n = jax.tree.leaves(stacked)[0].shape[0]
  auxes, caches = [], []
  for i in range(n):
    sl = jax.tree.map(lambda a: a[i], (stacked, layer_caches))
    x, (aux, c) = _remat(body, m.remat if cache is None else "none")(x, sl)
    auxes.append(aux)
    caches.append(c)
  stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs) if xs and jax.tree.leaves(xs[0]) else xs[0]
  return x, stack(auxes), (None if cache is None else stack(caches))


def _shift_left(tokens, k):
  return jnp.pad(tokens[:, k:], ((0, 0), (0, k)))


def embed(cfg, params, tokens):
  m = model_cfg(cfg)
  table = _frozen(cfg, params["embed"]["embedding"])
  return jnp.take(table, tokens, axis=0).astype(dtype_of(m.dtype))


def _default_positions(tokens, cache):
  """RoPE positions of ``tokens`` [b, s]: 0.. without a cache; with one, each row's ``index - start`` onwards."""
  b, s = tokens.shape
  steps = jnp.arange(s, dtype=jnp.int32)
  if cache is None:
    return jnp.broadcast_to(steps, (b, s))
  first = jnp.broadcast_to(cache["index"] - cache["start"], (b,))
  return first[:, None] + steps[None]


def _trunk(cfg, params, tokens, positions, segment_ids, cache):
  """Embedding and every decoder layer: (pre-final-norm residual stream [b, s, embed], aux, new cache)."""
  m = model_cfg(cfg)
  token_axes = batch_axes(get_rules(cfg))  # expert parallelism splits tokens as the batch is split
  b, s = tokens.shape
  if positions is None:
    positions = _default_positions(tokens, cache)
  if segment_ids is None:
    segment_ids = jnp.ones((b, s), jnp.int32)
  x = embed(m, params, tokens)
  aux, new_cache = {}, None if cache is None else dict(cache)  # other entries (the MTP module's) pass through
  for name in ("dense_layers", "moe_layers"):
    if name in params:
      x, aux[name], c = _run_stack(m, name, params[name], x, positions, segment_ids, cache, token_axes)
      if cache is not None:
        new_cache[name] = c
  if cache is not None:
    new_cache["index"] = cache["index"] + s
  return x, aux, new_cache


def forward_hidden(cfg, params, tokens, *, positions=None, segment_ids=None, cache=None, with_mtp=False):
  """Tokens [b, s] -> final-normed hidden [b, s, embed] (compute dtype), the MTP hiddens (one per module,
  module k's position i predicting token i + k + 2 of ``tokens``), aux statistics and the new cache."""
  m = model_cfg(cfg)
  token_axes = batch_axes(get_rules(cfg))
  if positions is None:
    positions = _default_positions(tokens, cache)
  if segment_ids is None:
    segment_ids = jnp.ones(tokens.shape, jnp.int32)
  x, aux, new_cache = _trunk(cfg, params, tokens, positions, segment_ids, cache)
  hidden = _merge(m, "final_norm", params["final_norm"]).norm(x)
  mtp_hidden = []
  if with_mtp and "mtp" in params:
    prev, mtp_aux = x, []
    for k in range(m.mtp.num_layers):
      layer = _merge(m, "mtp", jax.tree.map(lambda a: a[k], params["mtp"]))
      emb = embed(m, params, _shift_left(tokens, k + 1))
      prev, normed, a = layer(emb, prev, positions, segment_ids, token_axes)
      mtp_hidden.append(normed)
      mtp_aux.append(a)
    aux["mtp"] = jax.tree.map(lambda *a: jnp.stack(a), *mtp_aux)
  return hidden, mtp_hidden, aux, new_cache


def head_weights(cfg, params) -> jax.Array:
  """[embed, vocab] output projection (the transposed embedding when tied)."""
  m = model_cfg(cfg)
  w = params["embed"]["embedding"].T if m.tie_embeddings else params["lm_head"]["kernel"]
  return _frozen(cfg, w)


def logits_from_hidden(cfg, params, hidden) -> jax.Array:
  w = head_weights(cfg, params).astype(hidden.dtype)
  return jnp.einsum("bse,ev->bsv", hidden, w, preferred_element_type=jnp.float32)


def forward(cfg, params, tokens, *, positions=None, segment_ids=None, return_mtp=False, return_aux=False):
  """Float32 logits [b, s, vocab] (plus a list of MTP logits if ``return_mtp``, plus aux if ``return_aux``)."""
  hidden, mtp_hidden, aux, _ = forward_hidden(cfg, params, tokens, positions=positions, segment_ids=segment_ids,
                                              with_mtp=return_mtp)
  out = (logits_from_hidden(cfg, params, hidden),)
  if return_mtp:
    out += ([logits_from_hidden(cfg, params, h) for h in mtp_hidden],)
  if return_aux:
    out += (aux,)
  return out[0] if len(out) == 1 else out


# -------------------------------------------------------------------------------------------- decode


def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32, *, mtp: bool = False) -> dict:
  """The KV cache: MLA's compressed latent and shared rotary key per layer, not expanded keys/values; ``index``
  [batch] each row's next slot to write (rows advance independently: a speculative step keeps a different number
  of tokens per row, and slots at or past a row's index are masked, so rolling back is lowering it), ``start``
  [batch] each row's first valid slot (zeros; a left-padded batch sets it to its pad counts, so attention skips
  the pads; positions default to ``slot - start``). ``mtp``: one more layer, ``cache['mtp']``, the latent cache
  of the first MTP module (``mtp_decode``: speculative drafting), at the same slots and index as the model's."""
  m = model_cfg(cfg)
  a = m.attention
  sizes = stack_sizes(m)
  cache = {"index": jnp.zeros((batch,), jnp.int32), "start": jnp.zeros((batch,), jnp.int32)}
  for name in ("dense_layers", "moe_layers"):
    if sizes[name]:
      cache[name] = {"c": jnp.zeros((sizes[name], batch, max_len, a.kv_lora_rank), dtype),
                     "k_rope": jnp.zeros((sizes[name], batch, max_len, a.qk_rope_head_dim), dtype)}
  if mtp:
    if not sizes[MTP_STACK]:
      raise ValueError("init_cache(mtp=True) needs an MTP module (model.mtp.num_layers > 0)")
    cache[MTP_STACK] = {"c": jnp.zeros((batch, max_len, a.kv_lora_rank), dtype),
                        "k_rope": jnp.zeros((batch, max_len, a.qk_rope_head_dim), dtype)}
  return cache


def decode_step(cfg, params, tokens, cache):
  """Runs ``tokens`` [b, s] (a prompt chunk or one new token per row) against the cache.
  Returns (float32 logits [b, s, vocab], new cache)."""
  hidden, _, _, cache = forward_hidden(cfg, params, tokens, cache=cache)
  return logits_from_hidden(cfg, params, hidden), cache


def decode_hidden(cfg, params, tokens, cache, *, positions=None):
  """``tokens`` [b, s] against the cache (written at each row's index, which advances by s): (the residual
  stream before the final norm [b, s, embed], what the MTP module takes as its hidden input; float32 logits
  [b, s, vocab]; new cache)."""
  m = model_cfg(cfg)
  x, _, cache = _trunk(cfg, params, tokens, positions, None, cache)
  hidden = _merge(m, "final_norm", params["final_norm"]).norm(x)
  return x, logits_from_hidden(cfg, params, hidden), cache


def mtp_decode(cfg, params, hidden, tokens, cache, *, index=None):
  """The first MTP module over s positions per row, attending to its own latent cache (``cache['mtp']``, from
  ``init_cache(mtp=True)``): position i takes ``hidden`` [b, s, embed] (the main model's pre-norm residual at i
  from ``decode_hidden``, or, chaining drafts, the module's own output one position earlier) and ``tokens``
  [b, s] (token i + 1). Writes slots ``index`` .. ``index + s - 1`` (default the cache's index, which is left
  unchanged: it belongs to the main model). Returns (x [b, s, embed] to chain on, normed x for the shared head,
  new cache)."""
  m = model_cfg(cfg)
  b, s = tokens.shape
  index = jnp.broadcast_to(cache["index"] if index is None else index, (b,)).astype(jnp.int32)
  positions = jnp.maximum((index - cache["start"])[:, None] + jnp.arange(s, dtype=jnp.int32)[None], 0)
  layer = _merge(m, MTP_STACK, jax.tree.map(lambda a: a[0], params[MTP_STACK]))
  layer_cache = dict(cache[MTP_STACK], index=index, start=cache["start"])
  x, normed, new = layer.decode(embed(m, params, tokens), hidden, positions, layer_cache,
                                batch_axes(get_rules(cfg)))
  return x, normed, dict(cache, **{MTP_STACK: {"c": new["c"], "k_rope": new["k_rope"]}})
