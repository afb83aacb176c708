"""Configs fail early, naming the key."""

import pytest

from conftest import TINY, repo_config_path
from joyjax.config import ConfigError, from_dict, load_config


def test_tiny_and_flash_load():
  assert load_config(TINY).model.hidden_size == 64
  f = load_config(repo_config_path("joyai_flash"))
  assert (f.model.num_layers, f.model.moe.num_experts, f.model.vocab_size) == (40, 256, 129280)


def test_unknown_override_key_names_it():
  with pytest.raises(ConfigError, match=r"model\.moe\.num_expert'.*Did you mean 'model\.moe\.num_experts'"):
    load_config(TINY, ["--config.model.moe.num_expert=4"])


def test_unknown_key_in_config_file(tmp_path):
  p = tmp_path / "bad.py"
  p.write_text("from configs import base\n\ndef get_config():\n  c = base.get_config()\n"
               "  c.train.learning_rate = 1.0\n  return c\n")
  with pytest.raises(ConfigError, match="learning_rate"):
    load_config(str(p))


def test_bad_value_type_and_consistency():
  with pytest.raises(ConfigError, match=r"train\.steps.*cannot parse"):
    load_config(TINY, ["--config.train.steps=many"])
  with pytest.raises(ConfigError, match=r"model\.moe\.n_group"):
    load_config(TINY, ["--config.model.moe.n_group=3"])
  with pytest.raises(ConfigError, match=r"model\.moe\.topk_group"):
    load_config(TINY, ["--config.model.moe.topk_group=3"])
  with pytest.raises(ConfigError, match=r"train\.batch_size"):
    load_config(TINY, ["--config.train.grad_accum=3"])
  with pytest.raises(ConfigError, match=r"model\.remat"):
    load_config(TINY, ["--config.model.remat=sometimes"])
  with pytest.raises(ConfigError, match="does not exist"):
    load_config(repo_config_path("nope"))


def test_overrides_parse_types_and_round_trip():
  c = load_config(TINY, ["--config.optim.lr=3e-4", "--config.model.scan_layers=false",
                                      "--config.train.steps=1e3", "--config.data.path=/x/*.jsonl"])
  assert c.optim.lr == 3e-4 and c.model.scan_layers is False and c.train.steps == 1000
  assert from_dict(c.to_dict()).to_dict() == c.to_dict()
  with pytest.raises(ConfigError, match="unknown config key 'train.foo'"):
    from_dict({"train": {"foo": 1}})
