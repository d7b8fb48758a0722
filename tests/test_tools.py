"""Tool calls: each family's format parsed from scripted replies, whole and streamed a few
characters at a time; the requests that cannot be honoured refused by name."""

import json

import pytest

from jaxpar.serve import openai_api, tools
from jaxpar.serve.request import RequestError

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
  assert tools.requested({"tools": TOOLS}, "<tool_call>", "qwen2") == (TOOLS, "hermes")
  assert tools.requested({"tools": TOOLS, "tool_choice": "none"}, "<tool_call>",
                         "qwen2") == (TOOLS, None)
  assert tools.requested({"tools": TOOLS, "tool_choice": "required"}, "<tool_call>",
                         "qwen2") == (TOOLS, tools.REQUIRED)
  named = {"type": "function", "function": {"name": "time"}}
  assert tools.requested({"tools": TOOLS, "tool_choice": named}, "<tool_call>",
                         "qwen2") == (TOOLS, tools.NAMED + "time")


def test_constrained_replies_parse_into_calls():
  """tool_choice "required": a JSON list of calls; named: the arguments alone (vLLM's)."""
  reply = json.dumps([{"name": "weather", "parameters": WEATHER}, {"name": "time",
                                                                   "parameters": {}}])
  assert as_pairs(tools.parse(reply, tools.REQUIRED)[1]) == CALLS
  assert as_pairs(tools.parse(json.dumps(WEATHER), tools.NAMED + "weather")[1]) == CALLS[:1]
  assert tools.parse('[{"name": "wea', tools.REQUIRED) == ('[{"name": "wea', [])  # cut short
  schema = tools.constraint(TOOLS, tools.REQUIRED)
  assert schema["type"] == "array" and len(schema["items"]["anyOf"]) == 2
  assert tools.constraint(TOOLS, tools.NAMED + "weather") == TOOLS[0]["function"]["parameters"]
  assert tools.constraint(TOOLS, "hermes") is None
