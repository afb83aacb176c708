"""Chat format: loss masks, thinking / non-thinking, parse round trip, Jinja templates, the sandbox, bad rows.

Expected texts are written from the format's definition (markers spelled out here), never taken from the
renderer's own output. The tokenizer is ``chat_data.chat_tokenizer()``: a 512-entry BPE trained on generated
text with the chat markers added as special tokens (one id each, so every span edge is a token edge and the
masked tokens decode to exactly the assistant text).
"""

import json

import jinja2.sandbox
import pytest

import chat_data as cd
from configs import base
from joyjax.errors import ConfigError, DataError
from joyjax.data import chat
from joyjax.data.tokenizer import train_tokenizer

BOS, EOS = "<|bos|>", "<|eos|>"
A, U = "<｜Assistant｜>", "<｜User｜>"
CONVS = cd.conversations(120)


@pytest.fixture(scope="module")
def tok():
  return cd.chat_tokenizer()


def _runs(ids, mask):
  """The maximal runs of masked token ids."""
  runs, cur = [], []
  for i, m in zip(ids, mask):
    if m:
      cur.append(i)
    elif cur:
      runs.append(cur)
      cur = []
  return runs + ([cur] if cur else [])


def _calls(msg):
  """DeepSeek-V3's tool-call markers, spelled out."""
  if not msg.get("tool_calls"):
    return ""
  return "<｜tool▁calls▁begin｜>" + "".join(
      f"<｜tool▁call▁begin｜>{c['type']}<｜tool▁sep｜>{c['function']['name']}\n```json\n"
      f"{c['function']['arguments']}\n```<｜tool▁call▁end｜>" for c in msg["tool_calls"]) + "<｜tool▁calls▁end｜>"


def _expected_trained(conv, thinking):
  """What each assistant turn writes after its opening: {reasoning}</think>{content}{calls}{eos} in thinking
  mode, {content}{calls}{eos} in non-thinking mode."""
  out = []
  for m in conv:
    if m["role"] == "assistant":
      head = (m.get("reasoning_content", "") + "</think>") if thinking else ""
      out.append(head + m["content"] + _calls(m) + EOS)
  return out


@pytest.mark.parametrize("thinking", [True, False])
def test_only_assistant_tokens_are_masked(tok, thinking):
  for conv in CONVS:
    r = chat.render(conv, tok, thinking=thinking)
    assert tok.decode(r.ids) == r.text  # the text is all there, tokenized once
    assert len(r.ids) == len(r.loss_mask) and set(r.loss_mask) <= {0, 1}
    assert [tok.decode(run) for run in _runs(r.ids, r.loss_mask)] == _expected_trained(conv, thinking)
    # everything else is prompt: system, user turns, tool outputs and the assistant openings
    unmasked = tok.decode([i for i, m in zip(r.ids, r.loss_mask) if not m])
    assert unmasked.startswith(BOS) and unmasked.count(A) == sum(m["role"] == "assistant" for m in conv)
    for m in conv:
      if m["role"] in ("user", "tool", "system"):
        assert m["content"] in unmasked


def test_think_blocks_count_in_thinking_mode_and_the_empty_block_is_the_prompt_in_non_thinking(tok):
  conv = [{"role": "user", "content": "What is 2 + 3?"},
          {"role": "assistant", "content": "The answer is 5.", "reasoning_content": "2 + 3 = 5."}]
  think, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
  r = chat.render(conv, tok, thinking=True)
  assert r.text == f"{BOS}{U}What is 2 + 3?{A}<think>2 + 3 = 5.</think>The answer is 5.{EOS}"
  masked = [i for i, m in zip(r.ids, r.loss_mask) if m]
  assert tok.decode(masked) == f"2 + 3 = 5.</think>The answer is 5.{EOS}"
  assert end in masked and think not in masked  # <think> opens the turn in the prompt: the mode is given
  r = chat.render(conv, tok, thinking=False)
  assert r.text == f"{BOS}{U}What is 2 + 3?{A}<think></think>The answer is 5.{EOS}"  # reasoning dropped
  masked = [i for i, m in zip(r.ids, r.loss_mask) if m]
  assert tok.decode(masked) == f"The answer is 5.{EOS}"
  assert think not in masked and end not in masked
  # generation continues from exactly the opening the trained turn followed
  assert tok.decode(chat.render_prompt(conv[:1], tok, thinking=True)) == f"{BOS}{U}What is 2 + 3?{A}<think>"
  assert tok.decode(chat.render_prompt(conv[:1], tok, thinking=False)) == \
      f"{BOS}{U}What is 2 + 3?{A}<think></think>"


def test_train_on_last_and_all(tok):
  conv = cd.conversation(1, turns=3, system=True)
  expected = _expected_trained(conv, True)
  r = chat.render(conv, tok, train_on="last")
  assert [tok.decode(run) for run in _runs(r.ids, r.loss_mask)] == expected[-1:]
  r = chat.render(conv, tok, train_on="all")
  assert all(r.loss_mask)
  with pytest.raises(ConfigError, match="sft.train_on"):
    chat.render(conv, tok, train_on="user")


@pytest.mark.parametrize("thinking", [True, False])
def test_render_then_parse_gives_back_the_conversation(tok, thinking):
  convs = cd.conversations(200, seed=3)
  assert sum(any(m["role"] == "tool" for m in c) for c in convs) >= 30  # system, tools, multi-turn all present
  assert sum(c[0]["role"] == "system" for c in convs) >= 60
  for conv in convs:
    want = conv if thinking else [{k: v for k, v in m.items() if k != "reasoning_content"} for m in conv]
    assert chat.parse(chat.render(conv, tok, thinking=thinking).text, tok) == want


def test_parse_reads_a_prompt_plus_a_generated_reply(tok):
  conv = [{"role": "user", "content": "Repeat the word stone 2 times."}]
  prompt = tok.decode(chat.render_prompt(conv, tok, thinking=True))
  got = chat.parse(prompt + f"stone, 2 times.</think>stone stone{EOS}", tok)
  assert got[-1] == {"role": "assistant", "content": "stone stone", "reasoning_content": "stone, 2 times."}
  got = chat.parse(prompt + "still thinking", tok)  # cut off inside the think block
  assert got[-1] == {"role": "assistant", "content": "", "reasoning_content": "still thinking"}
  # DeepSeek's own BOS / EOS when no tokenizer is given
  assert chat.parse("<｜begin▁of▁sentence｜>S<｜User｜>q<｜Assistant｜><think></think>a<｜end▁of▁sentence｜>") == [
      {"role": "system", "content": "S"}, {"role": "user", "content": "q"},
      {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("jinja_file", [False, True])
def test_builtin_and_an_equivalent_jinja_template_give_identical_ids_and_masks(tok, tmp_path, jinja_file):
  directory = cd.write_tokenizer_dir(tmp_path / "tok", tok, chat.BUILTIN_JINJA, jinja_file=jinja_file)
  template = chat.load_template(directory)
  assert template is not None and template.eos_token == EOS and template.bos_token == BOS
  assert isinstance(chat.load_template(directory + "/tokenizer.json"), chat.ChatTemplate)
  for conv in CONVS[:60]:
    for thinking in (True, False):
      for train_on in ("assistant", "last"):
        a = chat.render(conv, tok, thinking=thinking, train_on=train_on)
        b = chat.render(conv, tok, thinking=thinking, train_on=train_on, template=template)
        assert (a.text, a.ids, a.loss_mask, a.spans) == (b.text, b.ids, b.loss_mask, b.spans)
      prompt = conv[:-1] if conv[-1]["role"] == "assistant" else conv
      assert chat.render_prompt(prompt, tok, thinking=thinking) == \
          chat.render_prompt(prompt, tok, thinking=thinking, template=template)
  # a mid-conversation system message is refused by both
  bad = [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
         {"role": "assistant", "content": "a"}]
  for t in (None, template):
    with pytest.raises(DataError, match="system message"):
      chat.render(bad, tok, template=t)


def test_a_hugging_face_style_template_masks_assistant_turns(tok, tmp_path):
  """A ChatML-like template (no DeepSeek markers, generation tag, tojson): spans from prefix renders."""
  src = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' %}{% generation %}"
         "{{ m.content + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m.content + '<|im_end|>' }}{% endif %}"
         "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
         "{% if false %}{{ messages | tojson }}{% endif %}")
  template = chat.load_template(cd.write_tokenizer_dir(tmp_path / "tok", tok, src))
  conv = cd.conversation(5, turns=2)
  r = chat.render(conv, tok, template=template, thinking=False)
  assert r.text.startswith("<|im_start|>user\n")
  answers = [m["content"] for m in conv if m["role"] == "assistant"]
  assert [tok.decode(run) for run in _runs(r.ids, r.loss_mask)] == [a + "<|im_end|>\n" for a in answers]


def test_a_template_that_rewrites_earlier_turns_cannot_be_masked_per_turn(tok):
  # drops the reasoning of every assistant turn but the last (as several reasoning-model templates do)
  src = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ '<｜User｜>' + m.content }}"
         "{% else %}{{ '<｜Assistant｜><think>' }}{% if loop.last %}{{ m.reasoning_content }}{% endif %}"
         "{{ '</think>' + m.content + eos_token }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>' }}{% endif %}")
  template = chat.ChatTemplate(src, origin="dropping")
  conv = cd.conversation(2, turns=2)
  with pytest.raises(DataError, match="cannot be masked per turn.*train_on=last"):
    chat.render(conv, tok, template=template)
  r = chat.render(conv, tok, template=template, train_on="last")
  assert [tok.decode(run) for run in _runs(r.ids, r.loss_mask)] == _expected_trained(conv, True)[-1:]


@pytest.mark.parametrize("src", [
    "{{ messages.__class__.__mro__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ bos_token.__class__ }}",
])
def test_templates_render_in_a_sandbox(tok, src):
  template = chat.ChatTemplate(src, origin="evil")
  assert isinstance(chat.sandbox(), jinja2.sandbox.ImmutableSandboxedEnvironment)
  with pytest.raises(ConfigError, match="sandbox"):
    chat.render(cd.conversation(0), tok, template=template, train_on="all")


def test_the_sandbox_is_immutable(tok):
  template = chat.ChatTemplate("{% set _ = messages.append(1) %}{{ messages | length }}", origin="mutating")
  with pytest.raises(ConfigError, match="sandbox"):
    chat.render(cd.conversation(0), tok, template=template, train_on="all")


def test_load_template(tmp_path, tok):
  plain = cd.write_tokenizer_dir(tmp_path / "plain", tok)
  assert chat.load_template(plain) is None
  assert chat.load_template("") is None
  with pytest.raises(ConfigError, match="syntax error"):
    chat.ChatTemplate("{% for %}", origin="broken")
  named = tmp_path / "named"
  named.mkdir()
  (named / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
  assert chat.load_template(str(named)).source == "D"
  c = base.get_config()
  assert chat.template_from_config(c) is None  # builtin
  c.data.tokenizer = str(tmp_path / "plain")
  assert chat.template_from_config(c) is None  # the tokenizer ships none: builtin
  c.data.chat_template = str(named / "tokenizer_config.json")
  assert chat.template_from_config(c).source == "D"
  c.data.chat_template = str(tmp_path / "plain")
  with pytest.raises(ConfigError, match="data.chat_template"):
    chat.template_from_config(c)
  c.data.chat_template = "builtin"
  assert chat.template_from_config(c) is None


def test_to_messages_layouts():
  conv = [{"role": "system", "content": "A"}, {"role": "system", "content": "B"},
          {"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>\n\na"}]
  assert chat.to_messages({"messages": conv}, where="f, line 1") == [
      {"role": "system", "content": "A\n\nB"}, {"role": "user", "content": "q"},
      {"role": "assistant", "content": "a", "reasoning_content": "r"}]
  assert chat.to_messages({"prompt": "q", "response": "a", "reasoning": "r", "system": "S"}, where="w") == [
      {"role": "system", "content": "S"}, {"role": "user", "content": "q"},
      {"role": "assistant", "content": "a", "reasoning_content": "r"}]
  assert chat.to_messages({"prompt": [{"role": "user", "content": "q"}], "response": "a"}, where="w") == [
      {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
  calls = [{"id": "x", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]
  got = chat.to_messages({"messages": [{"role": "user", "content": "q"},
                                       {"role": "assistant", "content": None, "tool_calls": calls}]}, where="w")
  assert got[1] == {"role": "assistant", "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "empty"),
    ({"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "role 'human' is not one of"),
    ({"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]},
     r"message 1 \(user\): content is list, not a string"),
    ({"messages": []}, "non-empty list"),
    ({"prompt": "q", "response": ""}, "'response' is empty"),
    ({"prompt": "q", "response": 3}, "'response' is int"),
    ({"text": "q"}, "needs 'messages'"),
])
def test_malformed_rows_name_file_and_row(row, message):
  with pytest.raises(DataError, match=message) as e:
    chat.to_messages(row, where="data.jsonl, line 7")
  assert str(e.value).startswith("data.jsonl, line 7: ") and "\n" not in str(e.value)


def test_control_tokens_in_text_are_refused(tok):
  for text in (f"hi {EOS} there", "a <｜User｜> b", "x</think>y"):
    with pytest.raises(DataError, match="control token"):
      chat.render([{"role": "user", "content": text}, {"role": "assistant", "content": "a"}], tok)
    with pytest.raises(DataError, match="control token"):
      chat.render_prompt([{"role": "user", "content": text}], tok)


def test_a_tokenizer_without_the_markers_still_masks_assistant_text():
  """Markers as ordinary BPE text: a token straddling a span edge counts by its first character."""
  tok = train_tokenizer(cd._texts(200), 400)
  conv = cd.conversation(3, turns=2)
  r = chat.render(conv, tok, thinking=False)
  assert tok.decode(r.ids) == r.text and chat.parse(r.text, tok) == [
      {k: v for k, v in m.items() if k != "reasoning_content"} for m in conv]
  masked = tok.decode([i for i, m in zip(r.ids, r.loss_mask) if m])
  for m in conv:
    if m["role"] == "assistant":
      assert m["content"] in masked
  assert "Repeat" not in masked and "What" not in masked
  grown = chat.add_chat_tokens(tok)
  assert [grown.token_to_id(m) for m in chat.CHAT_MARKERS] == list(range(tok.vocab_size,
                                                                        tok.vocab_size + len(chat.CHAT_MARKERS)))
