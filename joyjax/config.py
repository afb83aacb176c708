"""Config loading, command-line overrides and eager validation.

A config file is a Python module with ``get_config() -> ConfigDict`` that starts from ``configs/base.py``.
Overrides look like ``--config.optim.lr=3e-4``. Every error names the offending key and says how to fix it,
before anything is compiled.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys

import ml_collections

from configs import base as _base
from joyjax.axes import parse_rules
from joyjax.errors import ConfigError

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "blockwise", "cudnn", "auto")  # auto: cudnn on an NVIDIA GPU, blockwise elsewhere
MOE_IMPLS = ("auto", "reference", "ragged_dot", "pallas", "pallas_interpret")
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "muon")
MUON_NS_DTYPES = ("bfloat16", "float32")  # optim.muon_ns_dtype: the Newton-Schulz iteration's compute dtype
SCHEDULES = ("constant", "cosine", "wsd")
DATA_FORMATS = ("auto", "jsonl", "parquet", "text", "arrayrecord")  # auto: by file extension
CHAT_TRAIN_ON = ("assistant", "last", "all")   # sft.train_on: which rendered tokens carry loss
OVERLONG_RULES = ("truncate", "skip")          # sft.overlong, dpo.overlong: an example longer than a row
DPO_LOSS_TYPES = ("sigmoid", "ipo")            # dpo.loss_type (sigmoid + label_smoothing = conservative DPO)
DPO_REFERENCES = ("frozen", "precomputed")     # dpo.reference: where the reference log-probs come from
POLICY_LOSSES = ("fiberpo", "fiberpo_domain", "grpo", "gspo")  # rl.loss
ADVANTAGES = ("group", "group_mean", "none")  # rl.advantage: how rewards become advantages
# The weight groups each layer tags its matrices with (``ParamInfo.group``): MLA projections, the dense layers' MLP,
# the shared expert, the routed experts. model.lora.targets and quant.targets name subsets of them.
PARAM_GROUPS = ("attention", "dense", "shared", "routed")
LORA_TARGETS = PARAM_GROUPS  # model.lora.targets: which weights get adapters
QUANT_FORMATS = ("none", "int4", "fp8")  # quant.format: none = off; int4 = group-wise symmetric; fp8 = e4m3 blocks
MAX_DRAFT_TOKENS = 8  # train.sample_draft_tokens, rl.draft_tokens: MTP speculative decoding drafts per step at most


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    keys.append(name)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_all_keys(v, name + "."))
  return keys


def _unknown_key_error(key: str, known: list[str]) -> ConfigError:
  close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
  hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
  return ConfigError(f"unknown config key {key!r}: it is not documented in configs/base.py.{hint}")


def check_schema(cfg: ml_collections.ConfigDict) -> None:
  """Every key of ``cfg`` exists in the base schema with a compatible type."""
  ref = _base.get_config()
  known = _all_keys(ref)

  def walk(node, ref_node, prefix):
    for k, v in node.items():
      name = f"{prefix}{k}"
      if k not in ref_node:
        raise _unknown_key_error(name, known)
      rv = ref_node[k]
      if isinstance(rv, ml_collections.ConfigDict):
        if not isinstance(v, ml_collections.ConfigDict):
          raise ConfigError(f"config key {name!r} must be a group of keys, got {type(v).__name__}")
        walk(v, rv, name + ".")
      elif rv is not None and v is not None and not _type_ok(v, rv):
        raise ConfigError(f"config key {name!r} must be {type(rv).__name__}, got {v!r} ({type(v).__name__})")

  walk(cfg, ref, "")


def _type_ok(v, ref) -> bool:
  if isinstance(ref, bool):
    return isinstance(v, bool)
  if isinstance(ref, float):
    return isinstance(v, (int, float)) and not isinstance(v, bool)
  if isinstance(ref, int):
    return isinstance(v, int) and not isinstance(v, bool)
  return isinstance(v, type(ref))


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Loads ``path`` (a config file), applies ``--config.key=value`` overrides, validates."""
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist (try configs/tiny.py or configs/joyai_flash.py)")
  spec = importlib.util.spec_from_file_location(f"_joyjax_cfg_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except AttributeError as e:  # a locked ConfigDict rejects undocumented keys with AttributeError
    raise ConfigError(f"{path}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} must define get_config() returning a ConfigDict")
  try:
    cfg = module.get_config()
  except AttributeError as e:  # e.g. `c.train.lrr = 1` on the locked base config inside get_config()
    raise ConfigError(f"{path}: get_config() sets a key the schema does not have ({e}); every key is documented "
                      "in configs/base.py") from e
  check_schema(cfg)
  apply_overrides(cfg, overrides)
  validate(cfg)
  return cfg


def parse_value(text: str, ref):
  """Parses a command-line value into the type of the existing field ``ref``."""
  if isinstance(ref, bool):
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"expected a boolean, got {text!r}")
  if isinstance(ref, int):
    return int(float(text)) if "e" in text.lower() else int(text)
  if isinstance(ref, float):
    return float(text)
  if isinstance(ref, str):
    return text
  return ast.literal_eval(text)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides) -> None:
  """Applies ``--config.a.b=value`` (or ``a.b=value``) strings in place."""
  known = _all_keys(cfg)
  for item in overrides:
    arg = item[2:] if item.startswith("--") else item
    if arg.startswith("config."):
      arg = arg[len("config."):]
    if "=" not in arg:
      raise ConfigError(f"override {item!r} must look like --config.key=value")
    key, text = arg.split("=", 1)
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise _unknown_key_error(key, known)
      node = node[p]
    if parts[-1] not in node:
      raise _unknown_key_error(key, known)
    ref = node[parts[-1]]
    if isinstance(ref, ml_collections.ConfigDict):
      raise ConfigError(f"config key {key!r} is a group; override one of its keys instead")
    try:
      value = parse_value(text, ref)
    except (ValueError, SyntaxError) as e:
      raise ConfigError(f"config key {key!r}: cannot parse {text!r} as {type(ref).__name__}: {e}") from e
    with node.unlocked():
      node[parts[-1]] = value


def _require(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"config key {key!r}: {msg}")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks values and their consistency; raises ConfigError naming the key."""
  m = cfg.model
  a, e, r = m.attention, m.moe, m.rope
  for key in ("vocab_size", "hidden_size", "num_layers", "dense_intermediate_size"):
    _require(m[key] > 0, f"model.{key}", f"must be positive, got {m[key]}")
  _require(0 <= m.first_k_dense <= m.num_layers, "model.first_k_dense",
           f"must be in [0, model.num_layers={m.num_layers}], got {m.first_k_dense}")
  _require(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
  _require(m.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}, got {m.param_dtype!r}")
  _require(m.remat in REMAT_POLICIES, "model.remat", f"must be one of {REMAT_POLICIES}, got {m.remat!r}")
  _require(m.rms_norm_eps > 0, "model.rms_norm_eps", "must be positive")
  _require(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
           f"must be one of {ATTENTION_IMPLS}, got {m.attention_impl!r}")
  _require(m.attention_block >= 1, "model.attention_block", f"must be >= 1, got {m.attention_block}")
  _require(m.attention_max_segments >= 0, "model.attention_max_segments",
           f"must be >= 0 (0 = documents as a mask), got {m.attention_max_segments}")
  _require(a.num_heads > 0, "model.attention.num_heads", "must be positive")
  _require(a.q_lora_rank >= 0, "model.attention.q_lora_rank", "must be >= 0 (0 = full-rank q projection)")
  for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
    _require(a[key] > 0, f"model.attention.{key}", f"must be positive, got {a[key]}")
  _require(a.qk_rope_head_dim > 0 and a.qk_rope_head_dim % 2 == 0, "model.attention.qk_rope_head_dim",
           f"must be a positive even number (rotary pairs), got {a.qk_rope_head_dim}")
  _require(r.scaling in ("none", "yarn"), "model.rope.scaling", f"must be 'none' or 'yarn', got {r.scaling!r}")
  if r.scaling == "yarn":
    _require(r.factor >= 1.0, "model.rope.factor", f"yarn needs factor >= 1, got {r.factor}")
    _require(r.original_max_position > 0, "model.rope.original_max_position", "must be positive for yarn")
  if m.first_k_dense < m.num_layers or m.mtp.num_layers > 0:
    _require(e.num_experts > 0, "model.moe.num_experts", "must be positive")
    _require(0 < e.num_experts_per_tok <= e.num_experts, "model.moe.num_experts_per_tok",
             f"must be in [1, model.moe.num_experts={e.num_experts}], got {e.num_experts_per_tok}")
    _require(e.intermediate_size > 0, "model.moe.intermediate_size", "must be positive")
    _require(e.n_group > 0 and e.num_experts % e.n_group == 0, "model.moe.n_group",
             f"must divide model.moe.num_experts={e.num_experts}, got {e.n_group}")
    _require(0 < e.topk_group <= e.n_group, "model.moe.topk_group",
             f"must be in [1, model.moe.n_group={e.n_group}], got {e.topk_group}")
    per_group = e.num_experts // e.n_group
    _require(e.num_experts_per_tok <= e.topk_group * per_group, "model.moe.num_experts_per_tok",
             f"top-{e.num_experts_per_tok} cannot be chosen from {e.topk_group} group(s) of {per_group} experts")
    if e.n_group > 1:
      _require(per_group >= 2, "model.moe.n_group", "group scoring uses the top-2 experts of each group: "
               f"need >= 2 experts per group, got {per_group}")
    _require(e.scoring_func in ("sigmoid", "softmax"), "model.moe.scoring_func",
             f"must be 'sigmoid' or 'softmax', got {e.scoring_func!r}")
    _require(e.impl in MOE_IMPLS, "model.moe.impl", f"must be one of {MOE_IMPLS}, got {e.impl!r}")
    _require(e.num_shared_experts >= 0, "model.moe.num_shared_experts", "must be >= 0")
    _require(e.capacity_factor >= 0, "model.moe.capacity_factor", "must be >= 0 (0 = dropless)")
  _require(m.mtp.num_layers >= 0, "model.mtp.num_layers", "must be >= 0")
  lo = m.lora
  _require(lo.rank >= 0, "model.lora.rank", f"must be >= 0 (0 = off), got {lo.rank}")
  if lo.rank > 0:
    _require(lo.alpha > 0, "model.lora.alpha", f"must be positive, got {lo.alpha}")
    targets = [x.strip() for x in lo.targets.split(",") if x.strip()]
    _require(bool(targets) and set(targets) <= set(LORA_TARGETS), "model.lora.targets",
             f"must be a comma-separated subset of {', '.join(LORA_TARGETS)}, got {lo.targets!r}")
    _require(lo.base_dtype in DTYPES, "model.lora.base_dtype", f"must be one of {DTYPES}, got {lo.base_dtype!r}")
  qu = cfg.quant
  _require(qu.format in QUANT_FORMATS, "quant.format", f"must be one of {QUANT_FORMATS}, got {qu.format!r}")
  if qu.format != QUANT_FORMATS[0]:
    targets = [x.strip() for x in qu.targets.split(",") if x.strip()]
    _require(bool(targets) and set(targets) <= set(PARAM_GROUPS), "quant.targets",
             f"must be a comma-separated subset of {', '.join(PARAM_GROUPS)}, got {qu.targets!r}")
    _require(qu.group_size > 0, "quant.group_size", f"must be positive, got {qu.group_size}")
    _require(qu.start_step >= 0, "quant.start_step", f"must be >= 0 (0 = from the first step), got {qu.start_step}")

  d = cfg.data
  _require(d.seq_len > 1, "data.seq_len", f"must be > 1, got {d.seq_len}")
  _require(d.num_epochs >= 0, "data.num_epochs", f"must be >= 0 (0 = repeat forever), got {d.num_epochs}")
  _require(d.worker_count >= 0, "data.worker_count", f"must be >= 0 (0 = in-process), got {d.worker_count}")
  _require(d.format in DATA_FORMATS, "data.format", f"must be one of {DATA_FORMATS}, got {d.format!r}")
  o = cfg.optim
  _require(o.name in OPTIMIZERS, "optim.name", f"must be {' or '.join(map(repr, OPTIMIZERS))}, got {o.name!r}")
  _require(o.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}, got {o.schedule!r}")
  _require(o.lr > 0, "optim.lr", "must be positive")
  _require(0.0 <= o.decay_fraction <= 1.0, "optim.decay_fraction", "must be in [0, 1]")
  _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables)")
  _require(o.muon_ns_dtype in MUON_NS_DTYPES, "optim.muon_ns_dtype",
           f"must be one of {MUON_NS_DTYPES}, got {o.muon_ns_dtype!r}")
  t = cfg.train
  _require(t.steps > 0, "train.steps", "must be positive")
  _require(t.grad_accum > 0, "train.grad_accum", "must be positive")
  _require(t.batch_size > 0 and t.batch_size % t.grad_accum == 0, "train.batch_size",
           f"must be a positive multiple of train.grad_accum={t.grad_accum}, got {t.batch_size}")
  _require(t.loss_chunk > 0, "train.loss_chunk", "must be positive")
  for key, k in (("train.sample_draft_tokens", t.sample_draft_tokens), ("rl.draft_tokens", cfg.rl.draft_tokens)):
    _require(0 <= k <= MAX_DRAFT_TOKENS, key, f"must be 0 (off) .. {MAX_DRAFT_TOKENS}, got {k}")
    _require(k == 0 or m.mtp.num_layers > 0, key, f"is {k} but drafts come from the MTP module and "
             "model.mtp.num_layers is 0; set it to 0")
  _require(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
  _require(not (d.eval_path and d.eval_fraction > 0), "data.eval_fraction",
           "evaluate on separate files (data.eval_path) or on a held-out fraction of the training corpus, not both; "
           "set data.eval_fraction=0 or data.eval_path=\"\"")
  _require(t.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 = never), got {t.eval_every}")
  _require(t.eval_batches >= 1, "train.eval_batches", f"must be >= 1, got {t.eval_batches}")
  _require(t.eval_every == 0 or d.eval_path or d.eval_fraction > 0, "train.eval_every",
           f"{t.eval_every} asks for evaluations but there is no evaluation data; set data.eval_path or "
           "data.eval_fraction, or train.eval_every=0")
  _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
  s = cfg.sft
  _require(0.0 <= s.thinking_ratio <= 1.0, "sft.thinking_ratio", f"must be in [0, 1], got {s.thinking_ratio}")
  _require(s.train_on in CHAT_TRAIN_ON, "sft.train_on", f"must be one of {CHAT_TRAIN_ON}, got {s.train_on!r}")
  _require(s.overlong in OVERLONG_RULES, "sft.overlong", f"must be one of {OVERLONG_RULES}, got {s.overlong!r}")
  po = cfg.dpo
  _require(po.beta > 0, "dpo.beta", f"must be positive, got {po.beta}")
  _require(po.loss_type in DPO_LOSS_TYPES, "dpo.loss_type", f"must be one of {DPO_LOSS_TYPES}, got {po.loss_type!r}")
  _require(0.0 <= po.label_smoothing < 0.5, "dpo.label_smoothing", f"must be in [0, 0.5), got {po.label_smoothing}")
  _require(po.sft_weight >= 0, "dpo.sft_weight", f"must be >= 0 (0 = off), got {po.sft_weight}")
  _require(po.label_smoothing == 0 or po.loss_type == "sigmoid", "dpo.label_smoothing",
           f"applies to loss_type 'sigmoid' (conservative DPO) only, not {po.loss_type!r}; set it to 0")
  _require(po.reference in DPO_REFERENCES, "dpo.reference", f"must be one of {DPO_REFERENCES}, got {po.reference!r}")
  _require(po.overlong in OVERLONG_RULES, "dpo.overlong", f"must be one of {OVERLONG_RULES}, got {po.overlong!r}")
  _require(po.pairs_per_batch >= 0, "dpo.pairs_per_batch", f"must be >= 0 (0 = train.batch_size), got {po.pairs_per_batch}")
  _validate_rl(cfg.rl)
  ck = cfg.checkpoint
  _require(ck.every >= 0 and ck.keep > 0, "checkpoint.keep", "checkpoint.every >= 0 and checkpoint.keep > 0")
  p = cfg.mesh
  sizes = [p.dcn_data, p.data, p.fsdp, p.expert, p.tensor]
  _require(sum(s == -1 for s in sizes) <= 1, "mesh", "at most one mesh axis may be -1")
  _require(all(s == -1 or s > 0 for s in sizes), "mesh", f"axis sizes must be positive or -1, got {sizes}")
  if p.expert > 1 and e.num_experts > 0:
    _require(e.num_experts % p.expert == 0, "mesh.expert",
             f"must divide model.moe.num_experts={e.num_experts}, got {p.expert}")
  if p.tensor > 1:
    _require(a.num_heads % p.tensor == 0, "mesh.tensor",
             f"must divide model.attention.num_heads={a.num_heads}, got {p.tensor}")
  _require(p.num_processes >= 0, "mesh.num_processes",
           f"must be >= 0 (0 = from the environment), got {p.num_processes}")
  _require(not p.coordinator or ":" in p.coordinator, "mesh.coordinator", f"must be host:port, got {p.coordinator!r}")
  if p.rules:
    try:
      parse_rules(p.rules)
    except ValueError as err:
      raise ConfigError(f"config key 'mesh.rules': {err}") from err


def _validate_rl(rl) -> None:
  _require(bool(rl.env.strip()), "rl.env", "must name a task: arithmetic, string or 'package.module:factory'")
  _require(not rl.reward_fn or ":" in rl.reward_fn, "rl.reward_fn",
           f"must be 'package.module:function', got {rl.reward_fn!r}")
  for key in ("prompts_per_step", "num_generations", "max_prompt_len", "max_new_tokens", "num_minibatches",
              "epochs"):
    _require(rl[key] > 0, f"rl.{key}", f"must be positive, got {rl[key]}")
  _require(rl.num_generations >= 2 or rl.advantage == "none", "rl.num_generations",
           f"group advantages need >= 2 samples per prompt, got {rl.num_generations} (or set rl.advantage=none)")
  _require((rl.prompts_per_step * rl.num_generations) % rl.num_minibatches == 0, "rl.num_minibatches",
           f"must divide the rollout batch rl.prompts_per_step x rl.num_generations = "
           f"{rl.prompts_per_step * rl.num_generations}, got {rl.num_minibatches}")
  _require(rl.temperature > 0, "rl.temperature", f"must be positive (rollouts sample), got {rl.temperature}")
  _require(rl.eval_temperature >= 0, "rl.eval_temperature", f"must be >= 0 (0 = greedy), got {rl.eval_temperature}")
  _require(0.0 < rl.top_p <= 1.0, "rl.top_p", f"must be in (0, 1], got {rl.top_p}")
  _require(rl.top_k >= 0, "rl.top_k", f"must be >= 0 (0 = off), got {rl.top_k}")
  _require(rl.loss in POLICY_LOSSES, "rl.loss", f"must be one of {POLICY_LOSSES}, got {rl.loss!r}")
  _require(rl.advantage in ADVANTAGES, "rl.advantage", f"must be one of {ADVANTAGES}, got {rl.advantage!r}")
  for key in ("kl_coef", "format_weight", "length_weight", "clip_low", "clip_high"):
    _require(rl[key] >= 0, f"rl.{key}", f"must be >= 0, got {rl[key]}")
  for key in ("curriculum_start", "curriculum_end"):
    _require(0.0 <= rl[key] <= 1.0, f"rl.{key}", f"must be a pass rate in [0, 1], got {rl[key]}")
  _require(rl.curriculum_width > 0, "rl.curriculum_width", f"must be positive, got {rl.curriculum_width}")
  fp = rl.fiberpo
  for key in ("c_plus", "c_minus", "eps"):
    _require(fp[key] > 0, f"rl.fiberpo.{key}", f"must be positive, got {fp[key]}")
  _require(fp.steepness >= 0, "rl.fiberpo.steepness", f"must be >= 0 (0 = each level's count), got {fp.steepness}")
  for key in ("group_c_plus", "group_c_minus", "domain_c_plus", "domain_c_minus"):
    _require(fp[key] == -1 or fp[key] > 0, f"rl.fiberpo.{key}", f"must be positive or -1 (= the shared budget), "
             f"got {fp[key]}")


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
  return cfg.to_dict()


def from_dict(d: dict) -> ml_collections.ConfigDict:
  """Rebuilds a validated config from ``to_dict`` output (e.g. stored in a checkpoint)."""
  cfg = _base.get_config()

  def fill(node, src, prefix):
    for k, v in src.items():
      name = f"{prefix}{k}"
      if k not in node:
        raise _unknown_key_error(name, _all_keys(cfg))
      if isinstance(node[k], ml_collections.ConfigDict):
        fill(node[k], v, name + ".")
      else:
        with node.unlocked():
          node[k] = v

  fill(cfg, d, "")
  check_schema(cfg)
  validate(cfg)
  return cfg


if __name__ == "__main__":  # pragma: no cover
  print(load_config(sys.argv[1], sys.argv[2:]))
