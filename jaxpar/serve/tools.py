"""Tool calls in the model's own words, without JAX: which format a checkpoint's chat template
speaks, and the calls parsed out of what the model wrote.

    hermes   (Qwen2.5 / Qwen3)  <tool_call>{"name": ..., "arguments": {...}}</tool_call> ...
    mistral  (Mistral)          [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
    llama3   (Llama 3.x)        {"name": ..., "parameters": {...}} (after <|python_tag|>, or
                                the whole reply; several joined by ";")

The format is read from the template itself (a fine-tune keeps its base's markers), else from
the model family. Text beside the calls stays the message's content. With `tool_choice`
"required" or a named function the reply is constrained to calls in that same format
(`constraint`: a Lark grammar for `jaxpar.serve.grammar`).
"""

import dataclasses
import json
import re
import uuid

from jaxpar.serve.request import RequestError

FORMATS = ("hermes", "mistral", "llama3")
_FAMILIES = {"qwen2": "hermes", "qwen3": "hermes", "mistral": "mistral", "llama": "llama3"}
_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "<|python_tag|>"}
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolCall:
  name: str
  arguments: str  # JSON text, as OpenAI sends it

  def body(self, index: int) -> dict:
    """OpenAI's shape (a streamed delta's too, with its index)."""
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": self.name, "arguments": self.arguments}}


def format_of(template_source: str, family: str) -> str | None:
  """The tool-call format a chat template speaks (None: it renders no tools)."""
  if "<tool_call>" in template_source:
    return "hermes"
  if "[TOOL_CALLS]" in template_source:
    return "mistral"
  if "<|python_tag|>" in template_source or "ipython" in template_source:
    return "llama3"
  return _FAMILIES.get(family) if "tools" in template_source else None


def held_from(text: str, fmt: str) -> int:
  """Where the part of a reply so far that is, or may become, a tool call starts (len(text):
  nothing): a stream sends the text before it only."""
  marker = _MARKERS[fmt]
  at = text.find(marker)
  if at >= 0:
    return at
  if fmt == "llama3" and text.lstrip().startswith("{"):
    return 0
  for k in range(min(len(marker) - 1, len(text)), 0, -1):  # a marker's start, at the end
    if marker.startswith(text[-k:]):
      return len(text) - k
  return len(text)


def constraint(tools: list[dict], fmt: str, forced: str | None,
               special: dict[str, int]) -> str | None:
  """The grammar (Lark, with llguidance's %json) of a reply that `tool_choice` forces to
  calls (`forced`: "required", or a function's name; None: nothing forced), in the model's
  own format `fmt`: one or more calls of the listed tools (of the named one: exactly one),
  each with arguments under its tool's schema. Markers that are special tokens of the
  tokenizer (`special`: text -> id) are written as those tokens."""
  if forced is None:
    return None
  key = "parameters" if fmt == "llama3" else "arguments"
  compact = {"x-guidance": {"whitespace_flexible": False}}
  calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                             key: t["function"].get("parameters") or {
                                                 "type": "object"}},
            "required": ["name", key], "additionalProperties": False} for t in tools
           if forced == "required" or t["function"]["name"] == forced]
  call = "%json " + json.dumps({**compact, "anyOf": calls})
  mark = lambda text: f"<[{special[text]}]>" if text in special else json.dumps(text)
  more = forced == "required"  # one or more calls; a named function: one
  if fmt == "mistral":
    array = {**compact, "type": "array", "items": {"anyOf": calls}, "minItems": 1,
             **({} if more else {"maxItems": 1})}
    return f"start: {mark('[TOOL_CALLS]')} %json {json.dumps(array)}"
  if fmt == "hermes":
    rules = [f"start: one{' (NL one)*' if more else ''}",
             f"one: {mark('<tool_call>')} NL call NL {mark('</tool_call>')}", 'NL: "\\n"']
  else:  # llama3: the calls' JSON, ";"-separated
    rules = [f"start: call{' (SEP call)*' if more else ''}", 'SEP: "; "']
  return "\n".join([*rules, f"call: {call}"])


def parse(text: str, fmt: str) -> tuple[str, list[ToolCall]]:
  """(content, calls) of a whole reply: calls that do not parse as JSON with a name stay
  text."""
  if fmt == "hermes":
    calls = [_call(m.group(1)) for m in _HERMES.finditer(text)]
    if calls and all(calls):
      return _HERMES.sub("", text).strip(), calls
    return text, []
  if fmt == "mistral":
    head, marker, rest = text.partition("[TOOL_CALLS]")
    if not marker:
      return text, []
    try:
      items = json.loads(rest.strip())
    except json.JSONDecodeError:
      return text, []
    items = items if isinstance(items, list) else [items]
    calls = [_call(json.dumps(i)) for i in items]
    return (head.strip(), calls) if calls and all(calls) else (text, [])
  head, marker, rest = text.partition("<|python_tag|>")
  body = rest if marker else text
  calls = [_call(part) for part in body.split(";") if part.strip()]
  if calls and all(calls):
    return (head.strip() if marker else ""), calls
  return text, []


def _call(source: str) -> ToolCall | None:
  """A call from one JSON object with a name and arguments (or Llama's parameters)."""
  try:
    item = json.loads(source)
  except json.JSONDecodeError:
    return None
  if not isinstance(item, dict) or not isinstance(item.get("name"), str):
    return None
  arguments = item.get("arguments", item.get("parameters", {}))
  if isinstance(arguments, str):  # already JSON text
    try:
      arguments = json.loads(arguments)
    except json.JSONDecodeError:
      return None
  if not isinstance(arguments, dict):
    return None
  return ToolCall(item["name"], json.dumps(arguments))


def requested(body: dict, template_source: str,
              family: str) -> tuple[list | None, str | None, str | None]:
  """A chat request's `tools` (to render through the template; None: no tools), the format
  its reply's calls are parsed in (the model's own; None: the reply is text, as with
  `tool_choice` "none"), and what `tool_choice` forces (`constraint`): "required", a
  function's name, or None ("auto"). RequestError (400) for a malformed or unknown tool, or
  a template that renders none."""
  tools, choice = body.get("tools"), body.get("tool_choice")
  if not tools:
    if choice not in (None, "none", "auto"):
      raise RequestError(f"tool_choice={json.dumps(choice)} needs tools", param="tool_choice")
    return None, None, None
  names = [t.get("function", {}).get("name") if isinstance(t, dict) else None
           for t in (tools if isinstance(tools, list) else [None])]
  if not all(isinstance(t, dict) and t.get("type") == "function" and isinstance(n, str)
             and isinstance(t["function"].get("parameters", {}), dict)
             for t, n in zip(tools, names)) or not isinstance(tools, list):
    raise RequestError("tools is invalid: expected a list of {\"type\": \"function\", "
                   "\"function\": {\"name\": ..., \"parameters\": {...}}}", param="tools")
  fmt = format_of(template_source, family)
  if fmt is None:
    raise RequestError("this checkpoint's chat template renders no tools: leave tools out",
                   param="tools")
  choice = "auto" if choice is None else choice
  if choice in ("auto", "none"):
    return tools, fmt if choice == "auto" else None, None
  named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
  if named is not None and named not in names:
    raise RequestError(f"tool_choice names the function {named!r}, which is not among the "
                   f"tools ({', '.join(names)})", param="tool_choice")
  if choice != "required" and named is None:
    raise RequestError(f"tool_choice={json.dumps(choice)} is invalid: expected \"none\", "
                   f"\"auto\", \"required\" or {{\"type\": \"function\", \"function\": "
                   f"{{\"name\": ...}}}}", param="tool_choice")
  return tools, fmt, named or "required"


def template_message(m: dict) -> dict:
  """A message as chat templates read it: an assistant's tool calls' arguments as objects
  (OpenAI sends JSON text)."""
  calls = m.get("tool_calls")
  if not isinstance(calls, list):
    return m
  def call(c):
    f = c.get("function", {}) if isinstance(c, dict) else {}
    arguments = f.get("arguments")
    if isinstance(arguments, str):
      try:
        arguments = json.loads(arguments)
      except json.JSONDecodeError:
        pass
    return {**c, "function": {**f, "arguments": arguments}, **f, "arguments": arguments}
  return {**m, "tool_calls": [call(c) for c in calls]}


class StreamedReply:
  """A streamed reply's text deltas with its tool calls held back: `step(text so far, final)`
  gives the text to send now and, at the end, the calls (sent whole, in one delta)."""

  def __init__(self, fmt: str):
    self.fmt, self.sent = fmt, 0

  def step(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
    if not final:
      limit = max(self.sent, held_from(text, self.fmt))
      new, self.sent = text[self.sent:limit], limit
      return new, []
    content, calls = parse(text, self.fmt)
    return (content if calls else text)[self.sent:], calls
