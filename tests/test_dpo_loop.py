"""`joyjax dpo` through the loop with a precomputed reference: one pass of reference log-probs before training,
saved in train.output_dir and reused (not recomputed) when the run resumes; the first step is log 2."""

import math
import os

import pytest

import dpo_data
from chat_data import chat_tokenizer
from conftest import tiny_config
from joyjax.train import dpo, loop

pytestmark = pytest.mark.slow


def _cfg(tmp_path, steps):
  tok = tmp_path / "tokenizer.json"
  if not tok.exists():
    chat_tokenizer(512).save(str(tok))
    dpo_data.write_jsonl(tmp_path / "pairs.jsonl", dpo_data.preference_rows(80, seed=5))
  return tiny_config({"data.path": str(tmp_path / "pairs.jsonl"), "data.tokenizer": str(tok),
                      "model.vocab_size": 640, "data.seq_len": 128, "train.batch_size": 8,
                      "train.steps": steps, "train.output_dir": str(tmp_path / "run"), "train.log_every": 1,
                      "checkpoint.every": 0, "train.sample_prompt": "", "train.mtp_loss_weight": 0.0,
                      "model.num_layers": 2, "model.mtp.num_layers": 0, "optim.name": "adamw",
                      "data.eval_fraction": 0.1, "train.eval_every": 2, "train.eval_batches": 1,
                      "dpo.reference": "precomputed"})


def test_precomputed_reference_is_saved_then_reused_on_resume(tmp_path):
  first = loop.train(_cfg(tmp_path, 2), objective=loop.DPO, print_sample=False)
  assert abs(first.losses[1] - math.log(2)) < 1e-4  # the reference is the starting policy
  files = [tmp_path / "run" / f for f in dpo.REFERENCE_FILES]
  assert all(f.exists() for f in files)
  train_ref = dpo.load_reference(str(files[0]))
  assert len(train_ref) >= 60 and all(c < 0 and r < 0 for c, r in train_ref.values())
  stamps = [os.stat(f).st_mtime_ns for f in files]
  second = loop.train(_cfg(tmp_path, 4), objective=loop.DPO, print_sample=False)
  assert sorted(second.losses) == [3, 4] and second.step == 4
  assert [os.stat(f).st_mtime_ns for f in files] == stamps  # read back, not recomputed
