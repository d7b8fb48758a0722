"""Structured output: answers constrained to JSON schemas, regexes, choices and tool calls, from
a random-weight model (which never writes JSON by chance), checked by an independent validator
(`jsonschema`), streamed and not, beside unconstrained requests in the same batch.

The checkpoint is a random Qwen2 with a byte-level BPE tokenizer (trained here on a little
JSON, so tokens span several characters) and a chat template that renders tools in the
Hermes format; the server runs on data=2 x model=4 (the vocabulary, and so each mask, split
four ways), and the Python API on a pipeline.
"""

import concurrent.futures
import json
import re

import jsonschema
import numpy as np
import pytest

from jaxpar import config as config_lib
from jaxpar import serve
from jaxpar.mesh import make_mesh
from jaxpar.serve import grammar, openai_api
from tests.conftest import byte_bpe, serving, write_hf_decoder
from tests.test_serve import hf_greedy, post
from tests.test_tools import BOUNDED_TOOLS as TOOLS

VOCAB = 401  # the model's; the tokenizer's is smaller (ids past it never allowed)
SLOTS = 8
TEMPLATE = ("{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function.name }} "
            "{% endfor %}</tools> answer in <tool_call></tool_call><|im_end|>\n{% endif %}"
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}<|im_start|>assistant\n")
CORPUS = ['{"name": "Ada", "age": 36, "tags": ["x", "y"], "ok": true, "score": -1.5e3}',
          '[{"id": 7, "city": "Paris", "note": null}, {"id": 8, "items": [1, 2, 3]}]',
          "The quick brown fox jumps over the lazy dog 5 false"] * 20


def schemas(count: int, seed: int = 0) -> list[dict]:
  """`count` schemas: objects of 1-4 required (and some optional) properties, each a bounded
  string, a regex string, an enum, an integer or number in a range, a boolean, an array of
  up to 3 such, or a nested object."""
  rng = np.random.default_rng(seed)

  def value(depth: int) -> dict:
    kind = rng.integers(0, 8 if depth < 2 else 6)
    if kind == 0:
      return {"type": "string", "maxLength": int(rng.integers(1, 8))}
    if kind == 1:
      return {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]{1,3}$"}
    if kind == 2:
      return {"enum": ["red", "green", 3, None][:int(rng.integers(2, 5))]}
    if kind == 3:
      low = int(rng.integers(-50, 50))
      return {"type": "integer", "minimum": low, "maximum": low + int(rng.integers(0, 200))}
    if kind == 4:
      return {"type": "number", "minimum": -10, "maximum": 10}
    if kind == 5:
      return {"type": "boolean"}
    if kind == 6:
      return {"type": "array", "items": value(depth + 1), "minItems": 1, "maxItems": 3}
    return obj(depth + 1)

  def obj(depth: int) -> dict:
    names = [f"k{i}" for i in range(int(rng.integers(1, 5)))]
    required = [n for n in names if rng.random() < 0.7] or names[:1]
    return {"type": "object", "properties": {n: value(depth) for n in names},
            "required": required, "additionalProperties": False}
  return [obj(0) for _ in range(count)]


SCHEMAS = schemas(50)
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  import transformers
  path = write_hf_decoder(tmp_path_factory.mktemp("structured"), "qwen2", vocab_size=VOCAB,
                          max_position_embeddings=256, eos_token_id=0)
  tokenizer = byte_bpe(CORPUS, 380, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                                              eos_token="<|endoftext|>")
  fast.chat_template = TEMPLATE
  fast.save_pretrained(path)
  return path


def engine_for(root, checkpoint, devices, *sets):
  from tokenizers import Tokenizer
  config = config_lib.load(root / "configs" / "tiny.yaml", [
      f"model.checkpoint={checkpoint}", f"serve.max_slots={SLOTS}", "serve.max_len=256",
      "serve.min_bucket=64", "serve.precompile=false", *sets])
  tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
  engine = serve.build(config, make_mesh(config.mesh, devices=devices), tokenizer=tokenizer,
                       progress=False)
  return engine, tokenizer


@pytest.fixture(scope="module")
def live(root, checkpoint, devices):
  engine, tokenizer = engine_for(root, checkpoint, devices, "mesh.data=2", "mesh.model=4")
  limits = openai_api.Limits(model="m", max_tokens=200, context=engine.length)
  with serving(engine.start(), limits, tokenizer, checkpoint) as url:
    yield url, engine


@pytest.fixture(scope="module")
def client(live):
  import openai
  return openai.OpenAI(base_url=live[0] + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def hf(checkpoint):
  import torch
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(checkpoint,
                                                           dtype=torch.float32).eval()


def ask(client, i: int, schema: dict, *, stream: bool) -> str:
  """Request i's answer under `schema` (a chat reply, sampled with seed i)."""
  kw = dict(model="m", messages=[{"role": "user", "content": f"give me JSON number {i}"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": f"s{i}", "schema": schema}},
            temperature=1.0, seed=i, max_tokens=200)
  if not stream:
    reply = client.chat.completions.create(**kw)
    assert reply.choices[0].finish_reason == "stop", reply
    return reply.choices[0].message.content
  chunks = list(client.chat.completions.create(**kw, stream=True))
  assert chunks[-1].choices[0].finish_reason == "stop"
  return "".join(c.choices[0].delta.content or "" for c in chunks)


def test_fifty_schemas_beside_unconstrained_requests(client, hf):
  """Every answer is valid JSON under its schema (half streamed); greedy requests without a
  format, in the same batches, give transformers' tokens."""
  plain = [[5 + i, 17, 40 + 3 * i] for i in range(6)]
  with concurrent.futures.ThreadPoolExecutor(SLOTS) as pool:
    answers = [pool.submit(ask, client, i, s, stream=i % 2 == 1) for i, s in enumerate(SCHEMAS)]
    others = [pool.submit(lambda p: client.completions.create(
        model="m", prompt=p, max_tokens=12, temperature=0).choices[0].token_ids, p)
              for p in plain]
    for i, (schema, answer) in enumerate(zip(SCHEMAS, answers)):
      jsonschema.validate(json.loads(answer.result()), schema)
    for p, tokens in zip(plain, others):
      assert tokens.result() == hf_greedy(hf, p, 12)


def test_json_object_regex_choice_and_grammar(client, checkpoint):
  def chat(**kw):
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "go"}], temperature=1.0, seed=3,
        max_tokens=200, **kw)
    return reply.choices[0].message.content, reply.choices[0].finish_reason
  text, reason = chat(response_format={"type": "json_object"},
                      logit_bias={**closing(checkpoint, '"'), **closing(checkpoint, "}")})
  assert isinstance(json.loads(text), dict) and reason == "stop"
  for seed in range(3):
    reply = client.completions.create(model="m", prompt="id:", max_tokens=20, seed=seed,
                                      temperature=1.0,
                                      extra_body={"guided_regex": "[a-z]{3}-[0-9]{2}"})
    assert re.fullmatch("[a-z]{3}-[0-9]{2}", reply.choices[0].text), reply.choices[0].text
  text, _ = chat(extra_body={"guided_choice": ["yes", "no", "maybe not"]})
  assert text in ("yes", "no", "maybe not")
  lark = 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,2}/'
  text, _ = chat(extra_body={"structured_outputs": {"grammar": lark}})
  assert re.fullmatch(r"\(\d{1,2}(,\d{1,2})*\)", text), text


def closing(checkpoint, text: str) -> dict:
  """A logit_bias that favours the tokens ending in `text`: a random model ends a free
  string, or a list of calls, rarely without it."""
  from tokenizers import Tokenizer
  tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
  return {str(t): 8 for t in range(tokenizer.get_vocab_size())
          if tokenizer.decode([t]).endswith(text)}


def test_tool_choice_required_and_named_constrain_the_call(client, checkpoint):
  """The calls, written in the template's own format (Hermes' <tool_call>), are valid under
  their tools' schemas, and streamed deltas assemble to the calls of the whole reply (the
  same seed: the same tokens)."""
  def calls(choice, stream: bool):
    kw = dict(model="m", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS,
              tool_choice=choice, temperature=1.0, seed=1, max_tokens=160,
              logit_bias={"0": 5})  # EOS: a random model ends its list of calls rarely
    if not stream:
      reply = client.chat.completions.create(**kw).choices[0]
      assert reply.finish_reason == "tool_calls"
      return [(c.function.name, json.loads(c.function.arguments))
              for c in reply.message.tool_calls]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    return [(c.function.name, json.loads(c.function.arguments))
            for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
  schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
  made = calls("required", stream=False)
  assert made and calls("required", stream=True) == made
  for name, arguments in made:
    jsonschema.validate(arguments, schemas[name])
  named = {"type": "function", "function": {"name": "time"}}
  [(name, arguments)] = calls(named, stream=False)
  assert name == "time" and calls(named, stream=True) == [(name, arguments)]
  jsonschema.validate(arguments, schemas["time"])


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}},
     "response_format", "does not compile"),
    ({"response_format": {"type": "yaml"}}, "response_format", "is invalid"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "is invalid"),
    ({"guided_regex": "[a-"}, "guided_regex", "does not compile"),
    ({"guided_choice": []}, "guided_choice", "is invalid"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs",
     "does not compile"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex",
     "both constrain"),
    ({"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"},
     "response_format", "both constrain"),
]


@pytest.mark.parametrize("extra,param,message", BAD)
def test_a_format_that_does_not_compile_is_a_400_naming_it(live, client, extra, param,
                                                           message):
  body = {"model": "m", "messages": [{"role": "user", "content": "go"}], **extra}
  code, answer = post(live[0] + "/v1/chat/completions", json.dumps(body))
  assert code == 400, answer
  assert answer["error"]["param"] == param and message in answer["error"]["message"]
  reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                         response_format={"type": "json_object"}, seed=0,
                                         max_tokens=80)
  assert isinstance(json.loads(reply.choices[0].message.content), dict)


def reference_greedy(hf, checkpoint, prompt: list[int], schema: dict, new: int) -> list[int]:
  """Greedy decoding under `schema` by transformers' logits and llguidance's own masks
  (its NumPy helpers), one token at a time: until the grammar is complete, EOS or `new`."""
  import llguidance
  import torch
  from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
  tokenizer = llguidance.LLTokenizer((checkpoint / "tokenizer.json").read_text(),
                                     n_vocab=VOCAB, eos_token=0)
  matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(
      schema, defaults={"whitespace_flexible": False}))
  mask, out = allocate_token_bitmask(1, VOCAB), []
  while len(out) < new and not matcher.is_stopped():
    with torch.no_grad():
      logits = hf(torch.tensor([prompt + out])).logits[0, -1].numpy()
    fill_next_token_bitmask(matcher, mask)
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:VOCAB].astype(bool)
    out.append(int(np.argmax(np.where(allowed, logits, -np.inf))))
    assert matcher.consume_token(out[-1])
    if out[-1] == 0:
      break
  return out


def check_greedy(engine, tokenizer, hf, checkpoint) -> None:
  """Greedy tokens under a schema equal transformers' argmax over the tokens llguidance
  allows, with unconstrained greedy rows (transformers' tokens, to EOS) between them."""
  prompts = [tokenizer.encode(f"JSON {i}:").ids for i in range(SLOTS)]
  streams = []
  for i, prompt in enumerate(prompts):
    rules = engine.grammar("json", SCHEMAS[i], "response_format") if i % 2 else None
    streams.append(engine.submit(prompt, serve.Params(max_tokens=24, grammar=rules)))
  for i, (prompt, stream) in enumerate(zip(prompts, streams)):
    if i % 2:
      expected = reference_greedy(hf, checkpoint, prompt, SCHEMAS[i], 24)
    else:
      expected = hf_greedy(hf, prompt, 24)
      expected = expected[:expected.index(0) + 1] if 0 in expected else expected
    assert stream.result().token_ids == expected, i


def test_greedy_under_a_grammar_equals_transformers(live, checkpoint, hf):
  """On 2x1x4: the sampled step split into its forward and its choice."""
  from tokenizers import Tokenizer
  check_greedy(live[1], Tokenizer.from_file(str(checkpoint / "tokenizer.json")), hf,
               checkpoint)


def test_greedy_under_a_grammar_on_a_pipeline(root, checkpoint, devices, hf):
  """On a 2x2x2 pipeline, which chooses inside its ring: a row's mask follows the entry its
  step chooses for (the late groups' too). 3 programs (one bucket, one span)."""
  engine, tokenizer = engine_for(root, checkpoint, devices, "mesh.data=2", "mesh.stage=2",
                                 "mesh.model=2", "serve.max_len=64")
  engine.start()
  try:
    check_greedy(engine, tokenizer, hf, checkpoint)
  finally:
    engine.stop()


def test_mask_packing_matches_llguidance(checkpoint):
  """A mask row allows exactly the tokens the matcher accepts (its bits, unpacked)."""
  from tokenizers import Tokenizer
  tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
  grammars = grammar.Grammars(tokenizer, VOCAB, [0])
  matcher = grammars.matcher(grammars.compile("regex", "ab+", "guided_regex"))
  row = grammar.masks([matcher], grammar.words(VOCAB))[0]
  bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:VOCAB]
  starts = {t for t in range(tokenizer.get_vocab_size())
            if re.fullmatch("ab*", tokenizer.decode([t])) and tokenizer.decode([t])}
  assert set(np.flatnonzero(bits)) == starts
