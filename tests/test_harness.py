"""The loop harness and evaluation: pretraining through the harness gives bit for bit the losses of a plain loop
over ``make_train_step``; the held-out documents never reach a training batch and are the same in every run and
after resume; eval metrics land in metrics.jsonl and the log line at ``train.eval_every`` and at the end, equal a
float64 recomputation, fall, and are identical across a resume; a finished run says so once and does nothing."""

import io
import json
import math
import os
import re

import jax
import numpy as np
import pytest

from conftest import DATA_CACHE
from joyjax import model, optim
from joyjax.config import load_config
from joyjax.data import pipeline
from joyjax.errors import ConfigError, DataError
from joyjax.parallel import rules
from joyjax.parallel.mesh import make_mesh
from joyjax.train import state as state_lib
from joyjax.train.loop import main, train
from joyjax.train.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs/tiny.py")
STEPS, EVERY = 7, 3  # evaluations at steps 3 and 6 (eval_every) and 7 (the end)


def overrides(out_dir, *extra):
  return [f"--config.train.output_dir={out_dir}", f"--config.train.steps={STEPS}", "--config.data.seq_len=32",
          "--config.train.batch_size=8", "--config.checkpoint.every=3", "--config.train.log_every=2",
          "--config.train.sample_prompt=", f"--config.data.cache_dir={DATA_CACHE}",
          "--config.data.tokenizer_vocab_size=1024", "--config.optim.warmup_steps=2",
          "--config.data.eval_fraction=0.02", f"--config.train.eval_every={EVERY}",
          "--config.train.eval_batches=2", *extra]


def _rows(out_dir):
  with open(os.path.join(out_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("harness")
  stream = io.StringIO()
  r = train(load_config(TINY, overrides(out)), stream=stream)
  r.out_dir, r.text = out, stream.getvalue()
  return r


# ------------------------------------------------------------------------------- (a) the same losses


def test_harness_losses_equal_a_plain_loop_bitwise(run):
  """A hand-written loop: the same mesh, shardings, init, data iterator and jitted step, nothing else."""
  cfg = load_config(TINY, overrides(run.out_dir))
  mesh = make_mesh(cfg)
  tok = pipeline.build_tokenizer(cfg)
  data = pipeline.make_iterator(cfg, tok)
  tx = optim.make_optimizer(cfg, model.abstract_params(cfg), STEPS, mesh=mesh)
  abstract = state_lib.abstract_state(cfg, tx)
  state_sh = rules.state_shardings(cfg, mesh, abstract)
  batch_sh = rules.batch_sharding(mesh, rules.get_rules(cfg))
  with jax.set_mesh(mesh):
    init = jax.jit(lambda k: state_lib.init_state(cfg, tx, k), out_shardings=state_sh)
    state = init(jax.random.key(cfg.train.seed))
    step = jax.jit(make_train_step(cfg, tx, STEPS), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
    losses = {}
    for i in range(1, STEPS + 1):
      batch = {k: jax.device_put(v, batch_sh) for k, v in next(data).items()}
      state, m = step(state, batch)
      losses[i] = float(m["loss"])
  assert sorted(run.losses) == list(range(1, STEPS + 1))
  assert run.losses == losses  # bitwise, with evaluations between the harness's steps


# ------------------------------------------------------------------------------- (c) eval metrics


def _eval_rows(out_dir):
  return {r["step"]: r for r in _rows(out_dir) if "eval/loss" in r}


def test_log_lines_carry_the_data_counters(run):
  """Every line has the data iterator's counters (here nothing was skipped)."""
  rows = _rows(run.out_dir)
  assert rows and all(r["data/skipped_malformed"] == 0.0 for r in rows)


@pytest.mark.slow  # the counter's presence: the test above; its counting: tests/test_data.py
def test_skipped_malformed_rows_are_counted_in_the_log(tmp_path):
  docs = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i * i}\n"}) for i in range(300)]
  docs.insert(5, "{not json")
  (tmp_path / "bad.jsonl").write_text("\n".join(docs) + "\n")
  cfg = load_config(TINY, overrides(tmp_path / "run", f"--config.data.path={tmp_path / 'bad.jsonl'}",
                                    "--config.data.skip_malformed=true", "--config.train.steps=2",
                                    "--config.data.eval_fraction=0", "--config.train.eval_every=0",
                                    "--config.data.shuffle=false"))
  train(cfg, stream=io.StringIO())
  rows = _rows(tmp_path / "run")
  assert rows[-1]["data/skipped_malformed"] == 1.0, rows[-1]


def test_eval_metrics_at_eval_every_and_at_the_end(run):
  rows = _eval_rows(run.out_dir)
  assert sorted(rows) == [3, 6, 7]
  for s, r in rows.items():
    assert r["eval/perplexity"] == pytest.approx(math.exp(r["eval/loss"]), rel=1e-12)
    assert 0.0 <= r["eval/accuracy"] <= 1.0
    assert r["loss"] == run.losses[s]  # the step's own line carries its evaluation
  assert len({r["eval/tokens"] for r in rows.values()}) == 1  # the same batches every time
  assert rows[3]["eval/tokens"] > 0.9 * 2 * 8 * 32  # 2 batches of 8 x 32 packed tokens, few not counted
  losses = [rows[s]["eval/loss"] for s in (3, 6, 7)]
  assert losses[0] > losses[1] > losses[2], losses
  # ... and in the printed line of those steps
  lines = {int(m.group(1)): line for line in run.text.splitlines() if (m := re.match(r"step (\d+)/7 ", line))}
  for s, r in rows.items():
    assert f"eval loss {r['eval/loss']:.3f} ppl {r['eval/perplexity']:.1f}" in lines[s], lines[s]
  assert "eval" not in lines[2] and "eval" not in lines[4]
  assert re.search(r" load \d+\.\d\d ", lines[2]), lines[2]  # the expert load, max / mean


def test_final_eval_loss_equals_a_float64_recomputation(run):
  """The logged eval loss at the end is the token-weighted mean cross-entropy of the final params over the
  fixed eval batches, recomputed from the model's logits in float64 numpy."""
  cfg = load_config(TINY, overrides(run.out_dir))
  tok = pipeline.build_tokenizer(cfg)
  ds = pipeline.make_eval_dataset(cfg, tok)
  params = jax.device_get(run.state["params"])
  ce, correct, n = 0.0, 0.0, 0.0
  it = iter(ds)
  for _ in range(cfg.train.eval_batches):
    b = next(it)
    logits = np.asarray(model.forward(cfg, params, b["inputs"], positions=b["positions"],
                                      segment_ids=b["segment_ids"]), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    tgt = np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
    w = b["loss_mask"].astype(np.float64)
    ce += float(((lse - tgt) * w).sum())
    correct += float(((logits.argmax(-1) == b["targets"]) * w).sum())
    n += float(w.sum())
  row = _eval_rows(run.out_dir)[STEPS]
  assert row["eval/tokens"] == n
  assert row["eval/loss"] == pytest.approx(ce / n, rel=2e-5)
  assert row["eval/accuracy"] == pytest.approx(correct / n, abs=1.5 / n)  # a near-tie argmax may flip


@pytest.mark.slow  # a faster test in the fast loop covers the same behaviour
def test_eval_is_identical_across_resume(run, tmp_path):
  cfg = load_config(TINY, overrides(tmp_path))
  first = train(cfg, stop_after=4, stream=io.StringIO())
  assert first.interrupted and sorted(first.losses) == [1, 2, 3, 4]
  second = train(cfg, stream=io.StringIO())
  assert sorted(second.losses) == [5, 6, 7]
  assert {**first.losses, **second.losses} == run.losses
  got, want = _eval_rows(tmp_path), _eval_rows(run.out_dir)
  assert sorted(got) == [3, 6, 7]
  for s in got:
    for k in ("eval/loss", "eval/accuracy", "eval/tokens"):
      assert got[s][k] == want[s][k], (s, k)  # bitwise: the same batches, the same params


# ------------------------------------------------------------------------------- (d) a finished run


def test_rerunning_a_finished_run_says_complete_once_and_does_nothing(run, capsys):
  before = _rows(run.out_dir)
  cfg = load_config(TINY, overrides(run.out_dir, "--config.train.sample_prompt=def "))
  stream = io.StringIO()
  r = train(cfg, stream=stream)
  text = stream.getvalue()
  want = f"run complete: step {STEPS}/{STEPS} in {run.out_dir / 'checkpoints'}; raise train.steps to train further"
  assert text.splitlines() == [want]
  assert r.sample is None and r.losses == {} and r.step == STEPS and not r.interrupted
  assert _rows(run.out_dir) == before
  assert sorted(os.listdir(run.out_dir / "checkpoints")) == ["3", "6", "7"]
  capsys.readouterr()
  main(cfg)  # `joyjax train`: not even the config
  assert capsys.readouterr().out == want + "\n"


def test_data_error_comes_before_any_output(tmp_path, capsys):
  cfg = load_config(TINY, overrides(tmp_path, f"--config.data.path={tmp_path / 'missing.jsonl'}"))
  with pytest.raises(DataError, match="missing.jsonl"):
    main(cfg)
  assert capsys.readouterr().out == ""


def test_eval_every_without_eval_data_is_a_config_error(tmp_path, capsys):
  """Checked eagerly, when the config loads: before any data, mesh or compilation."""
  with pytest.raises(ConfigError, match="train.eval_every"):
    load_config(TINY, overrides(tmp_path, "--config.data.eval_fraction=0.0"))
  with pytest.raises(ConfigError, match="not both"):
    load_config(TINY, overrides(tmp_path, f"--config.data.eval_path={tmp_path / 'e.jsonl'}"))
  with pytest.raises(ConfigError, match="train.eval_batches"):
    load_config(TINY, overrides(tmp_path, "--config.train.eval_batches=0"))
  with pytest.raises(ConfigError, match=r"data.eval_fraction.*\[0, 1\)"):
    load_config(TINY, overrides(tmp_path, "--config.data.eval_fraction=1.0"))
  assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------- (b) the held-out split


N_DOCS = 300
MARK = re.compile(r"DOC(\d{4})Z")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """300 documents of varied length, each with a marker DOC<i>Z at its start and end, and a tokenizer."""
  d = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "omega", "lambda", "x", "yield", "def", "return"]
  with open(d / "docs.jsonl", "w") as f:
    for i in range(N_DOCS):
      body = " ".join(rng.choice(words, size=int(rng.integers(5, 60))))
      f.write(json.dumps({"text": f"DOC{i:04d}Z {body} DOC{i:04d}Z"}) + "\n")
  tok = pipeline.build_tokenizer(load_config(TINY, [f"--config.data.cache_dir={DATA_CACHE}",
                                                    "--config.data.tokenizer_vocab_size=1024"]))
  return str(d / "docs.jsonl"), tok


def _cfg(path, *extra):
  """Two epochs (the first read whole; the last partial batch is dropped); no split unless ``extra`` asks."""
  return load_config(TINY, [f"--config.data.path={path}", "--config.data.seq_len=32",
                            "--config.train.batch_size=8", "--config.data.num_epochs=2",
                            "--config.data.eval_fraction=0.0", "--config.train.eval_every=0", *extra])


def _markers(batches, tok):
  """The document markers in a stream of batches, in order. A split document continues in the next row from
  the last token of the previous one, so the rows' inputs concatenated are the token stream (less the EOS or
  padding a row may end with)."""
  toks = []
  for b in batches:
    toks.extend(int(t) for t in b["inputs"][b["segment_ids"] != 0])
  return [int(m) for m in MARK.findall(tok.decode(toks, skip_special_tokens=True))]


def _epochs(cfg, tok, **kw):
  return _markers(list(pipeline.make_iterator(cfg, tok, **kw)), tok)


def test_held_out_documents_never_reach_training(corpus):
  path, tok = corpus
  held = set(pipeline.HeldOut(0.05).indices(N_DOCS).tolist())
  assert 5 <= len(held) <= 30  # about 5% of 300
  everything = _epochs(_cfg(path), tok)
  assert sorted(set(everything)) == list(range(N_DOCS))  # the check can see every document
  cfg = _cfg(path, "--config.data.eval_fraction=0.05")
  trained = _epochs(cfg, tok)
  assert not held & set(trained)
  assert sorted(set(trained)) == sorted(set(range(N_DOCS)) - held)
  # the other documents keep their order: the same stream with the held-out ones cut out
  without = [i for i in everything if i not in held]
  k = min(len(trained), len(without))  # (the streams' last partial batches are dropped)
  assert k > 4 * (N_DOCS - len(held)) - 60 and trained[:k] == without[:k]
  # evaluation reads exactly the held-out documents, in index order, and the same batches every time
  ds = pipeline.make_eval_dataset(cfg, tok)
  one, two = list(_take(ds, 12)), list(_take(ds, 12))
  for a, b in zip(one, two):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  seen = _markers(one, tok)
  assert set(seen) == held and seen[:2 * len(held)] == [i for i in sorted(held) for _ in (0, 1)]


def _take(ds, n):
  it = iter(ds)
  for _ in range(n):
    yield next(it)


def test_split_is_the_same_across_seeds_processes_and_resume(corpus):
  path, tok = corpus
  held = set(pipeline.HeldOut(0.05).indices(N_DOCS).tolist())
  # another data order: the same documents held out
  assert not held & set(_epochs(_cfg(path, "--config.data.eval_fraction=0.05", "--config.data.seed=7"), tok))
  # two processes: each trains on its share of the rest and evaluates on its share of the held-out documents
  cfg = _cfg(path, "--config.data.eval_fraction=0.05")
  parts = [set(_epochs(cfg, tok, process_index=i, process_count=2)) for i in range(2)]
  assert not parts[0] & parts[1] and parts[0] | parts[1] == set(range(N_DOCS)) - held
  evals = [set(_markers(_take(pipeline.make_eval_dataset(cfg, tok, process_index=i, process_count=2), 16), tok))
           for i in range(2)]
  assert not evals[0] & evals[1] and evals[0] | evals[1] == held
  # resume mid-epoch: the restored iterator continues the same stream (still without held-out documents)
  it = pipeline.make_iterator(cfg, tok)
  head = [next(it) for _ in range(3)]
  state = it.get_state()
  assert state["layout"]["eval_fraction"] == 0.05
  rest = list(it)
  again = pipeline.make_iterator(cfg, tok)
  again.set_state(state)
  resumed = list(again)
  assert len(resumed) == len(rest)
  for a, b in zip(rest, resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert _markers(head + resumed, tok) == _epochs(cfg, tok)
  # a state saved without the held-out split cannot resume with it (the training documents differ)
  plain = pipeline.make_iterator(_cfg(path), tok)
  with pytest.raises(DataError, match="eval_fraction"):
    plain.set_state(state)
  assert "eval_fraction" not in plain.get_state()["layout"]  # old checkpoints' states stay valid


def test_held_out_is_a_pure_function_of_the_index():
  h = pipeline.HeldOut(0.1)
  idx = h.indices(50_000)
  assert 0.09 < len(idx) / 50_000 < 0.11
  assert h.indices(1000).tolist() == [i for i in idx.tolist() if i < 1000]  # a prefix of a larger corpus
  assert all(h.contains(i) for i in idx[:50])
  assert not any(h.contains(i) for i in set(range(200)) - set(idx.tolist()))
  with pytest.raises(ConfigError, match="eval_fraction"):
    pipeline.HeldOut(1.5)
