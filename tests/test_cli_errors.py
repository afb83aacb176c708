"""What a newcomer meets at the command line: every user error (config, data, tokenizer, checkpoint,
conversion) ends the real ``joyjax`` command with exit status 1 and one line on stderr,
``joyjax <command>: <kind>: <message>``, naming the problem and its fix, with no traceback and (for train)
before the resolved config is printed; ``JOYJAX_DEBUG=1`` brings the traceback back. ``joyjax train --help``
documents the ``--config.KEY=VALUE`` overrides and the main keys.

Each case runs a subprocess in a fresh temporary directory with absolute paths. All of them fail before
anything is compiled (the data, tokenizer and checkpoint are opened before the model is initialised), so each
takes about the time of importing jax.
"""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest

from chat_data import chat_tokenizer
from configs import base
from joyjax import cli
from joyjax.data.tokenizer import train_tokenizer
from joyjax.errors import CheckpointCorruptError
from joyjax.train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
DOCS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(400)]


def joyjax(cwd, *args, module="joyjax.cli", debug=False):
  """Runs ``python -m <module> *args`` in ``cwd``: (exit status, stdout, stderr)."""
  env = dict(os.environ)
  env.pop("JOYJAX_DEBUG", None)
  if debug:
    env["JOYJAX_DEBUG"] = "1"
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  r = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                     text=True, timeout=300)
  return r.returncode, r.stdout, r.stderr


def assert_one_line(result, command, kind, *needles, config_printed=False):
  """Exit status 1; stderr is one line ``joyjax <command>: <kind>: ...`` holding every needle; no traceback;
  no printed config unless ``config_printed`` (train prints it once the data, the tokenizer and the state
  (restore or init_from) are ready; only a malformed row found while packing the first batch follows it)."""
  rc, out, err = result
  assert rc == 1, (rc, out[-2000:], err[-4000:])
  lines = err.strip().splitlines()
  assert len(lines) == 1, err[-4000:]
  assert lines[0].startswith(f"joyjax {command}: {kind}: "), lines[0]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  assert "Traceback" not in out + err
  if not config_printed:
    assert "config:\n" not in out, out[:2000]
  return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small JSON-lines corpus, the same with a malformed line 3, and a BPE tokenizer.json trained on it."""
  d = tmp_path_factory.mktemp("corpus")
  (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
  lines = [json.dumps({"text": t}) for t in DOCS]
  lines.insert(2, "{not json")
  (d / "bad.jsonl").write_text("\n".join(lines) + "\n")
  train_tokenizer(DOCS, 300).save(str(d / "tokenizer.json"))
  return d


def train_args(tmp_path, *extra):
  return ["--config", TINY, "--config.train.steps=1", "--config.data.seq_len=32",
          f"--config.train.output_dir={tmp_path / 'run'}", f"--config.data.cache_dir={tmp_path / 'cache'}", *extra]


def own_data(corpus, name="docs.jsonl"):
  return [f"--config.data.path={corpus / name}", f"--config.data.tokenizer={corpus / 'tokenizer.json'}"]


# ------------------------------------------------------------------------------------------------ config


def test_unknown_config_key(tmp_path):
  assert_one_line(joyjax(tmp_path, "train", *train_args(tmp_path, "--config.train.stepz=5")), "train",
                  "config error", "'train.stepz'", "configs/base.py", "Did you mean 'train.steps'")


@pytest.mark.slow  # a faster test in the fast loop covers the same behaviour
def test_post_training_commands_name_their_missing_inputs(tmp_path, corpus):
  """`joyjax sft` / `joyjax dpo` without conversation or pair files, and a preference row without a rejected
  response, end as one line naming the key or the file and row."""
  sft_cfg, dpo_cfg = (f"{ROOT}/configs/{n}.py" for n in ("sft_tiny", "dpo_tiny"))
  out = f"--config.train.output_dir={tmp_path / 'run'}"
  assert_one_line(joyjax(tmp_path, "sft", "--config", sft_cfg, out), "sft", "config error", "'data.path'",
                  "conversation")
  assert_one_line(joyjax(tmp_path, "sft", "--config", sft_cfg, out, "--config.sft.train_on=user"), "sft",
                  "config error", "'sft.train_on'")
  assert_one_line(joyjax(tmp_path, "dpo", "--config", dpo_cfg, out, "--config.dpo.loss_type=hinge"), "dpo",
                  "config error", "'dpo.loss_type'")
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text(json.dumps({"prompt": "What is 1 + 1?", "chosen": "The answer is 2."}) + "\n")
  no_eval = ("--config.train.eval_every=0", "--config.data.eval_fraction=0")
  assert_one_line(joyjax(tmp_path, "dpo", "--config", dpo_cfg, out, f"--config.data.path={pairs}", *no_eval,
                         f"--config.data.tokenizer={corpus / 'tokenizer.json'}"), "dpo", "data error",
                  "pairs.jsonl", "rejected", config_printed=True)  # rows are read when the first batch is packed
  # with held-out pairs asked for and too few rows to hold any out, the error says so
  assert_one_line(joyjax(tmp_path, "dpo", "--config", dpo_cfg, out, f"--config.data.path={pairs}",
                         f"--config.data.tokenizer={corpus / 'tokenizer.json'}"), "dpo", "data error",
                  "no evaluation pairs", "data.eval_fraction")


def test_bad_config_value(tmp_path):
  assert_one_line(joyjax(tmp_path, "train", *train_args(tmp_path, "--config.optim.name=sgd")), "train",
                  "config error", "'optim.name'", "'adamw' or 'muon'")
  assert_one_line(joyjax(tmp_path, "train", *train_args(tmp_path, "--config.train.steps=many")), "train",
                  "config error", "'train.steps'", "cannot parse 'many' as int")


@pytest.mark.slow  # a faster test in the fast loop covers the same behaviour
def test_missing_or_broken_config_file(tmp_path):
  missing = tmp_path / "nope.py"
  assert_one_line(joyjax(tmp_path, "train", "--config", missing), "train", "config error", str(missing),
                  "does not exist", "configs/tiny.py")
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  assert_one_line(joyjax(tmp_path, "params", "--config", broken), "params", "config error", str(broken),
                  "not valid Python", "line 1")


def test_debug_env_shows_the_traceback(tmp_path):
  rc, out, err = joyjax(tmp_path, "train", *train_args(tmp_path, "--config.train.stepz=5"), debug=True)
  assert rc == 1 and "Traceback" in err and "ConfigError: unknown config key 'train.stepz'" in err


# -------------------------------------------------------------------------------------------------- data


def test_data_path_matching_no_file(tmp_path):
  # through `python -m joyjax.train`, the documented alias of `joyjax train`
  line = assert_one_line(joyjax(tmp_path, *train_args(tmp_path, "--config.data.path=data/*.jsonl"),
                                module="joyjax.train"),
                         "train", "data error", "'data/*.jsonl' matches no file", str(tmp_path), "data.path")
  assert len(line) < 400
  assert not (tmp_path / "run").exists()  # nothing written before the inputs are open


def test_missing_tokenizer_file(tmp_path, corpus):
  missing = tmp_path / "tokenizer.json"
  assert_one_line(joyjax(tmp_path, "train", *train_args(tmp_path, f"--config.data.path={corpus / 'docs.jsonl'}",
                                                        f"--config.data.tokenizer={missing}")),
                  "train", "config error", "'data.tokenizer'", f"{missing}' does not exist", "tokenizer.json")


def test_malformed_jsonl_row(tmp_path, corpus):
  # No data.tokenizer: training the tokenizer on the corpus reads the row first.
  assert_one_line(joyjax(tmp_path, "train", *train_args(tmp_path, f"--config.data.path={corpus / 'bad.jsonl'}",
                                                        "--config.data.skip_malformed=false")),
                  "train", "data error", "bad.jsonl, line 3", "invalid JSON", "skip_malformed")


@pytest.mark.slow
def test_malformed_jsonl_row_with_a_tokenizer(tmp_path, corpus):
  # With a tokenizer given, the row is first read when the first batch is packed: today that is after the
  # model is initialised (about 15 s on 2 CPU cores), and only if the row is in it (no shuffle: it is).
  assert_one_line(joyjax(tmp_path, "train", *train_args(tmp_path, *own_data(corpus, "bad.jsonl"),
                                                        "--config.data.shuffle=false")),
                  "train", "data error", "bad.jsonl, line 3", "invalid JSON", "skip_malformed",
                  config_printed=True)


# ------------------------------------------------------------------------------------------- checkpoints


def test_init_from_missing_directory(tmp_path, corpus):
  missing = tmp_path / "converted"
  assert_one_line(joyjax(tmp_path, "train", *train_args(tmp_path, *own_data(corpus),
                                                        f"--config.train.init_from={missing}")),
                  "train", "checkpoint error", str(missing), "does not exist", "joyjax convert")


def test_corrupt_checkpoint_in_output_dir(tmp_path, corpus):
  run = tmp_path / "run"
  with checkpoint.Checkpointer(run, keep=3, async_save=False) as c:
    c.save(1, {"w": jnp.ones((4, 4))})  # any tree: the unreadable metadata is found before trees are compared
  step = run / "checkpoints" / "1"
  metadata = step / "state" / "_METADATA"
  metadata.write_bytes(metadata.read_bytes()[:20])  # truncated
  assert_one_line(joyjax(tmp_path, "train", *train_args(tmp_path, *own_data(corpus), "--config.train.steps=5")),
                  "train", "checkpoint error", str(step), "cannot be read", "delete it")
  assert metadata.exists() and step.is_dir()  # nothing the user saved is deleted


def test_sample_missing_checkpoint(tmp_path):
  missing = tmp_path / "nonexistent"
  assert_one_line(joyjax(tmp_path, "sample", "--checkpoint", missing), "sample", "checkpoint error",
                  f"{missing} does not exist", "output_dir")
  assert not missing.exists()  # not created by looking


@pytest.mark.slow  # a faster test in the fast loop covers the same behaviour
def test_convert_missing_inputs_and_existing_output(tmp_path):
  missing = tmp_path / "nonexistent"
  assert_one_line(joyjax(tmp_path, "convert", "--hf-dir", missing, "--out", tmp_path / "x"), "convert",
                  "checkpoint error", str(missing), "does not exist", "config.json")
  assert_one_line(joyjax(tmp_path, "convert", "--params", missing, "--config", TINY, "--out", tmp_path / "x"),
                  "convert", "checkpoint error", str(missing), "does not exist")
  assert not (tmp_path / "x").exists()
  out = tmp_path / "mine"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  assert_one_line(joyjax(tmp_path, "convert", "--hf-dir", missing, "--out", out), "convert",
                  "checkpoint error", f"--out {out} already exists")
  assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.slow  # a faster test in the fast loop covers the same behaviour
def test_usage_errors_stay_argparse_errors(tmp_path):
  rc, _, err = joyjax(tmp_path, "convert", "--out", tmp_path / "x")
  assert rc == 2 and "--hf-dir" in err and "Traceback" not in err
  rc, _, err = joyjax(tmp_path, "train")
  assert rc == 2 and "--config" in err


def test_error_line_is_one_line_in_process(tmp_path):
  assert cli.error_line("train", CheckpointCorruptError("checkpoint x cannot be read\n  (why).\nDelete it")) == \
      "joyjax train: checkpoint error: checkpoint x cannot be read (why). Delete it"
  with pytest.raises(SystemExit, match=r"^joyjax params: config error: unknown config key 'model\.hiden_size'"):
    cli.main(["params", "--config", TINY, "--config.model.hiden_size=8"])


# -------------------------------------------------------------------------------------------------- help


def test_train_help_documents_overrides_and_main_keys(tmp_path):
  rc, out, err = joyjax(tmp_path, "train", "--help")
  assert rc == 0, err
  assert "--config.KEY=VALUE" in out and "configs/base.py" in out and "JOYJAX_DEBUG=1" in out
  for key in ("train.steps", "train.batch_size", "train.output_dir", "train.init_from", "data.path",
              "data.tokenizer", "data.seq_len", "optim.name", "optim.lr", "model.moe.impl", "checkpoint.every"):
    assert re.search(rf"^  {re.escape(key)} +\S", out, re.M), key  # the key, then its meaning
  assert "mesh.fsdp" in out and "mesh.expert" in out
  assert "global sequences per optimizer step" in out  # train.batch_size's comment in configs/base.py


def test_listed_keys_exist_and_have_a_meaning():
  keys = set(cli.config_key_comments())
  cfg = base.get_config()

  def exists(key):
    node = cfg
    for part in key.split("."):
      if part not in node:
        return False
      node = node[part]
    return True

  assert keys and all(exists(k) for k in keys)  # the parser of configs/base.py finds real keys only
  assert {"model.moe.impl", "mesh.rules", "train.init_from", "model.attention.kv_lora_rank"} <= keys
  for key in cli.MAIN_KEYS + cli.MESH_KEYS:
    assert exists(key), key
  for key in cli.MAIN_KEYS:
    assert cli.config_key_comments().get(key) or key in cli._MEANINGS, key
  assert cli.config_key_comments()["data.seq_len"] == "packed sequence length"


@pytest.mark.slow  # tests/test_rl_envs.py checks the same errors in-process
def test_rl_names_a_bad_task_reward_or_prompt_length(tmp_path):
  """`joyjax rl` with a task module that does not exist, an unknown task option, a reward function that does
  not exist, or prompts longer than rl.max_prompt_len: one line naming the key and the fix."""
  tok = tmp_path / "tokenizer.json"
  chat_tokenizer(512).save(str(tok))
  args = ["--config", f"{ROOT}/configs/fiberpo_tiny.py", f"--config.train.output_dir={tmp_path / 'run'}",
          f"--config.data.tokenizer={tok}", "--config.model.vocab_size=640"]
  assert_one_line(joyjax(tmp_path, "rl", *args, "--config.rl.env=no_such_module:make"), "rl", "config error",
                  "'rl.env'", "no_such_module")
  assert_one_line(joyjax(tmp_path, "rl", *args, "--config.rl.env_args=max_operandz=3"), "rl", "config error",
                  "rl.env_args", "max_operandz")
  assert_one_line(joyjax(tmp_path, "rl", *args, "--config.rl.reward_fn=no_such_module:reward"), "rl",
                  "config error", "rl.reward_fn")
  assert_one_line(joyjax(tmp_path, "rl", *args, "--config.rl.max_prompt_len=4"), "rl", "data error",
                  "rl.max_prompt_len")
