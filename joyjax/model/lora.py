"""LoRA over whole params trees: merging adapters into the weights, adding fresh ones to a base checkpoint.

With ``model.lora.rank`` = r > 0 the layers named by ``model.lora.targets`` (attention: every MLA projection;
dense: the dense layers' MLP; shared: the shared expert; routed: the routed experts, optional) carry adapter
pairs ``{W}_lora_a`` / ``{W}_lora_b`` beside each weight (``model/adapters.py``) and compute
``x W + (alpha / r) (x A) B``. Every other parameter is frozen (``ParamInfo.trainable`` False: the optimizer
label 'frozen', no optimizer state, ``stop_gradient`` in the forward) and stored in ``model.lora.base_dtype``.

* ``merge_lora(cfg, params)``: W + (alpha / r) A @ B for every adapted weight, adapters removed: the params of
  the model without LoRA (``without_lora(cfg)``); what ``joyjax convert`` exports.
* ``add_lora(cfg, base_params, key)``: a params tree of ``cfg`` from adapter-free params (a converted
  checkpoint): the base cast to ``model.lora.base_dtype``, adapters fresh (A random, B zero: the same function
  as the base model), the same adapters as a jitted ``model.init(cfg, key)``'s.
* ``without_adapters(cfg, tree)``: any tree shaped like the params (arrays, ShapeDtypeStructs) minus the
  adapters, e.g. the abstract target to read a base checkpoint into.
* ``zero_adapters(cfg, params)``: every B set to zero: exactly the base model (a DPO reference without a copy).
* ``has_adapters(params)``: whether a params tree holds adapters (by their names; no config needed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from joyjax.errors import ConfigError
from joyjax.model import adapters
from joyjax.model.layout import is_info, param_info
from joyjax.model.transformer import abstract_params, init, lora_enabled, model_cfg


def without_lora(cfg):
  """A copy of ``cfg`` (full config or model group) with ``model.lora.rank`` = 0: the model merged params run."""
  out = cfg.copy_and_resolve_references()
  with model_cfg(out).lora.unlocked():
    model_cfg(out).lora.rank = 0
  return out


def has_adapters(params) -> bool:
  """Whether ``params`` holds LoRA adapters (leaves named ``*_lora_a`` / ``*_lora_b``)."""
  names = [getattr(k, "key", None) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0] for k in path]
  return any(isinstance(n, str) and n.endswith((adapters.SUFFIX_A, adapters.SUFFIX_B)) for n in names)


def _walk(node, info, fn):
  """Applies ``fn(params_dict, info_dict) -> dict`` to every dict of ``node`` (paired with ``info``)."""
  if not isinstance(node, dict):
    return node
  node = fn(node, info)
  return {k: _walk(v, info[k], fn) if isinstance(v, dict) else v for k, v in node.items()}


def _is_adapter(i) -> bool:
  return is_info(i) and i.adapter is not None


def without_adapters(cfg, tree):
  """``tree`` (params, their ShapeDtypeStructs, shardings...: shaped like ``model.init(cfg, key)``) without its
  adapter leaves."""
  return _walk(tree, param_info(cfg), lambda d, i: {k: v for k, v in d.items() if not _is_adapter(i.get(k))})


def merge_lora(cfg, params) -> dict:
  """Params of the same model without adapters: each adapted weight becomes W + (alpha / r) A @ B (computed in
  float32, stored in the wider of the weight's and the adapters' dtypes, so a bfloat16 base merged with float32
  adapters keeps the adapters' update). Params without adapters are returned unchanged. Raises ConfigError if
  ``params`` holds adapters but ``cfg`` has LoRA off (alpha / r would be unknown)."""
  if not has_adapters(params):
    return params
  lora = adapters.settings(model_cfg(cfg))
  if lora is None:
    raise ConfigError("config key 'model.lora.rank': the params hold LoRA adapters but the config has LoRA off; "
                      "give the model.lora settings (rank, alpha, targets) they were trained with")

  def merge(d, info):
    out = {k: v for k, v in d.items() if not _is_adapter(info.get(k))}
    for k, i in info.items():
      if _is_adapter(i) and i.adapter == "a" and k in d:
        a, b = d[k], d[i.adapts + adapters.SUFFIX_B]
        w = d[i.adapts]
        lead = info[i.adapts + adapters.SUFFIX_B].axes.index(adapters.LORA_AXIS)
        if a.shape[-1] != lora.rank:
          raise ConfigError(f"config key 'model.lora.rank': is {lora.rank} but adapter {k!r} has rank "
                            f"{a.shape[-1]}")
        out[i.adapts] = (w.astype(jnp.float32) + adapters.delta(a, b, lora.scale, lead)).astype(
            jnp.promote_types(w.dtype, a.dtype))
    return out

  return _walk(params, param_info(cfg), merge)


def zero_adapters(cfg, params) -> dict:
  """``params`` with every adapter B set to zero: the base model's function exactly (e.g. DPO's reference)."""
  info = param_info(cfg)
  return jax.tree.map(lambda x, i: jnp.zeros_like(x) if i.adapter == "b" else x, params, info)


def add_lora(cfg, base_params, key: jax.Array) -> dict:
  """The params of ``cfg`` (LoRA on) from adapter-free ``base_params`` of the same model: base leaves cast to
  their dtype under ``cfg`` (``model.lora.base_dtype``; the router bias keeps float32), adapters new: the
  same as a jitted ``model.init(cfg, key)`` draws (A normal, B zero), so the model computes the base function.
  Jit it with ``out_shardings`` to place the result (only the adapters' initialisation is computed)."""
  if not lora_enabled(cfg):
    raise ConfigError("config key 'model.lora.rank': add_lora needs LoRA on (rank > 0)")
  fresh = jax.jit(lambda k: _only_adapters(cfg, init(cfg, k)))(key)
  info = param_info(cfg)

  def fill(d, i, f, path):
    out = {}
    for k, ik in i.items():
      where = path + (k,)
      if isinstance(ik, dict):
        out[k] = fill(d.get(k, {}) if isinstance(d, dict) else {}, ik, f.get(k, {}), where)
      elif ik.adapter is not None:
        out[k] = f[k]
      elif not isinstance(d, dict) or k not in d:
        raise ConfigError(f"add_lora: the base params lack {'/'.join(where)!r}; they are not params of this "
                          "model (model config mismatch)")
      else:
        out[k] = d[k]
    return out

  out = fill(base_params, info, fresh, ())
  dtypes = abstract_params(cfg)
  return jax.tree.map(lambda x, s: x.astype(s.dtype) if x.dtype != s.dtype else x, out, dtypes)


def _only_adapters(cfg, params) -> dict:
  info = param_info(cfg)
  return _walk(params, info, lambda d, i: {k: v for k, v in d.items() if isinstance(v, dict) or _is_adapter(i[k])})
