"""``joyjax chat``: talk to a checkpoint through the chat format, one streamed reply at a time.

``ChatSession`` holds a conversation (``history``: chat-format messages, the system prompt first) and answers a
user turn with ``reply(text, think)``: the conversation plus the new turn is rendered by ``joyjax.data.chat``
(``render_prompt``: the same text and ids training saw, ending with the assistant opening of the chosen mode),
the model continues it through the rollout sampler's stream (``joyjax.rl.sampler.Sampler.stream``: the jitted
prefill, then one jitted decode step per call) until the tokenizer's EOS (the format's end of turn) or
``max_tokens``, and the reply comes back as text pieces while it is decoded. Pieces are the new suffix of the
decoded token stream, held back while it ends inside a multi-byte character, so a character is never split
between two pieces. Where the model has an MTP module, each step is speculative by default
(``DEFAULT_DRAFT_TOKENS`` drafts, verified in one pass: greedy replies are unchanged, sampled ones keep their
distribution); ``draft_tokens=0`` decodes one token per step. Prompts are left-padded to a few lengths (powers
of two), so a conversation compiles a few shapes, not one per turn.

History: the reply is read back with the chat format's ``parse`` (``{reasoning}</think>{content}`` in
thinking mode) and kept whole, reasoning included. Rendering decides what the model sees, exactly as in
training: the built-in format keeps earlier turns' reasoning in thinking mode and drops every turn's
reasoning in non-thinking mode (a Jinja template, e.g. DeepSeek-V3.1's, applies its own rule). A reply
stopped early (Ctrl-C, ``max_tokens``) is kept as far as it went; an empty one is not kept (the format has no
empty assistant turn), its user turn is. Control tokens a random or undertrained model may emit (BOS, pad,
markers) are removed from the kept text, which the format would otherwise refuse.

The REPL (``repl``) reads one user turn per line from any text stream (a terminal, a pipe, ``io.StringIO``)
and understands these commands:

* ``/think`` / ``/no_think``: thinking on / off for the following turns; ``/think TEXT`` / ``/no_think TEXT``
  answers TEXT in that mode without changing the default.
* ``/system TEXT``: the system prompt (the format puts it first, so it applies to the whole conversation);
  ``/system`` alone removes it.
* ``/reset``: forget the conversation (the system prompt stays). ``/exit`` (or ``/quit``, Ctrl-D, end of
  input): leave. ``/help``: this list.

Ctrl-C during a reply stops it and returns to the prompt. In thinking mode the printed reply starts with the
``<think>`` the prompt opened, so the reasoning reads as a bracketed block.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Iterator, Sequence, TextIO

import jax

from joyjax.data import chat as chat_format
from joyjax.data.tokenizer import Tokenizer, check_vocab_fits, load_tokenizer, stop_ids
from joyjax.errors import CheckpointError, ConfigError, DataError
from joyjax.rl.sampler import Sampler, left_pad
from joyjax.train import checkpoint, sample

MIN_PROMPT_BUCKET = 64  # prompts are left-padded to a power of two at least this long: few compiled shapes
DEFAULT_DRAFT_TOKENS = 3  # JoyAI-LLM Flash serves its MTP layer with 3 draft tokens (mean acceptance length ~2.2)
REPL_HELP = ("commands: /think, /no_think (mode for the next turns; '/think TEXT' for one turn), /system TEXT, "
             "/reset, /exit, /help")


@dataclasses.dataclass
class Decoding:
  """How a reply is generated: ``temperature`` 0 = greedy; ``top_p`` 1 and ``top_k`` 0 = off; ``max_tokens``
  per reply (fewer when the context runs out); ``seed`` of the sampling keys (turn ``i`` of a conversation uses
  ``fold_in(key(seed), i)``)."""
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  max_tokens: int = 512
  seed: int = 0


class TextStream:
  """Token ids in, printable text out: ``push(ids)`` returns the text the new ids add, keeping back a tail
  that decodes to U+FFFD (a multi-byte character whose bytes have not all arrived).

  Incremental: each push decodes only a window of the ids, from the first token of the last printed piece
  (``_prefix``) to the end, and prints what the window's decode adds to that of its printed part
  (``ids[_prefix:_read]``). The window moves on after each printed piece, so a reply costs time linear in its
  length, not quadratic. A window starts where an earlier decode ended on a whole character, so byte-level
  tokenizers print exactly the whole decode; the printed tokens leading the window give the new ones their
  context, so decoders that treat the first token of a decode specially (SentencePiece's stripped leading space)
  print it too. A window that ends inside a character, or whose decode rewrites its printed part, prints nothing
  until more ids arrive."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self._prefix = 0  # the window's first id: ids before it are printed and never decoded again
    self._read = 0  # ids[:_read] are printed
    self._pieces: list[str] = []  # what push / finish returned, in order

  @property
  def shown(self) -> str:
    """The text printed so far."""
    return "".join(self._pieces)

  def push(self, ids: Sequence[int]) -> str:
    self.ids.extend(int(i) for i in ids)
    window = self.ids[self._prefix:]
    printed = self.tokenizer.decode(window[:self._read - self._prefix])
    text = self.tokenizer.decode(window)
    if text.endswith("\ufffd") or not text.startswith(printed) or len(text) == len(printed):
      return ""
    piece = text[len(printed):]
    self._prefix, self._read = self._read, len(self.ids)
    self._pieces.append(piece)
    return piece

  def text(self) -> str:
    """Everything decoded so far (an unfinished character included)."""
    return self.tokenizer.decode(self.ids)

  def finish(self) -> str:
    """The text held back so far, as decoded (the stream ended inside a character: shown as U+FFFD): the rest of
    the whole reply's decode after what was printed (one decode of the reply)."""
    text, shown = self.text(), self.shown
    piece = text[len(shown):] if text.startswith(shown) else ""
    if piece:
      self._pieces.append(piece)
    self._prefix = self._read = len(self.ids)
    return piece


def draft_tokens_for(cfg, requested: int | None) -> int:
  """Draft tokens per decode step: ``requested``, or by default ``DEFAULT_DRAFT_TOKENS`` where the model has an
  MTP module (``model.mtp.num_layers`` > 0) and 0 where it has none. ConfigError when drafting is asked of a
  model without one."""
  has_mtp = int(cfg.model.mtp.num_layers) > 0
  if requested is None:
    return DEFAULT_DRAFT_TOKENS if has_mtp else 0
  if requested < 0 or (requested > 0 and not has_mtp):
    raise ConfigError(f"--draft-tokens {requested}: MTP speculative decoding drafts with the model's MTP module "
                      "and this checkpoint has none (model.mtp.num_layers = 0); use --draft-tokens 0")
  return int(requested)


class ChatSession:
  """A conversation with a model: ``history`` (messages), ``render_prompt(think)`` (the ids a reply would
  continue), ``reply(text, think)`` (the next assistant turn, streamed as text pieces; see the module
  docstring)."""

  def __init__(self, cfg, params, tokenizer: Tokenizer, *, template=None, system: str = "", thinking: bool = False,
               decoding: Decoding | None = None, draft_tokens: int | None = None):
    self.cfg, self.params, self.tokenizer, self.template = cfg, params, tokenizer, template
    self.thinking = thinking
    self.decoding = decoding or Decoding()
    self.draft_tokens = draft_tokens_for(cfg, draft_tokens)
    self.history: list[dict] = []
    self.turns = 0
    self.stop_ids = stop_ids(tokenizer)
    self._samplers: dict[tuple[int, int], Sampler] = {}
    bos, eos = chat_format.bos_eos(tokenizer, template)
    self._control = chat_format.control_pattern(tokenizer, bos, eos)
    self.set_system(system)

  # ---------------------------------------------------------------------------------------- conversation

  @property
  def system(self) -> str:
    return self.history[0]["content"] if self.history and self.history[0]["role"] == "system" else ""

  def set_system(self, text: str) -> None:
    """Sets (or, with "", removes) the system prompt: the first message, whatever the conversation holds."""
    rest = self.history[1:] if self.system else self.history
    self.history = ([{"role": "system", "content": text}] if text else []) + rest

  def reset(self) -> None:
    """Forgets the conversation (the system prompt stays) and starts the sampling keys over: a seed gives a new
    conversation the replies it gave the first."""
    self.history = self.history[:1] if self.system else []
    self.turns = 0

  def render_prompt(self, think: bool | None = None, user: str | None = None) -> list[int]:
    """The ids generation continues from: the history (plus a user turn ``user``), rendered by the chat
    format in the given mode (default: the session's) and ending with the assistant opening."""
    think = self.thinking if think is None else think
    messages = self.history + ([{"role": "user", "content": user}] if user is not None else [])
    return chat_format.render_prompt(messages, self.tokenizer, thinking=think, template=self.template)

  # ------------------------------------------------------------------------------------------- replies

  def reply(self, text: str, think: bool | None = None) -> Iterator[str]:
    """Answers the user turn ``text`` (thinking per ``think``, default the session's): yields the reply's text
    pieces as they are decoded and, when it ends (EOS, ``max_tokens``, or closed early: Ctrl-C), appends the
    user turn and the reply to ``history``. DataError, raised by this call (before any piece), for a message the
    format refuses or a conversation that fills the model's context."""
    think = self.thinking if think is None else think
    ids = self.render_prompt(think, text)
    limit = int(self.cfg.model.max_position_embeddings)
    if len(ids) >= limit:
      raise DataError(f"the conversation is {len(ids)} tokens, the model's context (model.max_position_embeddings) "
                      f"is {limit}: /reset the conversation or send a shorter message")
    budget = min(int(self.decoding.max_tokens), limit - len(ids))
    key = jax.random.fold_in(jax.random.key(self.decoding.seed), self.turns)
    self.turns += 1
    return self._pieces(text, think, ids, budget, key)

  def _pieces(self, text: str, think: bool, ids: list[int], budget: int, key) -> Iterator[str]:
    stream = TextStream(self.tokenizer)
    try:
      for chunk in self._token_chunks(ids, budget, key):
        ended = any(t in self.stop_ids for t in chunk)
        if ended:
          chunk = chunk[:min(chunk.index(t) for t in self.stop_ids if t in chunk)]
        piece = stream.push(chunk)
        if piece:
          yield piece
        if ended:
          break
      tail = stream.finish()
      if tail:
        yield tail
    finally:
      self._commit(text, stream.text(), think)

  def _token_chunks(self, ids: list[int], budget: int, key) -> Iterator[list[int]]:
    """The reply's new token ids as the sampler's stream produces them, one chunk per decode step (one token, or
    1 .. k + 1 with k draft tokens); the stop token included when it comes."""
    p, r = self._shape(len(ids), budget)
    tokens, lens = left_pad([ids], p, self.tokenizer.pad_id)
    d = self.decoding
    for new in self._sampler(p, r).stream(self.params, tokens, lens, key, temperature=d.temperature, top_p=d.top_p,
                                          top_k=d.top_k, stop_ids=self.stop_ids, max_new=budget):
      yield new.tolist()

  def _shape(self, n: int, budget: int) -> tuple[int, int]:
    """(padded prompt length, new-token capacity) for an ``n``-token prompt and a ``budget`` (``max_tokens``
    unless the context is nearly full): a power of two (at least ``MIN_PROMPT_BUCKET``) that fits beside the
    budget, so a conversation compiles a few shapes, not one per turn."""
    limit = int(self.cfg.model.max_position_embeddings)
    p = min(max(MIN_PROMPT_BUCKET, 1 << (n - 1).bit_length()), limit - budget)
    return p, budget

  def _sampler(self, p: int, r: int) -> Sampler:
    if (p, r) not in self._samplers:
      self._samplers[(p, r)] = Sampler(self.cfg, max_prompt_len=p, max_new_tokens=r, draft_tokens=self.draft_tokens)
    return self._samplers[(p, r)]

  def _commit(self, user: str, generated: str, think: bool) -> None:
    """Appends the user turn and the reply as the chat format reads it (see the module docstring)."""
    opening = chat_format.THINK + ("" if think else chat_format.END_THINK)
    message = chat_format.parse(chat_format.ASSISTANT + opening + generated, self.tokenizer)[0]
    message = {k: (self._control.sub("", v) if isinstance(v, str) and k != "role" else v)
               for k, v in message.items()}
    if not message.get("reasoning_content", "").strip():
      message.pop("reasoning_content", None)
    self.history.append({"role": "user", "content": user})
    if message["content"].strip() or message.get("reasoning_content") or message.get("tool_calls"):
      self.history.append(message)


def chat_template(cfg, tokenizer_path: str):
  """The chat template the run trained with (``data.chat_template``, as ``chat.template_from_config`` reads
  it); when that names neither a template nor an existing tokenizer directory (the run trained with the
  built-in, or its tokenizer is not on this machine), the one shipped beside the checkpoint's tokenizer, if
  any, else the built-in (None)."""
  d = cfg.data
  if not d.chat_template and not (d.tokenizer and os.path.exists(d.tokenizer)):
    return chat_format.load_template(os.path.dirname(tokenizer_path))
  return chat_format.template_from_config(cfg)


def open_session(path, *, system: str = "", thinking: bool = False, decoding: Decoding | None = None,
                 draft_tokens: int | None = None) -> ChatSession:
  """A ``ChatSession`` with the model of checkpoint ``path`` (``sample.load_checkpoint``: a run's output_dir or a
  params checkpoint with its config), its saved tokenizer and the run's chat template. CheckpointError when the
  checkpoint holds no tokenizer."""
  loaded = sample.load_checkpoint(path)
  if loaded.tokenizer_path is None:
    raise CheckpointError(f"{path} holds no {checkpoint.TOKENIZER_FILE}: chat needs the tokenizer the model was "
                          f"trained with; copy it into {path} (joyjax train and joyjax convert save it there)")
  tokenizer = load_tokenizer(loaded.tokenizer_path)
  check_vocab_fits(tokenizer, loaded.cfg.model.vocab_size, source=loaded.tokenizer_path)
  return ChatSession(loaded.cfg, loaded.params, tokenizer, template=chat_template(loaded.cfg, loaded.tokenizer_path),
                     system=system, thinking=thinking, decoding=decoding, draft_tokens=draft_tokens)


# --------------------------------------------------------------------------------------------------- REPL


def _read_line(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
  """One line of input without its newline, or None at end of input. A terminal gets a prompt (and line
  editing when it is the process's own)."""
  if interactive and stdin is sys.stdin:
    try:
      return input("> ")
    except EOFError:
      return None
  if interactive:
    stdout.write("> ")
    stdout.flush()
  line = stdin.readline()
  return None if not line else line.rstrip("\n").rstrip("\r")


def say_reply(session: ChatSession, text: str, think: bool, out: TextIO) -> None:
  """Streams the reply to ``text`` onto ``out`` (after a ``<think>`` in thinking mode) and ends the line;
  Ctrl-C stops the reply (kept as far as it went)."""
  pieces = session.reply(text, think)  # a refused turn raises here, before anything is written
  if think:
    out.write(chat_format.THINK)
  try:
    for piece in pieces:
      out.write(piece)
      out.flush()
  except KeyboardInterrupt:
    pieces.close()
    out.write(" [stopped]")
  out.write("\n")
  out.flush()


def repl(session: ChatSession, *, stdin: TextIO, stdout: TextIO, stderr: TextIO, interactive: bool) -> int:
  """Runs the conversation: each input line is a user turn or a command (module docstring). A turn the format
  refuses (a control token in it, a full context) prints one line on ``stderr`` and the conversation goes on.
  Returns 0 at ``/exit`` or end of input."""
  if interactive:
    mode = "on" if session.thinking else "off"
    stdout.write(f"joyjax chat: thinking {mode}; {REPL_HELP}; Ctrl-C stops a reply, Ctrl-D leaves\n")
  while True:
    try:
      line = _read_line(stdin, stdout, interactive)
    except KeyboardInterrupt:
      stdout.write("\n(Ctrl-D or /exit leaves)\n")
      continue
    if line is None:
      if interactive:
        stdout.write("\n")
      return 0
    command, _, arg = line.partition(" ")
    think = None
    if command in ("/exit", "/quit"):
      return 0
    if command in ("/think", "/no_think"):
      mode = command == "/think"
      if not arg.strip():
        session.thinking = mode
        stdout.write(f"(thinking {'on' if mode else 'off'})\n" if interactive else "")
        continue
      line, think = arg, mode
    elif command == "/system":
      session.set_system(arg.strip())
      continue
    elif command == "/reset":
      session.reset()
      continue
    elif command == "/help" or (command.startswith("/") and len(command) > 1 and " " not in command
                                and command[1:].replace("_", "").isalpha()):
      stdout.write(REPL_HELP + "\n")
      continue
    if not line.strip():
      continue
    try:
      say_reply(session, line, session.thinking if think is None else think, stdout)
    except DataError as e:
      stdout.flush()
      stderr.write(f"joyjax chat: {e.kind}: {' '.join(str(e).split())}\n")
      stderr.flush()

