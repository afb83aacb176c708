"""``joyjax chat`` (joyjax/train/chat.py and the CLI's ``chat``): the conversation a session renders is the chat
format's (expected texts spelled out from the format's markers), replies stream without splitting characters,
greedy replies are the batch sampler's greedy continuation of the same rendered prompt, Ctrl-C keeps what was
shown, ``--prompt`` answers once and exits 0, a terminal session (pty) and piped input work, and user errors
are one line.

The model is the tiny architecture from ``model.init`` (the chat tokenizer's vocabulary, a sharpened head so
greedy decisions do not hinge on float noise), saved as a params checkpoint with its config and tokenizer, as
``joyjax convert`` writes one.
"""

import io
import os
import pty
import select
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tokenizers

import chat_data as cd
from conftest import REPO_ROOT, tiny_config
from joyjax import cli, model, quant
from joyjax.data import chat as chat_format
from joyjax.data.tokenizer import Tokenizer
from joyjax.errors import ConfigError
from joyjax.rl.sampler import Sampler, left_pad
from joyjax.train import chat, checkpoint, sample

SYSTEM = "Answer briefly."
Q1, Q2, Q3 = "What is 2 + 3?", "Repeat the word apple 2 times.", "What is 1 + 1?"
BOS, EOS = "<|bos|>", "<|eos|>"  # the chat tokenizer's (joyjax's trained BPE)
U, A, T, ET = "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"
MAX_TOKENS = 8
CONTEXT = 256  # model.max_position_embeddings of the checkpoint


@pytest.fixture(scope="module")
def tok():
  return cd.chat_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
  cfg = tiny_config({"model.vocab_size": tok.vocab_size, "model.max_position_embeddings": CONTEXT})
  params = jax.jit(lambda k: model.init(cfg, k))(jax.random.key(3))
  params = jax.tree.map(np.asarray, dict(params, lm_head={"kernel": params["lm_head"]["kernel"] * 20.0}))
  path = tmp_path_factory.mktemp("chat") / "ckpt"
  checkpoint.save_params(path, params, config=cfg.to_dict())
  checkpoint.save_tokenizer(path, tok)
  return str(path)


@pytest.fixture(scope="module")
def session(ckpt):
  return chat.open_session(ckpt, system=SYSTEM, decoding=chat.Decoding(max_tokens=MAX_TOKENS))


def scripted(tok, replies):
  """A stand-in for the model: turn ``i`` produces ``replies[i]`` then EOS, one token per chunk."""
  calls = []

  def chunks(ids, budget, key):
    calls.append(list(ids))
    for t in tok.encode(replies[len(calls) - 1]) + [tok.eos_id]:
      yield [t]
  return chunks, calls


def ids_of(tok, text):
  return tok.hf.encode(text, add_special_tokens=False).ids


def test_history_renders_as_the_chat_format(monkeypatch, tok, ckpt):
  """Three turns through the REPL: thinking on, then off, then on again. Each turn's prompt is the format's
  text for the conversation so far: earlier reasoning kept in thinking mode, dropped in non-thinking mode."""
  s = chat.open_session(ckpt, system=SYSTEM)
  r1, r2, r3 = "2 + 3 = 5.</think>The answer is 5.", "apple apple", "1 + 1 = 2.</think>The answer is 2."
  chunks, calls = scripted(tok, [r1, r2, r3])
  monkeypatch.setattr(s, "_token_chunks", chunks)
  out, err = io.StringIO(), io.StringIO()
  script = f"/think\n{Q1}\n/no_think\n{Q2}\n/think {Q3}\n"
  assert chat.repl(s, stdin=io.StringIO(script), stdout=out, stderr=err, interactive=False) == 0
  assert err.getvalue() == ""
  assert out.getvalue() == f"{T}{r1}\n{r2}\n{T}{r3}\n"  # EOS ends a reply and is not shown
  assert not s.thinking  # "/think TEXT" answered one turn in thinking mode without changing the default

  turn1 = BOS + SYSTEM + U + Q1 + A + T
  turn2 = BOS + SYSTEM + U + Q1 + A + T + ET + "The answer is 5." + EOS + U + Q2 + A + T + ET
  turn3 = (BOS + SYSTEM + U + Q1 + A + T + "2 + 3 = 5." + ET + "The answer is 5." + EOS + U + Q2 + A + T + ET
           + "apple apple" + EOS + U + Q3 + A + T)
  assert calls == [ids_of(tok, turn1), ids_of(tok, turn2), ids_of(tok, turn3)]
  messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
              {"role": "assistant", "reasoning_content": "2 + 3 = 5.", "content": "The answer is 5."},
              {"role": "user", "content": Q2}]
  assert calls[1] == chat_format.render_prompt(messages, tok, thinking=False)
  assert s.history == messages + [{"role": "assistant", "content": "apple apple"}, {"role": "user", "content": Q3},
                                  {"role": "assistant", "reasoning_content": "1 + 1 = 2.",
                                   "content": "The answer is 2."}]
  s.reset()
  assert s.history == [{"role": "system", "content": SYSTEM}]


def test_stream_never_splits_a_character(tok):
  text = "café 数据 ok"
  ids = tok.encode(text)
  stream = chat.TextStream(tok)
  pieces = [stream.push([i]) for i in ids] + [stream.finish()]
  assert "".join(pieces) == text
  assert all("\ufffd" not in p for p in pieces)
  assert len([p for p in pieces if p]) > 3  # it did stream


class CountingDecoder:
  """A tokenizer stand-in for TextStream that counts the ids it is asked to decode."""

  def __init__(self, tok):
    self.tok, self.decoded = tok, 0

  def decode(self, ids):
    self.decoded += len(ids)
    return self.tok.decode(ids)


def stream_one_by_one(tok, ids):
  stream = chat.TextStream(tok)
  pieces = [stream.push([i]) for i in ids]
  return pieces, stream.finish()


LONG_REPLY = "".join(f"Step {k}: café 数据 😀 costs {k * 7} ok.\n" for k in range(60))


def test_a_long_reply_streams_its_whole_decode_in_linear_time(tok):
  ids = tok.encode(LONG_REPLY)
  assert any("\ufffd" in tok.decode([i]) for i in ids)  # characters split across (and merged into) tokens
  counting = CountingDecoder(tok)
  pieces, tail = stream_one_by_one(counting, ids)
  assert "".join(pieces) + tail == tok.decode(ids) == LONG_REPLY
  assert tail == "" and all("\ufffd" not in p for p in pieces)
  assert len([p for p in pieces if p]) > len(ids) // 2
  # Each push decodes a window of a few tokens: linear in the reply (decoding it whole each time: ~n^2 / 2 ids).
  assert len(ids) > 1000 and counting.decoded < 20 * len(ids)


def test_a_reply_that_ends_inside_a_character_shows_it_at_the_end(tok):
  ids = tok.encode("ok 数")[:-1]  # the last character's final byte never comes
  pieces, tail = stream_one_by_one(tok, ids)
  assert "".join(pieces) + tail == tok.decode(ids) and tail.endswith("\ufffd")
  assert "".join(pieces).startswith("ok") and all("\ufffd" not in p for p in pieces)


def sentencepiece_style_tokenizer():
  """A Llama-style tokenizer: spaces as U+2581, byte fallback for characters outside the (single-character)
  vocabulary, and a decoder that strips the decode's first space."""
  vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
  for c in "\u2581abcdefghijklmnopqrstuvwxyzSTEP0123456789:.,":
    vocab.setdefault(c, len(vocab))
  hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
  hf.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.Prepend("\u2581"),
                                                   tokenizers.normalizers.Replace(" ", "\u2581")])
  d = tokenizers.decoders
  hf.decoder = d.Sequence([d.Replace("\u2581", " "), d.ByteFallback(), d.Fuse(), d.Strip(" ", 1, 0)])
  return Tokenizer(hf, bos_id=None, eos_id=None, pad_id=None)


def test_a_sentencepiece_style_reply_streams_its_whole_decode():
  sp = sentencepiece_style_tokenizer()
  text = "Step 1: café  数据 ok." * 5
  ids = sp.encode(text)
  assert sp.decode(ids) == text and any(sp.decode([i]) == "\ufffd" for i in ids)  # byte-fallback pieces
  pieces, tail = stream_one_by_one(sp, ids)
  assert "".join(pieces) + tail == text and tail == ""
  assert all("\ufffd" not in p for p in pieces)


def test_ctrl_c_stops_a_reply_and_keeps_what_was_shown(monkeypatch, tok, ckpt):
  s = chat.open_session(ckpt)

  def chunks(ids, budget, key):
    yield tok.encode("The answer")
    raise KeyboardInterrupt  # as if Ctrl-C arrived while the next token was computed
  monkeypatch.setattr(s, "_token_chunks", chunks)
  out = io.StringIO()
  assert chat.repl(s, stdin=io.StringIO(f"{Q1}\n/exit\nnot read\n"), stdout=out, stderr=io.StringIO(),
                   interactive=False) == 0
  assert out.getvalue() == "The answer [stopped]\n"
  assert s.history == [{"role": "user", "content": Q1}, {"role": "assistant", "content": "The answer"}]


def test_greedy_replies_are_the_batch_samplers_and_render_as_the_format(session, tok):
  """Two real turns (thinking, then not): each reply is the batch sampler's greedy continuation of the format's
  rendering of the conversation (the first reply as the history keeps it). The session streams with MTP
  speculation; the reference decodes both prompts without it, as one batch of two rows padded to another length
  than the session's."""
  session.reset()
  assert session.draft_tokens == chat.DEFAULT_DRAFT_TOKENS  # the tiny model has an MTP module: speculation on
  out1, out2 = io.StringIO(), io.StringIO()
  chunks, token_chunks = [], session._token_chunks
  session._token_chunks = lambda *a: (chunks.append(c) or c for c in token_chunks(*a))
  try:
    chat.say_reply(session, Q1, True, out1)
    chat.say_reply(session, Q2, False, out2)
  finally:
    del session._token_chunks
  # streamed: the prefill's token, then each step's 1 .. k + 1 tokens
  assert len(chunks) >= 3 and all(1 <= len(c) <= session.draft_tokens + 1 for c in chunks)
  assert out1.getvalue().startswith(T) and out1.getvalue().endswith("\n") and out2.getvalue().endswith("\n")
  reply1, reply2 = out1.getvalue()[len(T):-1], out2.getvalue()[:-1]
  messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1}]
  prompt1 = chat_format.render_prompt(messages, tok, thinking=True)
  messages += [chat_format.parse(A + T + reply1, tok)[0], {"role": "user", "content": Q2}]
  prompt2 = chat_format.render_prompt(messages, tok, thinking=False)
  assert prompt2[:len(prompt1) - 1] == prompt1[:-1] and len(prompt2) < chat.MIN_PROMPT_BUCKET

  p = len(prompt2)
  tokens, lens = left_pad([prompt1, prompt2], p, tok.pad_id)
  ref = Sampler(session.cfg, max_prompt_len=p, max_new_tokens=MAX_TOKENS)(
      session.params, tokens, lens, jax.random.key(0), temperature=0.0, stop_ids=(tok.eos_id,)).fetch()
  new = [row[p:p + n].tolist() for row, n in zip(ref.tokens, ref.lengths)]
  new = [t[:-1] if t and t[-1] == tok.eos_id else t for t in new]
  assert new[0] and new[1]
  assert [tok.decode(t) for t in new] == [reply1, reply2]
  kept = [m for m in messages if m.get("content") or m.get("reasoning_content")]
  assert session.history[:len(kept)] == kept


def test_sampled_replies_follow_the_seed(session):
  """Temperature / top-p sampling through the same compiled stream (settings are traced): a seed reproduces its
  reply, and different seeds give different replies."""
  def answer(seed):
    session.reset()
    session.decoding = chat.Decoding(temperature=1.0, top_p=0.95, max_tokens=MAX_TOKENS, seed=seed)
    try:
      return "".join(session.reply(Q1, False))
    finally:
      session.decoding = chat.Decoding(max_tokens=MAX_TOKENS)
  first = answer(1)
  assert answer(1) == first
  assert len({first, answer(2), answer(3)}) > 1


def test_draft_tokens_default_and_refusal():
  with_mtp, without = tiny_config(), tiny_config({"model.mtp.num_layers": 0})
  assert chat.draft_tokens_for(with_mtp, None) == chat.DEFAULT_DRAFT_TOKENS
  assert chat.draft_tokens_for(with_mtp, 0) == 0 and chat.draft_tokens_for(with_mtp, 2) == 2
  assert chat.draft_tokens_for(without, None) == 0 and chat.draft_tokens_for(without, 0) == 0
  with pytest.raises(ConfigError, match="--draft-tokens 2: .* has none"):
    chat.draft_tokens_for(without, 2)


def test_a_conversation_over_the_context_is_a_data_error(session):
  err, out = io.StringIO(), io.StringIO()
  long = " ".join(["apple"] * CONTEXT)
  session.reset()
  chat.repl(session, stdin=io.StringIO(f"/think {long}\n"), stdout=out, stderr=err, interactive=False)
  assert out.getvalue() == "" and session.history == [{"role": "system", "content": SYSTEM}]
  line = err.getvalue()
  assert line.count("\n") == 1 and line.startswith("joyjax chat: data error: the conversation is ")
  assert f"is {CONTEXT}" in line and "/reset" in line


def test_cli_errors_are_one_line(ckpt, tmp_path):
  missing = tmp_path / "nonexistent"
  with pytest.raises(SystemExit) as e:
    cli.main(["chat", "--checkpoint", str(missing), "--prompt", "hi"])
  assert str(e.value.code).startswith(f"joyjax chat: checkpoint error: {missing} does not exist")
  bare = tmp_path / "no_tokenizer"
  shutil.copytree(ckpt, bare)
  os.remove(bare / checkpoint.TOKENIZER_FILE)
  with pytest.raises(SystemExit) as e:
    cli.main(["chat", "--checkpoint", str(bare), "--prompt", "hi"])
  assert str(e.value.code).startswith(f"joyjax chat: checkpoint error: {bare} holds no tokenizer.json")
  with pytest.raises(SystemExit) as e:
    cli.main(["chat", "--checkpoint", ckpt, "--prompt", " ".join(["apple"] * CONTEXT)])
  assert str(e.value.code).startswith("joyjax chat: data error: the conversation is ")


def _env():
  env = dict(os.environ)
  env.pop("JOYJAX_DEBUG", None)
  env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def _expected(ckpt, lines, **kw):
  s = chat.open_session(ckpt, decoding=chat.Decoding(max_tokens=MAX_TOKENS), **kw)
  out = io.StringIO()
  chat.repl(s, stdin=io.StringIO("".join(x + "\n" for x in lines)), stdout=out, stderr=io.StringIO(),
            interactive=False)
  return out.getvalue()


def test_one_shot_prompt_prints_the_reply(ckpt, capsys):
  cli.main(["chat", "--checkpoint", ckpt, "--prompt", Q1, "--think", "--system", SYSTEM, "--max-tokens",
            str(MAX_TOKENS)])
  got = capsys.readouterr().out
  assert got == _expected(ckpt, [Q1], system=SYSTEM, thinking=True)
  assert got.startswith(T) and len(got) > len(T) + 1


@pytest.mark.slow  # test_one_shot_prompt_prints_the_reply runs the same command in-process
def test_one_shot_prompt_exits_0(ckpt):
  """The command as a script runs it, without speculation: the speculative in-process session's reply."""
  r = subprocess.run([sys.executable, "-m", "joyjax.cli", "chat", "--checkpoint", ckpt, "--prompt", Q1, "--think",
                      "--system", SYSTEM, "--max-tokens", str(MAX_TOKENS), "--draft-tokens", "0"], env=_env(),
                     capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout == _expected(ckpt, [Q1], system=SYSTEM, thinking=True)


def test_missing_checkpoint_is_one_line_from_the_command(tmp_path):
  missing = tmp_path / "nonexistent"
  r = subprocess.run([sys.executable, "-m", "joyjax.cli", "chat", "--checkpoint", str(missing)], env=_env(),
                     capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
  assert r.returncode == 1
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"joyjax chat: checkpoint error: {missing} does not exist")
  assert "Traceback" not in r.stderr


@pytest.mark.slow  # the REPL on StringIO (test_greedy_replies_...) covers the same turns in-process
def test_piped_stdin_turns_then_eof(ckpt):
  lines = ["/think", Q1, "/no_think", Q2]
  r = subprocess.run([sys.executable, "-m", "joyjax.cli", "chat", "--checkpoint", ckpt, "--max-tokens",
                      str(MAX_TOKENS)], input="".join(x + "\n" for x in lines), env=_env(), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout == _expected(ckpt, lines)


def _read_until(fd, marker: bytes, buf: bytearray, timeout: float = 240) -> bytes:
  """Reads the pty into ``buf`` until ``marker`` follows what was consumed; returns the text before it."""
  end = time.time() + timeout
  while marker not in buf:
    left = end - time.time()
    assert left > 0, f"no {marker!r} in {bytes(buf)[-2000:]!r}"
    ready, _, _ = select.select([fd], [], [], left)
    if ready:
      try:
        data = os.read(fd, 4096)
      except OSError:  # the child closed the terminal
        data = b""
      assert data, f"terminal closed before {marker!r}: {bytes(buf)[-2000:]!r}"
      buf += data
  i = buf.index(marker)
  head = bytes(buf[:i])
  del buf[:i + len(marker)]
  return head


@pytest.mark.slow  # a subprocess on a pseudo-terminal; the in-process REPL tests cover the same turns
def test_terminal_session_two_turns_thinking_then_not(ckpt):
  """``joyjax chat`` on a pseudo-terminal: the banner and "> " prompt, /think, a turn, /no_think, a turn,
  Ctrl-D; the replies are those of an in-process session given the same lines."""
  fd, child = pty.openpty()
  proc = subprocess.Popen([sys.executable, "-m", "joyjax.cli", "chat", "--checkpoint", ckpt, "--max-tokens",
                           str(MAX_TOKENS)], stdin=child, stdout=child, stderr=child, env=_env(),
                          start_new_session=True)
  os.close(child)
  buf = bytearray()
  try:
    banner = _read_until(fd, b"\r\n> ", buf)  # (a reply of this random model may hold "> ")
    assert b"thinking off" in banner and b"/no_think" in banner
    replies = []
    for line in ("/think", Q1, "/no_think", Q2):
      os.write(fd, line.encode() + b"\n")
      said = _read_until(fd, b"\r\n> ", buf).decode().replace("\r\n", "\n")
      echo, _, reply = said.partition("\n")
      assert echo == line, said
      if not line.startswith("/"):
        replies.append(reply + "\n")
    os.write(fd, b"\x04")  # Ctrl-D
    assert proc.wait(timeout=60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    os.close(fd)
  assert "".join(replies) == _expected(ckpt, ["/think", Q1, "/no_think", Q2])


def test_a_qat_checkpoint_answers_with_its_quantized_weights(tmp_path, tok):
  """A model trained with QAT (quant.format set) is sampled and chatted with as served: its selected weights
  quantized exactly as QAT and the exporter quantize them; the float model's weights are left alone."""
  cfg = tiny_config({"model.vocab_size": tok.vocab_size, "quant.format": "int4", "quant.group_size": 16})
  params = jax.tree.map(np.asarray, jax.jit(lambda k: model.init(cfg, k))(jax.random.key(0)))
  checkpoint.save_params(tmp_path / "q", params, config=cfg.to_dict())
  loaded = sample.load_checkpoint(tmp_path / "q")
  want = jax.jit(lambda p: quant.fake_quantize_params(cfg, p))(params)
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  kv_b = loaded.params["moe_layers"]["attn"]["kv_b"]
  assert not np.array_equal(kv_b, params["moe_layers"]["attn"]["kv_b"])
  np.testing.assert_array_equal(loaded.params["embed"]["embedding"], params["embed"]["embedding"])
