"""The OpenAI request and response bodies: checked field by field, with errors in OpenAI's own
shape ({"error": {"message", "type", "param", "code"}}), and the chat template.

Only what the engine can honour is accepted: `suffix`, `functions` and chat's `echo` are
refused by name rather than ignored. `tools` are rendered by the chat template, and the calls
parsed out of the reply (`jaxpar.serve.tools`; with `tool_choice` "required" or a named
function the reply is constrained to calls). `response_format` (JSON) and vLLM's regex,
choice and grammar options constrain the output (`jaxpar.serve.grammar`). Completions' `echo`
returns the prompt before the completion (with `logprobs`: the prompt tokens' too, the first
one's null; `max_tokens` 0: the prompt alone, scored). Beside OpenAI's sampling options
(`presence_penalty`, `frequency_penalty`, `logit_bias`, `seed`, `stop`) vLLM's are taken too:
`top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`, `min_tokens`, `ignore_eos`.
Log-probabilities come in OpenAI's two shapes: `logprobs: N` on completions (tokens,
token_logprobs, top_logprobs, text_offset), `logprobs: true` with `top_logprobs: N` on chat
({"content": [{token, logprob, bytes, top_logprobs}]}).
"""

import dataclasses
import datetime
import json
import os
import time
import uuid

from jaxpar.serve.request import MAX_LOGPROBS, Params, TokenLogprobs
from jaxpar.serve.tools import template_message

# Options this server cannot honour, with the values (besides null) that ask for nothing
# and are accepted: what clients send by default.
_UNSUPPORTED = {"suffix": ("",), "functions": ([],)}


def _asks_nothing(value, allowed: tuple) -> bool:
  return value is None or any(type(value) is type(a) and value == a for a in allowed)


class ApiError(Exception):
  """An error the server answers with `status` and OpenAI's error body."""

  def __init__(self, status: int, message: str, *, param: str | None = None,
               kind: str = "invalid_request_error", code: str | None = None):
    super().__init__(message)
    self.status, self.param, self.kind, self.code = status, param, kind, code

  def body(self) -> dict:
    return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                      "code": self.code}}


def engine_failed() -> ApiError:
  return ApiError(500, "the engine failed while decoding this request", kind="server_error")


def shut_down(stream) -> ApiError:
  return ApiError(503, f"the server shut down before this request finished (after "
                  f"{len(stream.token_ids)} new tokens); retry it", kind="server_error",
                  code="shutting_down")


def too_large(size: int, limit: int) -> ApiError:
  return ApiError(413, f"the request body is larger than {limit} bytes ({size} declared or "
                  f"read), the most this server reads (64 per position of its context, at "
                  f"least 1 MiB): shorten the prompt", code="request_too_large")


@dataclasses.dataclass
class Limits:
  model: str          # the name the server answers to
  max_tokens: int     # the most a request may ask for (and the default)
  context: int        # positions per slot: prompt + max_tokens

  @property
  def body_bytes(self) -> int:
    """The largest request body read: 64 bytes per position of context, at least 1 MiB (a
    prompt that fills the context is far smaller; a larger body is refused unread)."""
    return max(2**20, 64 * self.context)


def parse_json(raw: bytes) -> dict:
  try:
    body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ApiError(400, f"the request body is not valid JSON ({e})") from None
  if not isinstance(body, dict):
    raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
  return body


def _field(body: dict, key: str, kinds, default, *, check=None, expect: str = ""):
  value = body.get(key, default)
  if value is None:
    value = default
  if value is default:
    return value
  ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in
                                         (kinds if isinstance(kinds, tuple) else (kinds,)))
  if not ok or (check is not None and not check(value)):
    raise ApiError(400, f"{key}={json.dumps(value)} is invalid: expected {expect}", param=key)
  return value


def check_model(body: dict, limits: Limits) -> None:
  model = body.get("model")
  if model is None:
    raise ApiError(400, f"model is required: this server serves {limits.model!r}",
                   param="model")
  if model != limits.model:
    raise ApiError(404, f"the model {model!r} does not exist: this server serves "
                   f"{limits.model!r}", param="model", code="model_not_found")


COMPLETION_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI's API


def sampling_params(body: dict, limits: Limits, *, prompt_len: int,
                    chat: bool) -> tuple[Params, bool, bool]:
  """(Params, stream, include usage in the stream) from a request body. Without max_tokens
  a request makes up to serve.max_tokens (chat) or 16 (completions) new tokens, as many as
  the context leaves after its prompt."""
  unsupported = {**_UNSUPPORTED, "echo": (False,)} if chat else _UNSUPPORTED
  for key, allowed in unsupported.items():
    if not _asks_nothing(body.get(key), allowed):
      raise ApiError(400, f"{key}={json.dumps(body[key])} is not supported by this server; "
                     f"leave it out", param=key)
  max_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
  default = limits.max_tokens if chat else min(COMPLETION_MAX_TOKENS, limits.max_tokens)
  if limits.context > prompt_len:  # else the prompt alone is too long: the engine says so
    default = min(default, limits.context - prompt_len)
  echo = False if chat else _field(body, "echo", bool, False, expect="true or false")
  least = 0 if echo else 1
  max_tokens = _field(body, max_key, int, default,
                      check=lambda v: least <= v <= limits.max_tokens,
                      expect=f"an integer from {least} to {limits.max_tokens}")
  temperature = _field(body, "temperature", (int, float), 1.0, check=lambda v: 0 <= v <= 2,
                       expect="a number from 0 to 2")
  top_p = _field(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1,
                 expect="a number in (0, 1]")
  top_k = _field(body, "top_k", int, 0, check=lambda v: v >= 0, expect="an integer >= 0")
  seed = _field(body, "seed", int, None, check=lambda v: 0 <= v < 2**32,
                expect="an integer from 0 to 2**32 - 1")
  stop = body.get("stop") or []
  stop = [stop] if isinstance(stop, str) else stop
  if (not isinstance(stop, list) or len(stop) > 4
      or not all(isinstance(s, str) and s for s in stop)):
    raise ApiError(400, f"stop={json.dumps(body.get('stop'))} is invalid: expected a string "
                   f"or a list of up to 4 non-empty strings", param="stop")
  logprobs = _logprobs(body, chat=chat)
  stream = _field(body, "stream", bool, False, expect="true or false")
  options = _field(body, "stream_options", dict, {}, expect="an object")
  params = Params(max_tokens=max_tokens, temperature=float(temperature), top_k=top_k,
                  top_p=float(top_p), seed=seed, stop=tuple(stop), logprobs=logprobs,
                  echo=echo, **_adjustments(body))
  return params, stream, bool(options.get("include_usage"))


def choice_counts(body: dict, *, chat: bool, stream: bool, most: int) -> tuple[int, int]:
  """(n, best_of): how many choices a request returns, and how many candidates it decodes
  (completions only; at least n; not streamed), at most `most` (the engine's slots)."""
  expect = f"an integer from 1 to {most} (serve.max_slots)"
  n = _field(body, "n", int, 1, check=lambda v: 1 <= v <= most, expect=expect)
  best_of = n if chat else _field(body, "best_of", int, n,
                                  check=lambda v: n <= v <= most, expect=expect + " and >= n")
  if best_of > n and stream:
    raise ApiError(400, f"best_of={best_of} cannot be streamed: the best choices are known "
                   f"at the end", param="best_of")
  return n, best_of


def _adjustments(body: dict) -> dict:
  """Params' penalties, biases and stop tokens from a body (their ranges: `request.check`)."""
  number = lambda key, default: float(_field(body, key, (int, float), default,
                                             expect="a number"))
  bias = _field(body, "logit_bias", dict, {}, expect="an object of token ids to numbers")
  if not all(t.isdigit() and isinstance(b, (int, float)) and not isinstance(b, bool)
             for t, b in bias.items()):
    raise ApiError(400, f"logit_bias={json.dumps(bias)[:80]} is invalid: expected an object "
                   f"of token ids (as strings) to numbers", param="logit_bias")
  bias = tuple((int(t), float(b)) for t, b in bias.items())
  ids = _field(body, "stop_token_ids", list, [], expect="a list of token ids")
  if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
    raise ApiError(400, f"stop_token_ids={json.dumps(ids)[:80]} is invalid: expected a list "
                   f"of token ids", param="stop_token_ids")
  return dict(presence_penalty=number("presence_penalty", 0.0),
              frequency_penalty=number("frequency_penalty", 0.0),
              repetition_penalty=number("repetition_penalty", 1.0),
              min_p=number("min_p", 0.0), logit_bias=bias, stop_token_ids=tuple(ids),
              min_tokens=_field(body, "min_tokens", int, 0, expect="an integer"),
              ignore_eos=_field(body, "ignore_eos", bool, False, expect="true or false"))


def _logprobs(body: dict, *, chat: bool) -> int | None:
  """How many alternatives per token the request asks for (None: no log-probabilities):
  completions' `logprobs: N`; chat's `logprobs: true` with `top_logprobs: N` (0 without)."""
  count = f"an integer from 0 to {MAX_LOGPROBS}"
  in_range = lambda v: 0 <= v <= MAX_LOGPROBS
  if not chat:
    if body.get("logprobs") is False:  # what some clients send for "none"
      return None
    return _field(body, "logprobs", int, None, check=in_range, expect=count)
  wanted = _field(body, "logprobs", bool, False, expect="true or false")
  top = _field(body, "top_logprobs", int, None, check=in_range, expect=count)
  if top and not wanted:
    raise ApiError(400, f"top_logprobs={top} needs logprobs=true", param="top_logprobs")
  return (top or 0) if wanted else None


def completion_prompt(body: dict, tokenizer) -> list[int]:
  """`prompt` as text (needs the tokenizer), or as token ids; one prompt per request."""
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]
  if isinstance(prompt, str):
    if tokenizer is None:
      raise ApiError(400, "prompt is text but the checkpoint has no tokenizer.json: send "
                     "token ids (a list of integers)", param="prompt")
    return tokenizer.encode(prompt).ids
  if (isinstance(prompt, list) and prompt
      and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
    return prompt
  raise ApiError(400, f"prompt is invalid: expected a string or a non-empty list of token ids "
                 f"(one prompt per request), got {json.dumps(prompt)[:80]}", param="prompt")


def echo_text(body: dict, prompt: list[int], tokenizer) -> str:
  """The text an echo sends back: the prompt as given, or its token ids' text."""
  given = body.get("prompt")
  if isinstance(given, list) and len(given) == 1 and isinstance(given[0], str):
    given = given[0]
  if isinstance(given, str):
    return given
  return tokenizer.decode(prompt, skip_special_tokens=False) if tokenizer is not None else ""


def text_tokens(body: dict, tokenizer) -> list[int]:
  """/tokenize's `prompt` (text) as token ids; `add_special_tokens` (default true)."""
  prompt = body.get("prompt")
  if not isinstance(prompt, str):
    raise ApiError(400, f"prompt is invalid: expected a string (or give \"messages\"), got "
                   f"{json.dumps(prompt)[:80]}", param="prompt")
  if tokenizer is None:
    raise ApiError(400, "the checkpoint has no tokenizer.json: nothing to tokenize with",
                   param="prompt")
  special = _field(body, "add_special_tokens", bool, True, expect="true or false")
  return tokenizer.encode(prompt, add_special_tokens=special).ids


def detokenize(body: dict, tokenizer, vocab_size: int) -> str:
  """/detokenize's `tokens` as text."""
  tokens = body.get("tokens")
  if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           and 0 <= t < vocab_size for t in tokens)):
    raise ApiError(400, f"tokens is invalid: expected a list of token ids from 0 to "
                   f"{vocab_size - 1}, got {json.dumps(tokens)[:80]}", param="tokens")
  if tokenizer is None:
    raise ApiError(400, "the checkpoint has no tokenizer.json: nothing to detokenize with",
                   param="tokens")
  return tokenizer.decode(tokens, skip_special_tokens=False)


def chat_prompt(body: dict, template, tokenizer, tools: list | None = None) -> list[int]:
  """The messages (and `tools`) rendered by the checkpoint's chat template, then tokenized."""
  if template is None or tokenizer is None:
    raise ApiError(400, "chat completions need a chat template and tokenizer.json in the "
                   "checkpoint; use /v1/completions", param="messages")
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, "messages is invalid: expected a non-empty list of "
                   "{\"role\": ..., \"content\": \"...\"} objects", param="messages")
  messages = [_message(m, i) for i, m in enumerate(messages)]
  try:
    text = template.render(messages=messages, tools=tools)
  except Exception as e:  # the template's own raise_exception, or a template error
    raise ApiError(400, f"the chat template refused the messages: {e}",
                   param="messages") from None
  return tokenizer.encode(text, add_special_tokens=False).ids


def _message(m, i: int) -> dict:
  """A message with its content as one string: a list of text parts joined by newlines, an
  assistant's null content (beside tool calls) empty."""
  if not isinstance(m, dict) or not isinstance(m.get("role"), str):
    raise ApiError(400, f"messages[{i}] is invalid: expected an object with a \"role\" and a "
                   f"\"content\"", param="messages")
  content = m.get("content")
  if content is None and m["role"] == "assistant":
    content = ""
  elif isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
    content = "\n".join(p["text"] for p in content)
  if not isinstance(content, str):
    raise ApiError(400, f"messages[{i}].content is invalid: expected a string or a list of "
                   f"{{\"type\": \"text\", \"text\": \"...\"}} parts (this server reads "
                   f"text only)", param="messages")
  return {**m, "content": content}


class ChatTemplate:
  """A checkpoint's chat template (chat_template.jinja, or tokenizer_config.json's
  `chat_template`), rendered by jinja2's sandbox as Hugging Face does."""

  def __init__(self, source: str, special: dict):
    import jinja2.sandbox

    def raise_exception(message):
      raise ValueError(message)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent,
                                                              ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    self._template, self._special = env.from_string(source), special
    self.source = source

  def render(self, *, messages: list[dict], tools: list | None = None) -> str:
    return self._template.render(messages=[template_message(m) for m in messages],
                                 tools=tools, add_generation_prompt=True, **self._special)

  @staticmethod
  def load(checkpoint: str) -> "ChatTemplate | None":
    if not checkpoint:
      return None
    config = {}
    path = os.path.join(checkpoint, "tokenizer_config.json")
    if os.path.isfile(path):
      with open(path) as f:
        config = json.load(f)
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: the default one
      source = next((t["template"] for t in source if t.get("name") == "default"), None)
    jinja = os.path.join(checkpoint, "chat_template.jinja")
    if os.path.isfile(jinja):
      with open(jinja) as f:
        source = f.read()
    if not source:
      return None
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
      value = config.get(key)
      special[key] = value.get("content") if isinstance(value, dict) else value
    return ChatTemplate(source, {k: v for k, v in special.items() if v is not None})


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}


def choice(chat: bool, text: str, token_ids: list[int], finish: str | None, *,
           delta: bool, logprobs: dict | None = None, index: int = 0) -> dict:
  """Choice `index`; `token_ids` is jaxpar's addition (the text's tokens, EOS included);
  `logprobs` from `completion_logprobs` or `chat_logprobs`."""
  out = {"index": index, "finish_reason": finish, "token_ids": token_ids, "logprobs": logprobs}
  if not chat:
    return {**out, "text": text}
  if delta:
    return {**out, "delta": {"content": text} if text else {}}
  return {**out, "message": {"role": "assistant", "content": text}}


def completion_logprobs(entries: list[TokenLogprobs | None], token_ids: list[int],
                        token_text, offset: int = 0) -> dict:
  """Completions' shape: each token's text, log-probability, {text: log-probability} of its
  alternatives (null for an echoed prompt's first token), and where its text starts (from
  `offset`, in the choice's text)."""
  tokens = [token_text(t) for t in token_ids]
  starts = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
  return {"tokens": tokens, "token_logprobs": [e and e.logprob for e in entries],
          "top_logprobs": [e and {token_text(i): v for i, v in e.top} for e in entries],
          "text_offset": starts}


def chat_logprobs(entries: list[TokenLogprobs], token_ids: list[int], token_text) -> dict:
  """Chat's shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
  def item(token: int, logprob: float) -> dict:
    text = token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
  return {"content": [{**item(t, e.logprob), "top_logprobs": [item(i, v) for i, v in e.top]}
                      for t, e in zip(token_ids, entries)], "refusal": None}


def envelope(chat: bool, rid: str, model: str, choices: list[dict], *, chunk: bool) -> dict:
  kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else (
      "text_completion")
  return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
          "choices": choices}
