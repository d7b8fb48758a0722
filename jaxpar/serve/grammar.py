"""Structured output, without JAX: a request's format as a grammar, and per request a matcher
that says which tokens may come next.

    response_format  {"type": "json_object"}                  any JSON object
                     {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}
    vLLM's options   guided_json, guided_regex, guided_choice, guided_grammar (Lark), or
                     structured_outputs: {"json" | "regex" | "choice" | "grammar": ...}

The grammars are llguidance's (picked by measurement: `benchmarks/grammar_libraries.py`):
compiling a schema takes about a millisecond and a token mask about 15 us, with no
dependency. A mask is packed bits, [W] int32 per row (W = ceil(vocab / 32); token t may come
when bit t % 32 of word t // 32 is set), as the decode step applies it
(`jaxpar.runtime.sampling.allow`). JSON is written compact (no free whitespace: a model
cannot pad an answer with blanks).
"""

import json

import numpy as np

from jaxpar.serve.request import RequestError

JSON_OPTIONS = {"whitespace_flexible": False}
ALL = -1  # a mask word that allows its 32 tokens

# vLLM's names for what a request constrains its output to, and the llguidance grammar each
# one makes (structured_outputs' keys, then the older guided_* fields).
_KINDS = ("json", "regex", "choice", "grammar")


def requested(body: dict, calls: str | None = None) -> tuple[str, object, str] | None:
  """The format a request body asks for, as (kind, value, the parameter that gave it), or
  None; `calls`: the grammar `tool_choice` constrains the reply to (`tools.constraint`).
  RequestError for a malformed one, or for two."""
  asked = [] if calls is None else [("grammar", calls, "tool_choice")]
  fmt = body.get("response_format")
  if fmt is not None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
      spec = fmt.get("json_schema")
      schema = spec.get("schema") if isinstance(spec, dict) else None
      if not isinstance(schema, dict):
        raise RequestError("response_format.json_schema is invalid: expected {\"name\": ..., "
                           "\"schema\": {...}}", param="response_format")
      asked.append(("json", schema, "response_format"))
    elif kind == "json_object":
      asked.append(("json", {"type": "object"}, "response_format"))
    elif kind != "text":
      raise RequestError(f"response_format={json.dumps(fmt)[:80]} is invalid: expected type "
                         f"\"text\", \"json_object\" or \"json_schema\"",
                         param="response_format")
  outputs = body.get("structured_outputs")
  if outputs is not None:
    given = [k for k in _KINDS if isinstance(outputs, dict) and outputs.get(k) is not None]
    if len(given) != 1:
      raise RequestError(f"structured_outputs={json.dumps(outputs)[:80]} is invalid: expected "
                         f"one of {', '.join(_KINDS)}", param="structured_outputs")
    asked.append((given[0], outputs[given[0]], "structured_outputs"))
  asked += [(kind, body[f"guided_{kind}"], f"guided_{kind}") for kind in _KINDS
            if body.get(f"guided_{kind}") is not None]
  if len(asked) > 1:
    raise RequestError(f"{asked[0][2]} and {asked[1][2]} both constrain the output: give "
                       f"one", param=asked[1][2])
  return asked[0] if asked else None


def grammar_text(kind: str, value, param: str) -> str:
  """llguidance's grammar for a format (RequestError for a value of the wrong type)."""
  import llguidance
  expected = {"json": (dict, str), "regex": str, "choice": list, "grammar": str}[kind]
  if not isinstance(value, expected) or (kind == "choice" and not (
      value and all(isinstance(c, str) for c in value))):
    what = {"json": "a JSON schema", "regex": "a regular expression", "choice":
            "a non-empty list of strings", "grammar": "a Lark grammar"}[kind]
    raise RequestError(f"{param}={json.dumps(value)[:80]} is invalid: expected {what}",
                       param=param)
  if kind == "json":
    schema = json.loads(value) if isinstance(value, str) else value
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
  if kind == "regex":
    return llguidance.LLMatcher.grammar_from_regex(value)
  if kind == "choice":
    return llguidance.LLMatcher.grammar_from_lark(
        "start: " + " | ".join(json.dumps(c) for c in value))
  return llguidance.LLMatcher.grammar_from_lark(value)


class Grammars:
  """Grammars over one tokenizer (a `tokenizers.Tokenizer`) and a model of `vocab_size`
  tokens that ends on `eos_ids`."""

  def __init__(self, tokenizer, vocab_size: int, eos_ids):
    import llguidance
    eos = list(eos_ids) or [vocab_size - 1]  # no EOS: a finished grammar ends the request
    self._tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size,
                                             eos_token=eos if len(eos) > 1 else eos[0])

  def compile(self, kind: str, value, param: str) -> str:
    """The grammar of a format, checked against the tokenizer: RequestError naming `param`
    for one that does not compile."""
    import llguidance
    grammar = grammar_text(kind, value, param)
    error = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
    if error:
      raise RequestError(f"{param} does not compile: {error.splitlines()[0][:200]}",
                         param=param)
    return grammar

  def matcher(self, grammar: str):
    """A fresh matcher of `grammar` (one per request)."""
    import llguidance
    return llguidance.LLMatcher(self._tokenizer, grammar)


def words(vocab_size: int) -> int:
  """The int32 words of a row's mask: 32 tokens each."""
  return -(-vocab_size // 32)


def masks(matchers, width: int) -> np.ndarray:
  """[len(matchers), width]: the tokens each matcher allows next (None: every token)."""
  out = np.full((len(matchers), width), ALL, np.int32)
  for row, matcher in zip(out, matchers):
    if matcher is not None:
      matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
  return out
