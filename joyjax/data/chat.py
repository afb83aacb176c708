"""The chat format: conversations -> text -> token ids with per-token loss masks, thinking or not.

A conversation is a list of messages ``{"role": system | user | assistant | tool, "content": str}``; an
assistant message may add ``"reasoning_content": str`` (its thinking) and ``"tool_calls": [{"type":
"function", "function": {"name": str, "arguments": str}}]`` (OpenAI's layout; ``to_messages`` normalises rows
to it).

Built-in template (the shape of DeepSeek-V3's; ``BUILTIN_JINJA`` is the same template in Jinja)::

    {bos}{system}<｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{content}{tool calls}{eos}
    <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{tool}<｜tool▁output▁end｜>...<｜tool▁outputs▁end｜>

* ``bos`` / ``eos`` are the tokenizer's own BOS / EOS strings (DeepSeek's ``<｜begin▁of▁sentence｜>`` /
  ``<｜end▁of▁sentence｜>`` when it has none), so generation stops at the tokenizer's EOS id.
* System messages come first, right after BOS, as in DeepSeek-V3 (the format has no system marker; a system
  message after the first turn is a DataError). ``to_messages`` joins leading system messages with a blank line.
* Tool calls (DeepSeek-V3's markers): ``<｜tool▁calls▁begin｜>`` then per call ``<｜tool▁call▁begin｜>{type}
  <｜tool▁sep｜>{name}\\n```json\\n{arguments}\\n```<｜tool▁call▁end｜>`` then ``<｜tool▁calls▁end｜>``. Consecutive
  tool results share one ``<｜tool▁outputs▁begin｜>...<｜tool▁outputs▁end｜>`` block. Simplified against
  DeepSeek-V3's own template: an assistant turn after tool results still opens with ``<｜Assistant｜>``, and
  earlier turns keep their reasoning (so rendering then ``parse`` gives back the whole conversation).

Thinking and non-thinking mode (``thinking=``, per call) are chosen by the prompt, never by the model. In
thinking mode an assistant turn opens with ``<｜Assistant｜><think>`` and the model writes
``{reasoning}</think>{content}{eos}``; in non-thinking mode it opens with an EMPTY think block,
``<｜Assistant｜><think></think>``, the model writes ``{content}{eos}``, and the reasoning of every turn is
dropped. The opening belongs to the prompt and is never trained: a model trained on both modes is always told
which one it is in (were the empty block trained, ``<think>`` would be followed by reasoning or by ``</think>``
at the model's whim), and ``render_prompt`` ends with exactly that opening.

Loss masks: ``render`` produces the text and the character spans of the trainable parts, then tokenizes the
whole text ONCE with offsets (``Tokenizer.hf``: special-token matching on, so markers that are special tokens
become one id) and marks a token trainable when its first character lies inside a span. A span is an
assistant turn after its opening: ``{reasoning}</think>{content}{tool calls}{eos}`` in thinking mode,
``{content}{tool calls}{eos}`` in non-thinking mode. ``train_on``: ``assistant`` (every assistant turn, the
default), ``last`` (only the final assistant turn: a DPO response), ``all`` (every token).

Jinja templates (``load_template``): a Hugging Face ``chat_template`` (``tokenizer_config.json`` key, or a
``chat_template.jinja`` file) renders in jinja2's ``ImmutableSandboxedEnvironment`` (never a plain
``Environment``: a downloaded template is untrusted; touching an unsafe attribute such as ``__class__`` or
``__globals__`` raises). It receives ``messages``, ``bos_token``, ``eos_token``, ``add_generation_prompt``,
``thinking`` and ``enable_thinking`` (the names DeepSeek-V3.1 and Qwen3 templates read). Its spans are found by
rendering prefixes (as TRL does): assistant turn ``i`` spans from the end of ``messages[:i]`` rendered with
the generation prompt to the end of ``messages[:i + 1]``; each prefix must be a prefix of the whole text,
else the template cannot be masked per turn (it rewrites earlier turns, e.g. drops old reasoning) and
``render`` says so (``train_on="last"`` still works for most such templates). The built-in template and
``BUILTIN_JINJA`` give the same text, ids and masks for every conversation.

Control tokens in text: a message whose text contains a special token of the tokenizer or a chat marker
(``<｜User｜>``, ``</think>``, the EOS string ...) is refused (DataError): it would inject a turn boundary (and
could not be parsed back). Tokenizers without the markers (e.g. one trained by joyjax) still work: the
markers are then ordinary text of several tokens, and a token straddling a span edge counts by its first
character; ``add_chat_tokens`` adds them as special tokens (one id each, exact span edges) where the model's
vocabulary has room.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import re
import threading
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers

from joyjax.config import CHAT_TRAIN_ON
from joyjax.errors import ConfigError, DataError
from joyjax.data.sources import _FIX
from joyjax.data.tokenizer import Tokenizer, _exists, _read_text

ROLES = ("system", "user", "assistant", "tool")

# DeepSeek-V3's markers (they are tokens of its tokenizer and of JoyAI's).
DEFAULT_BOS, DEFAULT_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
CHAT_MARKERS = (USER, ASSISTANT, THINK, END_THINK, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN,
                TOOL_CALL_END, TOOL_SEP, TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END)
_ARGS_OPEN, _ARGS_CLOSE = "\n```json\n", "\n```"

# The built-in template in Jinja (for a tokenizer directory, or for other tools to render joyjax's format).
BUILTIN_JINJA = r"""
{%- set thinking = thinking if thinking is defined else true -%}
{%- set ns = namespace(in_tools=false, started=false) -%}
{{- bos_token -}}
{%- for m in messages -%}
  {%- if m.role != 'tool' and ns.in_tools -%}
    {{- '<｜tool▁outputs▁end｜>' -}}
    {%- set ns.in_tools = false -%}
  {%- endif -%}
  {%- if m.role == 'system' -%}
    {%- if ns.started -%}
      {{- raise_exception('a system message after the first turn: this format puts system text first') -}}
    {%- endif -%}
    {{- m.content -}}
  {%- elif m.role == 'user' -%}
    {%- set ns.started = true -%}
    {{- '<｜User｜>' + m.content -}}
  {%- elif m.role == 'assistant' -%}
    {%- set ns.started = true -%}
    {{- '<｜Assistant｜><think>' -}}
    {%- if thinking and m.reasoning_content -%}
      {{- m.reasoning_content -}}
    {%- endif -%}
    {{- '</think>' + m.content -}}
    {%- if m.tool_calls -%}
      {{- '<｜tool▁calls▁begin｜>' -}}
      {%- for call in m.tool_calls -%}
        {{- '<｜tool▁call▁begin｜>' + call.type + '<｜tool▁sep｜>' + call.function.name -}}
        {{- '\n```json\n' + call.function.arguments + '\n```<｜tool▁call▁end｜>' -}}
      {%- endfor -%}
      {{- '<｜tool▁calls▁end｜>' -}}
    {%- endif -%}
    {{- eos_token -}}
  {%- elif m.role == 'tool' -%}
    {%- set ns.started = true -%}
    {%- if not ns.in_tools -%}
      {{- '<｜tool▁outputs▁begin｜>' -}}
      {%- set ns.in_tools = true -%}
    {%- endif -%}
    {{- '<｜tool▁output▁begin｜>' + m.content + '<｜tool▁output▁end｜>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if ns.in_tools -%}
  {{- '<｜tool▁outputs▁end｜>' -}}
{%- endif -%}
{%- if add_generation_prompt -%}
  {{- '<｜Assistant｜><think>' + ('' if thinking else '</think>') -}}
{%- endif -%}
"""


@dataclasses.dataclass
class Rendered:
  """A rendered conversation: token ids, 1 where a token is trainable (``loss_mask``), the text, and the
  character spans ``[start, end)`` of ``text`` that were trainable."""
  ids: list[int]
  loss_mask: list[int]
  text: str
  spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------ messages


def _fail(where: str, msg: str) -> DataError:
  return DataError(f"{where}: {msg}; {_FIX}" if where else msg)


def _norm_tool_calls(calls, where: str, k: int) -> list[dict]:
  if not isinstance(calls, list):
    raise _fail(where, f"message {k}: tool_calls is {type(calls).__name__}, not a list")
  out = []
  for c in calls:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"] or "\n" in fn["name"]:
      raise _fail(where, f"message {k}: a tool call needs {{'function': {{'name': str, 'arguments': ...}}}} "
                         f"with a one-line name, got {str(c)[:80]!r}")
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
      args = json.dumps(args, ensure_ascii=False)
    kind = c.get("type") or "function"
    if not isinstance(kind, str):
      raise _fail(where, f"message {k}: tool call type is {type(kind).__name__}, not a string")
    out.append({"type": kind, "function": {"name": fn["name"], "arguments": args}})
  return out


def _normalize(messages, where: str, *, require_assistant: bool) -> list[dict]:
  """Messages in the canonical layout (see module docstring), checked; DataError naming ``where``."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise _fail(where, f"the conversation must be a non-empty list of messages, got {str(messages)[:80]!r}")
  out: list[dict] = []
  for k, raw in enumerate(messages, 1):
    if not isinstance(raw, dict):
      raise _fail(where, f"message {k} is {type(raw).__name__}, not an object with role and content")
    role = raw.get("role")
    if role not in ROLES:
      raise _fail(where, f"message {k}: role {role!r} is not one of {', '.join(ROLES)}")
    content = raw.get("content")
    if content is None and role == "assistant" and raw.get("tool_calls"):
      content = ""
    if not isinstance(content, str):
      raise _fail(where, f"message {k} ({role}): content is {type(content).__name__}, not a string")
    msg: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
      reasoning = raw.get("reasoning_content", raw.get("reasoning"))
      if reasoning is not None and not isinstance(reasoning, str):
        raise _fail(where, f"message {k} (assistant): reasoning_content is {type(reasoning).__name__}, not a string")
      if not reasoning and content.startswith(THINK) and END_THINK in content:  # reasoning written inline
        reasoning, _, content = content[len(THINK):].partition(END_THINK)
        content = content.lstrip("\n")
        msg["content"] = content
      if reasoning:
        msg["reasoning_content"] = reasoning
      if raw.get("tool_calls"):
        msg["tool_calls"] = _norm_tool_calls(raw["tool_calls"], where, k)
      if not content.strip() and not (reasoning or "").strip() and "tool_calls" not in msg:
        raise _fail(where, f"message {k} (assistant) is empty: no content, reasoning or tool calls")
    if role == "system":
      if not content:
        continue
      if out and out[-1]["role"] == "system":  # leading system messages become one system prompt
        out[-1]["content"] += "\n\n" + content
        continue
    out.append(msg)
  if require_assistant and not any(x["role"] == "assistant" for x in out):
    raise _fail(where, "the conversation has no assistant turn (nothing to learn)")
  return out


def to_messages(row: dict, *, where: str) -> list[dict]:
  """A data row -> the conversation, checked and normalised (module docstring); DataError naming ``where``.

  Layouts: ``{"messages": [...]}`` (OpenAI), or ``{"prompt": str | messages, "response": str}`` with
  optional ``"reasoning"`` / ``"reasoning_content"`` (the response's thinking) and ``"system"``. Raises for a
  row without an assistant turn, an empty assistant message, an unknown role or content that is not a string.
  Normalisation: leading system messages joined by a blank line, empty system messages dropped, ``content:
  null`` of a tool-calling assistant message read as "", reasoning written inline as ``<think>...</think>``
  at the start of an assistant message moved to ``reasoning_content``, tool-call arguments as JSON strings
  (ids dropped).
  """
  if not isinstance(row, dict):
    raise _fail(where, f"expected a JSON object, got {type(row).__name__}")
  if "messages" in row:
    messages = row["messages"]
  elif "prompt" in row and "response" in row:
    prompt, response = row["prompt"], row["response"]
    if isinstance(prompt, str):
      messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
      messages = list(prompt)
    else:
      raise _fail(where, f"field 'prompt' is {type(prompt).__name__}, not a string or a list of messages")
    if isinstance(row.get("system"), str) and row["system"]:
      messages = [{"role": "system", "content": row["system"]}] + messages
    if not isinstance(response, str):
      raise _fail(where, f"field 'response' is {type(response).__name__}, not a string")
    if not response.strip() and not (row.get("reasoning") or row.get("reasoning_content")):
      raise _fail(where, "field 'response' is empty")
    answer = {"role": "assistant", "content": response}
    for key in ("reasoning_content", "reasoning"):
      if row.get(key) is not None:
        answer["reasoning_content"] = row[key]
        break
    messages = messages + [answer]
  else:
    fields = ", ".join(sorted(map(str, row))[:10])
    raise _fail(where, f"a conversation row needs 'messages' (the OpenAI layout) or 'prompt' and 'response' "
                       f"(fields: {fields})")
  return _normalize(messages, where, require_assistant=True)


# ------------------------------------------------------------------------------------------ templates


class _Generation(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag): renders its body."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.Scope(body, lineno=lineno)


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
  """The sandbox, stricter: an unsafe attribute raises at once instead of rendering as an empty string."""

  def unsafe_undefined(self, obj, attribute):
    raise jinja2.sandbox.SecurityError(
        f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe")


def _raise_exception(message):
  raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_ENV: list[_Sandbox] = []
_ENV_LOCK = threading.Lock()


def sandbox() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  """The one Jinja environment chat templates render in (as transformers': trim_blocks, lstrip_blocks,
  loop controls, ``tojson``, ``raise_exception``; plus ``{% generation %}``)."""
  with _ENV_LOCK:
    if not _ENV:
      env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation])
      env.filters["tojson"] = _tojson
      env.globals["raise_exception"] = _raise_exception
      _ENV.append(env)
    return _ENV[0]


class ChatTemplate:
  """A Jinja chat template (``source``) from ``origin``, with the BOS / EOS strings its tokenizer config names
  (``None``: the tokenizer's). Picklable (the compiled template is rebuilt after unpickling)."""

  def __init__(self, source: str, *, origin: str = "", bos_token: str | None = None,
               eos_token: str | None = None):
    self.source, self.origin = source, origin
    self.bos_token, self.eos_token = bos_token, eos_token
    self.fingerprint = hashlib.sha256(source.encode()).hexdigest()
    try:
      self._compiled = sandbox().from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise ConfigError(f"chat template {origin or '(given)'}: Jinja syntax error at line {e.lineno}: "
                        f"{e.message}; fix the template or set data.chat_template=builtin") from None

  def __getstate__(self):
    return {"source": self.source, "origin": self.origin, "bos_token": self.bos_token,
            "eos_token": self.eos_token}

  def __setstate__(self, s):
    self.__init__(s["source"], origin=s["origin"], bos_token=s["bos_token"], eos_token=s["eos_token"])

  def __repr__(self) -> str:
    return f"ChatTemplate(origin={self.origin!r}, sha256={self.fingerprint[:12]})"

  def render(self, messages: Sequence[dict], *, add_generation_prompt: bool, thinking: bool, bos_token: str,
             eos_token: str) -> str:
    try:
      return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   thinking=thinking, enable_thinking=thinking, bos_token=bos_token,
                                   eos_token=eos_token)
    except jinja2.sandbox.SecurityError as e:
      raise ConfigError(f"chat template {self.origin or '(given)'} was stopped by the sandbox ({e}); a chat "
                        "template may not reach Python internals: use another template or "
                        "data.chat_template=builtin") from None
    except jinja2.TemplateError as e:
      raise DataError(f"chat template {self.origin or '(given)'} refused the conversation: {e}") from None


def _template_field(cfg: dict, origin: str) -> str | None:
  t = cfg.get("chat_template")
  if isinstance(t, list):  # transformers' named templates: [{"name": "default", "template": "..."}, ...]
    named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
    t = named.get("default") or next(iter(named.values()), None)
  if t is not None and not isinstance(t, str):
    raise ConfigError(f"{origin}: chat_template is {type(t).__name__}, not a string")
  return t


def _token_name(v) -> str | None:
  v = v.get("content") if isinstance(v, dict) else v
  return v if isinstance(v, str) else None


def load_template(tokenizer_dir_or_file: str) -> ChatTemplate | None:
  """The Jinja chat template shipped with a tokenizer, or None when there is none.

  Accepts a tokenizer directory (``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``),
  its ``tokenizer.json`` (the same directory is searched), a ``tokenizer_config.json`` / ``chat_template.json``
  file, or a ``.jinja`` file. BOS / EOS strings come from ``tokenizer_config.json`` when present.
  """
  path = tokenizer_dir_or_file.rstrip("/")
  if not path:
    return None
  name = os.path.basename(path)
  directory = os.path.dirname(path) if name.endswith((".json", ".jinja", ".j2")) else path
  cfg_file = path if name in ("tokenizer_config.json", "chat_template.json") else os.path.join(
      directory, "tokenizer_config.json")
  jinja_file = path if name.endswith((".jinja", ".j2")) else os.path.join(directory, "chat_template.jinja")
  if jinja_file == path and not _exists(path):
    raise ConfigError(f"config key 'data.chat_template': {path!r} does not exist")
  if name.endswith(".json") and not _exists(path):
    raise ConfigError(f"{path!r} does not exist")
  source = origin = None
  if cfg_file != path and _exists(jinja_file):  # a named config file speaks for itself
    source, origin = _read_text(jinja_file), jinja_file
  cfg: dict = {}
  if _exists(cfg_file):
    try:
      cfg = json.loads(_read_text(cfg_file))
    except ValueError as e:
      raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
      cfg = {}
  if source is None:
    source, origin = _template_field(cfg, cfg_file), cfg_file
  if source is None:
    return None
  return ChatTemplate(source, origin=origin, bos_token=_token_name(cfg.get("bos_token")),
                      eos_token=_token_name(cfg.get("eos_token")))


def template_from_config(config) -> ChatTemplate | None:
  """The template of ``data.chat_template``: "" = the one shipped in ``data.tokenizer``'s directory if any,
  else the built-in (None); "builtin" = the built-in; else a path that must hold one."""
  d = config.data
  if d.chat_template == "builtin":
    return None
  if not d.chat_template:
    return load_template(d.tokenizer) if d.tokenizer else None
  t = load_template(d.chat_template)
  if t is None:
    raise ConfigError(f"config key 'data.chat_template': {d.chat_template!r} holds no chat template (no "
                      "chat_template.jinja, no 'chat_template' in tokenizer_config.json); give a .jinja file, a "
                      "tokenizer directory that ships one, 'builtin', or ''")
  return t


def add_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
  """``tokenizer`` with the chat markers (``CHAT_MARKERS``) it lacks added as special tokens (new ids after its
  largest), so each marker is one token and span edges are exact. Check the model's vocabulary has room."""
  hf = tokenizers.Tokenizer.from_str(tokenizer.hf.to_str())
  missing = [m for m in CHAT_MARKERS if hf.token_to_id(m) is None]
  hf.add_special_tokens([tokenizers.AddedToken(m, special=True, normalized=False) for m in missing])
  return Tokenizer(hf, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                   origin=tokenizer.origin)


# ------------------------------------------------------------------------------------------ rendering


def bos_eos(tokenizer: Tokenizer | None, template: ChatTemplate | None = None) -> tuple[str, str]:
  """The (BOS, EOS) strings a conversation is rendered with: the template's own tokens where it names them, else
  the tokenizer's BOS / EOS tokens as text, else DeepSeek's (``DEFAULT_BOS``, ``DEFAULT_EOS``)."""
  bos = template.bos_token if template is not None else None
  eos = template.eos_token if template is not None else None
  if tokenizer is not None:
    if bos is None and tokenizer.bos_id is not None:
      bos = tokenizer.hf.id_to_token(tokenizer.bos_id)
    if eos is None and tokenizer.eos_id is not None:
      eos = tokenizer.hf.id_to_token(tokenizer.eos_id)
  return (bos if bos is not None else DEFAULT_BOS), (eos if eos is not None else DEFAULT_EOS)


def _tool_calls_text(calls: Sequence[dict]) -> str:
  return (TOOL_CALLS_BEGIN + "".join(
      TOOL_CALL_BEGIN + c["type"] + TOOL_SEP + c["function"]["name"] + _ARGS_OPEN + c["function"]["arguments"]
      + _ARGS_CLOSE + TOOL_CALL_END for c in calls) + TOOL_CALLS_END)


def _opening(thinking: bool) -> str:
  return ASSISTANT + THINK + ("" if thinking else END_THINK)


def _render_builtin(messages: Sequence[dict], *, bos: str, eos: str, thinking: bool,
                    add_generation_prompt: bool) -> tuple[str, list[tuple[int, int, int]]]:
  """(text, [(message index, start, end) of each assistant turn after its opening])."""
  parts, n, turns = [bos], len(bos), []
  in_tools = started = False

  def put(s: str):
    nonlocal n
    parts.append(s)
    n += len(s)

  for i, msg in enumerate(messages):
    role = msg["role"]
    if role != "tool" and in_tools:
      put(TOOL_OUTPUTS_END)
      in_tools = False
    if role == "system":
      if started:
        raise DataError(f"message {i + 1} is a system message after the first turn: the chat format puts system "
                        "text first (DeepSeek-V3 has no system marker); move it to the start")
      put(msg["content"])
    elif role == "user":
      put(USER + msg["content"])
    elif role == "assistant":
      put(_opening(thinking))
      start = n
      if thinking:
        put(msg.get("reasoning_content", "") + END_THINK)
      put(msg["content"])
      if msg.get("tool_calls"):
        put(_tool_calls_text(msg["tool_calls"]))
      put(eos)
      turns.append((i, start, n))
    else:  # tool
      if not in_tools:
        put(TOOL_OUTPUTS_BEGIN)
        in_tools = True
      put(TOOL_OUTPUT_BEGIN + msg["content"] + TOOL_OUTPUT_END)
    started = started or role != "system"
  if in_tools:
    put(TOOL_OUTPUTS_END)
  if add_generation_prompt:
    put(_opening(thinking))
  return "".join(parts), turns


_CONTROL: dict[tuple[str, bool], re.Pattern] = {}


def control_pattern(tokenizer: Tokenizer, bos: str, eos: str) -> re.Pattern:
  """A compiled regex matching any string no message text may contain: the tokenizer's special tokens, the chat
  markers, ``bos`` and ``eos`` (longest first). Cached per tokenizer and (bos, eos)."""
  key = (tokenizer.fingerprint, bos + "\0" + eos)
  pat = _CONTROL.get(key)
  if pat is None:
    strings = {t.content for t in tokenizer.hf.get_added_tokens_decoder().values() if t.special and t.content}
    strings |= set(CHAT_MARKERS) | {bos, eos}
    pat = re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))
    _CONTROL[key] = pat
  return pat


def _check_text(messages: Sequence[dict], pattern: re.Pattern) -> None:
  for k, msg in enumerate(messages, 1):
    texts = [msg["content"], msg.get("reasoning_content", "")]
    for c in msg.get("tool_calls", ()):
      texts += [c["type"], c["function"]["name"], c["function"]["arguments"]]
    for t in texts:
      hit = pattern.search(t) if t else None
      if hit:
        raise DataError(f"message {k} ({msg['role']}) contains the control token {hit.group(0)!r} in its text: it "
                        "would inject a turn boundary; remove it from the data")


def _prepare(messages, tokenizer: Tokenizer, template: ChatTemplate | None, thinking: bool,
             require_assistant: bool) -> tuple[list[dict], str, str]:
  msgs = _normalize(messages, "", require_assistant=require_assistant)
  if not thinking:  # non-thinking mode: the reasoning is not shown to any template
    msgs = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in msgs]
  bos, eos = bos_eos(tokenizer, template)
  _check_text(msgs, control_pattern(tokenizer, bos, eos))
  return msgs, bos, eos


def _jinja_spans(template: ChatTemplate, msgs: list[dict], text: str, index: Sequence[int], *, thinking: bool,
                 bos: str, eos: str) -> list[tuple[int, int]]:
  spans = []
  for i in index:
    before = template.render(msgs[:i], add_generation_prompt=True, thinking=thinking, bos_token=bos,
                             eos_token=eos)
    through = template.render(msgs[:i + 1], add_generation_prompt=False, thinking=thinking, bos_token=bos,
                              eos_token=eos)
    if not (through.startswith(before) and text.startswith(through)):
      raise DataError(
          f"chat template {template.origin or '(given)'} cannot be masked per turn: rendering the conversation "
          f"up to assistant message {i + 1} is not a prefix of rendering all of it (the template rewrites earlier "
          "turns, e.g. drops old reasoning); use sft.train_on=last, or data.chat_template=builtin")
    spans.append((len(before), len(through)))
  return spans


def _token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
  """1 for each token whose first character lies in a span (token starts are non-decreasing)."""
  starts = [a for a, _ in offsets]
  mask = [0] * len(starts)
  for s, e in spans:
    lo, hi = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
    mask[lo:hi] = [1] * (hi - lo)
  return mask


def render(messages: Sequence[dict], tokenizer: Tokenizer, *, thinking: bool = True, train_on: str = "assistant",
           template: ChatTemplate | None = None) -> Rendered:
  """A conversation -> ``Rendered`` (ids, loss mask, text, spans); see the module docstring.

  ``template`` None = the built-in template. Raises DataError for a malformed conversation (no location: the
  caller adds the file and row) and when a template cannot be masked per turn.
  """
  if train_on not in CHAT_TRAIN_ON:
    raise ConfigError(f"config key 'sft.train_on': must be one of {', '.join(CHAT_TRAIN_ON)}, got {train_on!r}")
  msgs, bos, eos = _prepare(messages, tokenizer, template, thinking, require_assistant=train_on != "all")
  if template is None:
    text, turns = _render_builtin(msgs, bos=bos, eos=eos, thinking=thinking, add_generation_prompt=False)
    spans = [(s, e) for _, s, e in turns]
    if train_on == "last":
      spans = spans[-1:]
  else:
    text = template.render(msgs, add_generation_prompt=False, thinking=thinking, bos_token=bos, eos_token=eos)
    index = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    spans = [] if train_on == "all" else _jinja_spans(
        template, msgs, text, index[-1:] if train_on == "last" else index, thinking=thinking, bos=bos, eos=eos)
  if train_on == "all":
    spans = [(0, len(text))]
  enc = tokenizer.hf.encode(text, add_special_tokens=False)
  return Rendered(ids=list(enc.ids), loss_mask=_token_mask(enc.offsets, spans), text=text, spans=spans)


def render_prompt(messages: Sequence[dict], tokenizer: Tokenizer, *, thinking: bool = True,
                  template: ChatTemplate | None = None) -> list[int]:
  """Token ids of the conversation so far plus the assistant opening: what generation continues from. It ends
  with ``<｜Assistant｜><think>`` in thinking mode and with the empty think block in non-thinking mode."""
  msgs, bos, eos = _prepare(messages, tokenizer, template, thinking, require_assistant=False)
  if template is None:
    text, _ = _render_builtin(msgs, bos=bos, eos=eos, thinking=thinking, add_generation_prompt=True)
  else:
    text = template.render(msgs, add_generation_prompt=True, thinking=thinking, bos_token=bos, eos_token=eos)
  return list(tokenizer.hf.encode(text, add_special_tokens=False).ids)


# ------------------------------------------------------------------------------------------ parsing

_TURN = re.compile("(" + "|".join(re.escape(s) for s in (USER, ASSISTANT, TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END,
                                                           TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END)) + ")")
_CALL = re.compile(re.escape(TOOL_CALL_BEGIN) + r"(.*?)" + re.escape(TOOL_SEP) + r"([^\n]*)" + re.escape(_ARGS_OPEN)
                   + r"(.*?)" + re.escape(_ARGS_CLOSE + TOOL_CALL_END), re.S)


def _parse_assistant(body: str, eos: str) -> dict:
  body = body.split(eos, 1)[0]  # a generated turn may stop without EOS
  msg: dict[str, Any] = {"role": "assistant"}
  reasoning = ""
  if body.startswith(THINK):
    head, sep, rest = body[len(THINK):].partition(END_THINK)
    reasoning, body = (head, rest) if sep else (head, "")  # an unfinished think block: all reasoning
  content, sep, calls = body.partition(TOOL_CALLS_BEGIN)
  msg["content"] = content
  if reasoning:
    msg["reasoning_content"] = reasoning
  if sep:
    msg["tool_calls"] = [{"type": t, "function": {"name": n, "arguments": a}} for t, n, a in _CALL.findall(calls)]
  return msg


def parse(text: str, tokenizer: Tokenizer | None = None) -> list[dict]:
  """Text in the built-in format -> messages (the inverse of ``render``, reasoning included in thinking mode).

  ``tokenizer`` names the BOS / EOS strings (default DeepSeek's). Parsing a prompt plus a generated reply gives
  the reply as the last assistant message (an unterminated reply or think block is read as far as it goes).
  """
  bos, eos = bos_eos(tokenizer)
  if text.startswith(bos):
    text = text[len(bos):]
  pieces = _TURN.split(text)
  messages: list[dict] = []
  if pieces[0]:
    messages.append({"role": "system", "content": pieces[0]})
  for k in range(1, len(pieces), 2):
    marker, body = pieces[k], pieces[k + 1]
    if marker == USER:
      messages.append({"role": "user", "content": body})
    elif marker == ASSISTANT:
      messages.append(_parse_assistant(body, eos))
    elif marker == TOOL_OUTPUT_BEGIN:
      messages.append({"role": "tool", "content": body})
  return messages
