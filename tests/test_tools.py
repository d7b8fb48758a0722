"""Tool calls: each family's format parsed from scripted replies, whole and streamed a few
characters at a time; the requests that cannot be honoured refused by name."""

import json

import pytest

from jaxpar.serve import openai_api, tools
from jaxpar.serve.request import RequestError
from tests.conftest import byte_bpe

WEATHER = {"city": "Paris", "days": [1, 2], "units": {"metric": True}}
REPLIES = {  # (format, a reply as the family's models write it, content beside the calls)
    "hermes": ('Let me look.\n<tool_call>\n{"name": "weather", "arguments": '
               + json.dumps(WEATHER) + '}\n</tool_call>\n<tool_call>\n{"name": "time", '
               '"arguments": {}}\n</tool_call>', "Let me look."),
    "mistral": ('[TOOL_CALLS][{"name": "weather", "arguments": ' + json.dumps(WEATHER)
                + '}, {"name": "time", "arguments": {}}]', ""),
    "llama3": ('<|python_tag|>{"name": "weather", "parameters": ' + json.dumps(WEATHER)
               + '}; {"name": "time", "parameters": {}}', ""),
}
CALLS = [("weather", WEATHER), ("time", {})]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "time"}}]


def as_pairs(calls):
  return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("fmt", tools.FORMATS)
def test_each_format_parses_whole_and_streamed(fmt):
  reply, content = REPLIES[fmt]
  got_content, calls = tools.parse(reply, fmt)
  assert got_content == content and as_pairs(calls) == CALLS
  # Streamed 3 characters at a time: the text sent before the end is the content only, and
  # the deltas assemble to the same content and calls.
  stream, sent, streamed = tools.StreamedReply(fmt), "", []
  for end in range(3, len(reply) + 3, 3):
    final = end >= len(reply)
    text, calls = stream.step(reply[:end], final)
    sent += text
    streamed += calls
    if not final:
      assert content.startswith(sent.strip()) or not sent.strip()
  assert sent.strip() == content and as_pairs(streamed) == CALLS
  # OpenAI's shape: arguments as JSON text, an id per call.
  body = calls[0].body(0)
  assert body["type"] == "function" and body["id"].startswith("call_")
  assert json.loads(body["function"]["arguments"]) == WEATHER


@pytest.mark.parametrize("fmt", tools.FORMATS)
def test_plain_text_and_broken_calls_stay_text(fmt):
  for text in ("The weather is fine.", "Use <tool or [TOOL or {curly} braces",
               REPLIES[fmt][0][:-5]):  # a call cut short: not valid JSON
    content, calls = tools.parse(text, fmt)
    assert (content, calls) == (text, [])
    stream = tools.StreamedReply(fmt)
    sent = "".join(stream.step(text[:end], end >= len(text))[0]
                   for end in range(4, len(text) + 4, 4))
    assert sent == text  # held back while it might become a call, then sent


def test_the_template_names_its_format():
  assert tools.format_of("{{ '<tool_call>' }}{% for t in tools %}...", "qwen2") == "hermes"
  assert tools.format_of("[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS]", "mistral") == "mistral"
  assert tools.format_of("<|start_header_id|>ipython<|end_header_id|>", "llama") == "llama3"
  assert tools.format_of("{% for t in tools %}{{ t }}{% endfor %}", "qwen3") == "hermes"
  assert tools.format_of("{{ messages }}", "llama") is None  # renders no tools


def test_tools_render_through_the_template_with_arguments_as_objects():
  template = openai_api.ChatTemplate(
      "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}"
      "{% for c in m.tool_calls or [] %}{{ c.function.name }}({{ c.function.arguments.city }})"
      "{% endfor %}{{ m.content }}{% endfor %}", {})
  call = {"id": "call_1", "type": "function",
          "function": {"name": "weather", "arguments": json.dumps({"city": "Oslo"})}}
  text = template.render(messages=[{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "", "tool_calls": [call]},
                                   {"role": "tool", "content": "sunny"}], tools=TOOLS)
  assert text == "[weather][time]hiweather(Oslo)sunny"


@pytest.mark.parametrize("choice,param,message", [
    ({"type": "function", "function": {"name": "stocks"}}, "tool_choice", "not among the tools"),
    ("sometimes", "tool_choice", "is invalid"),
])
def test_what_cannot_be_honoured_is_refused_by_name(choice, param, message):
  body = {"tools": TOOLS, "tool_choice": choice}
  with pytest.raises(RequestError, match=message) as e:
    tools.requested(body, "<tool_call>", "qwen2")
  assert e.value.param == param and e.value.status == 400
  with pytest.raises(RequestError, match="renders no tools"):
    tools.requested({"tools": TOOLS}, "{{ messages }}", "gpt2")
  with pytest.raises(RequestError, match="tools is invalid"):
    tools.requested({"tools": [{"type": "function"}]}, "<tool_call>", "qwen2")
  assert tools.requested({"tools": TOOLS}, "<tool_call>", "qwen2") == (TOOLS, "hermes", None)
  assert tools.requested({"tools": TOOLS, "tool_choice": "none"}, "<tool_call>",
                         "qwen2") == (TOOLS, None, None)
  assert tools.requested({"tools": TOOLS, "tool_choice": "required"}, "[TOOL_CALLS]",
                         "mistral") == (TOOLS, "mistral", "required")
  named = {"type": "function", "function": {"name": "time"}}
  assert tools.requested({"tools": TOOLS, "tool_choice": named}, "<tool_call>",
                         "qwen2") == (TOOLS, "hermes", "time")


def byte_tokenizer():
  """A byte-level BPE trained on a little JSON, with the markers of Mistral and Llama 3 as
  special tokens (Hermes' <tool_call> is text, as in Qwen's tokenizers)."""
  return byte_bpe([json.dumps(WEATHER), "<tool_call> </tool_call>"] * 20, 300,
                  ["<|endoftext|>", "[TOOL_CALLS]", "<|python_tag|>"])


# Tools whose calls a random model completes (bounded strings and numbers; test_structured's
# live server too).
BOUNDED_TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "days"], "additionalProperties": False}}},
                 {"type": "function", "function": {"name": "time", "parameters": {
                     "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                     "required": ["zone"], "additionalProperties": False}}}]


@pytest.mark.parametrize("fmt", tools.FORMATS)
def test_constrained_calls_parse_in_each_format(fmt):
  """A reply drawn at random among the tokens llguidance allows under `constraint` ends as
  the grammar completes and parses, in the family's own format, into calls of the listed
  tools with arguments valid under their schemas: one or more ("required"), exactly one of
  the named function."""
  import jsonschema
  import llguidance
  import numpy as np
  from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
  tokenizer = byte_tokenizer()
  vocab = tokenizer.get_vocab_size()
  ll = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab, eos_token=0)
  special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
  schemas = {t["function"]["name"]: t["function"]["parameters"] for t in BOUNDED_TOOLS}
  rng = np.random.default_rng(0)
  for forced in ("required", "time"):
    for _ in range(5):
      matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(
          tools.constraint(BOUNDED_TOOLS, fmt, forced, special)))
      assert not matcher.is_error(), matcher.get_error()
      mask, ids = allocate_token_bitmask(1, vocab), []
      while not matcher.is_stopped():
        fill_next_token_bitmask(matcher, mask)
        allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab])
        ids.append(int(rng.choice(allowed)))
        assert matcher.consume_token(ids[-1]) and len(ids) < 400
      reply = [t for t in ids if t != 0]  # without EOS, as the server decodes a reply
      content, calls = tools.parse(tokenizer.decode(reply, skip_special_tokens=False), fmt)
      assert content == "" and calls and (forced == "required" or len(calls) == 1)
      for call in calls:
        assert forced in ("required", call.name)
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
      if fmt == "mistral":  # the marker is the special token, not its text spelled out
        assert ids[0] == special["[TOOL_CALLS]"]
