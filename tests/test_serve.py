"""The serving engine and the OpenAI-compatible server, against transformers on the same weights.

The checkpoint is a random Mistral (its sliding window of 4 is shorter than every request, so
each slot's own window is exercised) with a word-level tokenizer and a chat template, saved by
transformers. The server runs in a thread of this process (a uvicorn server on a free port)
and is driven by the official `openai` client; one test starts `scripts/run.py serve` as a
process for the command line and SIGTERM.
"""

import concurrent.futures
import dataclasses
import functools
import json
import math
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from jaxpar import config as config_lib
from jaxpar import inspect, serve
from jaxpar.config import MeshConfig
from jaxpar.errors import UserError
from jaxpar.mesh import make_mesh
from jaxpar.serve import openai_api
from jaxpar.serve.runner import Checked
from tests.conftest import cli_env, serving, write_hf_decoder

WORDS = [f"w{i}" for i in range(247)] + ["<s>", "<|user|>", "<|assistant|>", "</s>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
SLOTS = 4
rng = np.random.default_rng(0)
# 16 requests of different prompt and output lengths (more than the slots: slots are reused).
PROMPTS = [rng.integers(0, 247, int(n)).tolist() for n in rng.integers(1, 20, 16)]
MAX_TOKENS = [int(n) for n in rng.integers(1, 12, 16)]


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
  """transformers' greedy generate of one prompt alone (no EOS stop)."""
  return list(_hf_greedy(model, tuple(prompt), new))


@functools.cache  # many tests check the same requests against the one module-wide model
def _hf_greedy(model, prompt: tuple[int, ...], new: int) -> tuple[int, ...]:
  import torch
  with torch.no_grad():
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
  return tuple(out[0, len(prompt):].tolist())


def hf_adjusted_greedy(model, prompt: list[int], p: serve.Params) -> list[int]:
  """Greedy decoding of transformers' logits adjusted in NumPy as vLLM defines the options:
  logit_bias added; stop tokens banned while fewer than min_tokens are made; repetition
  divides positive (multiplies negative) logits of tokens in the prompt or the output;
  frequency and presence subtract per occurrence and once, over the output."""
  import torch
  out: list[int] = []
  for _ in range(p.max_tokens):
    with torch.no_grad():
      x = model(torch.tensor([prompt + out])).logits[0, -1].double().numpy()
    for t, b in p.logit_bias:
      x[t] += b
    if len(out) < p.min_tokens:
      x[list(p.stop_token_ids)] = -np.inf
    counts = np.bincount(out, minlength=len(x)).astype(np.float64)
    seen = counts > 0
    seen[prompt] = True
    r = p.repetition_penalty
    x = np.where(seen, np.where(x > 0, x / r, x * r), x)
    x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    out.append(int(np.argmax(x)))
    if out[-1] in p.stop_token_ids:
      break
  return out


# Requests whose logits are adjusted (greedy, so transformers can check them): negative
# penalties that make tokens come back (a token's count, the last one made included, decides
# the 10th token: without the last, another comes); positive ones that turn a random model's
# greedy path; a bias that forces a token and one that bans the likeliest; a stop token banned
# for 3 tokens (the plain greedy's second token).
ADJUSTED = [serve.Params(max_tokens=12, presence_penalty=-2.0, frequency_penalty=-0.5),
            serve.Params(max_tokens=10, presence_penalty=0.8, frequency_penalty=0.5,
                         repetition_penalty=1.6),
            serve.Params(max_tokens=6, logit_bias=((7, 6.0), (PROMPTS[5][0], -100.0))),
            serve.Params(max_tokens=8, min_tokens=3, stop_token_ids=(0,))]


def adjusted_requests(hf_model):
  """(prompt, Params) of ADJUSTED, the stop token made one the prompt's greedy run makes."""
  prompt = PROMPTS[5]
  stop = hf_greedy(hf_model, prompt, 3)[1]
  return [(prompt, p if not p.stop_token_ids else dataclasses.replace(p, stop_token_ids=(
      stop,))) for p in ADJUSTED]


def hf_logprobs(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
  """transformers' log-softmax [len(tokens), V] (float64) of the logits that chose each of
  `tokens` after `prompt`, teacher-forced."""
  import torch
  with torch.no_grad():
    logits = model(torch.tensor([prompt + tokens])).logits[0].double()
  return torch.log_softmax(logits, -1)[len(prompt) - 1:-1].numpy()


def check_logprobs(model, prompt, tokens, chosen, tops) -> None:
  """Each token's log-probability (`chosen`) and its alternatives ([(id, value)], likeliest
  first) equal transformers' within 1e-4, in transformers' order."""
  ref = hf_logprobs(model, prompt, tokens)
  assert len(chosen) == len(tops) == len(tokens)
  for i, (token, value, top) in enumerate(zip(tokens, chosen, tops)):
    assert abs(value - ref[i, token]) < 1e-4, (i, value, ref[i, token])
    order = np.argsort(-ref[i])[:len(top)]
    assert [t for t, _ in top] == order.tolist(), i
    np.testing.assert_allclose([v for _, v in top], ref[i, order], atol=1e-4)


def engine_logprobs(model, stream) -> None:
  """A finished `Stream`'s log-probabilities against transformers (its prompt's too, with
  echo)."""
  check_logprobs(model, stream.prompt, stream.token_ids, [e.logprob for e in stream.logprobs],
                 [e.top for e in stream.logprobs])
  if stream.params.echo:
    scored = stream.prompt_logprobs
    assert len(scored) == len(stream.prompt) - 1
    check_logprobs(model, stream.prompt[:1], stream.prompt[1:], [e.logprob for e in scored],
                   [e.top for e in scored])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers
  path = write_hf_decoder(tmp_path_factory.mktemp("serve"), "mistral", sliding_window=4)
  tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                              eos_token="</s>", unk_token="w0")
  fast.chat_template = TEMPLATE
  fast.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def hf(checkpoint):
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
  return model.eval(), transformers.AutoTokenizer.from_pretrained(checkpoint)


def load(root, checkpoint, *overrides):
  return config_lib.load(root / "configs" / "tiny.yaml", [
      f"model.checkpoint={checkpoint}", f"serve.max_slots={SLOTS}", "serve.max_len=32",
      "generate.eos_id=-1", "serve.precompile=false", *overrides])


def engine_for(root, checkpoint, devices, *overrides, tokenizer=None):
  config = load(root, checkpoint, *overrides)
  mesh = make_mesh(config.mesh, devices=devices)
  return serve.build(config, mesh, tokenizer=tokenizer, progress=False)


@pytest.fixture(scope="module")
def live(root, checkpoint, devices):
  """(base URL, engine): the server on data=2 x model=4 in a thread of this process."""
  from tokenizers import Tokenizer
  tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
  engine = engine_for(root, checkpoint, devices, "mesh.data=2", "mesh.model=4",
                      tokenizer=tokenizer).start()
  limits = openai_api.Limits(model="test-model", max_tokens=24, context=engine.length)
  with serving(engine, limits, tokenizer, checkpoint) as url:
    yield url, engine


@pytest.fixture(scope="module")
def client(live):
  import openai
  return openai.OpenAI(base_url=live[0] + "/v1", api_key="none", max_retries=0)


def complete(client, prompt, max_tokens, **kw):
  return client.completions.create(model="test-model", prompt=prompt, max_tokens=max_tokens,
                                   temperature=0, **kw)


def post(url: str, body: bytes | str) -> tuple[int, dict]:
  data = body if isinstance(body, bytes) else body.encode()
  request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_concurrent_greedy_completions_equal_transformers_alone(client, live, hf):
  """16 completions at once through 4 slots equal transformers run one request at a time."""
  model, _ = hf
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(lambda a: complete(client, *a), zip(PROMPTS, MAX_TOKENS)))
  for prompt, max_tokens, answer in zip(PROMPTS, MAX_TOKENS, answers):
    choice = answer.choices[0]
    assert choice.token_ids == hf_greedy(model, prompt, max_tokens)
    assert choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == len(prompt)
    assert answer.usage.completion_tokens == max_tokens
  # Alone through the same server: the same tokens.
  for prompt, max_tokens, answer in list(zip(PROMPTS, MAX_TOKENS, answers))[:3]:
    assert complete(client, prompt, max_tokens).choices[0].token_ids == (
        answer.choices[0].token_ids)
  assert live[1].running() == 0


def test_penalties_and_logit_bias_equal_numpy_on_transformers(client, hf):
  """Penalties, logit_bias and min_tokens through the `openai` client (vLLM's options in
  extra_body) on data=2 x model=4 (the vocabulary split 4 ways), beside plain requests in the
  same steps: each request's tokens equal greedy decoding of transformers' logits adjusted
  in NumPy; the plain ones stay transformers' greedy tokens."""
  model, _ = hf

  def ask(prompt, p):
    extra = {"repetition_penalty": p.repetition_penalty, "min_tokens": p.min_tokens,
             "stop_token_ids": list(p.stop_token_ids)}
    return complete(client, prompt, p.max_tokens, presence_penalty=p.presence_penalty,
                    frequency_penalty=p.frequency_penalty,
                    logit_bias={str(t): b for t, b in p.logit_bias}, extra_body=extra)
  requests = adjusted_requests(model) + [(q, serve.Params(max_tokens=6)) for q in PROMPTS[:3]]
  with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
    answers = list(pool.map(lambda r: ask(*r), requests))
  for (prompt, p), answer in zip(requests, answers):
    want = hf_adjusted_greedy(model, prompt, p)
    assert answer.choices[0].token_ids == want, p
    stopped = want[-1] in p.stop_token_ids
    assert answer.choices[0].finish_reason == ("stop" if stopped else "length")
  assert len(answers[3].choices[0].token_ids) > 3  # the stop token came, only after 3
  plain = hf_greedy(model, PROMPTS[5], 12)
  assert all(a.choices[0].token_ids != plain[:len(a.choices[0].token_ids)]
             for a in answers[:3])  # the options changed what greedy gives


def metric(live, name: str) -> float:
  text = urllib.request.urlopen(live[0] + "/metrics").read().decode()
  return float(next(line.split()[-1] for line in text.splitlines()
                    if line.startswith(name + " ")))


def test_n_choices_share_one_prefill_and_reproduce(client, live):
  """n=4 sampled choices: the prompt is computed once (the other three start from the first's
  cached prefix and compute their last token), the choices differ, the same seed gives the
  same four; streamed, the deltas of each index assemble to the same choices; best_of=3, n=2
  returns the two candidates of the highest total log-probability (the candidates being the
  n=3 request's choices: draws keyed by seed and choice)."""
  prompt = [17, 5, 9, 23, 41, 2, 8]  # in no row's cache yet
  ask = lambda **kw: client.completions.create(model="test-model", prompt=prompt, max_tokens=6,
                                               temperature=1.0, seed=11, **kw)
  total, reused = metric(live, "jaxpar_prompt_tokens_total"), metric(
      live, "jaxpar_prefix_reused_tokens_total")
  four = ask(n=4)
  computed = (metric(live, "jaxpar_prompt_tokens_total") - total) - (
      metric(live, "jaxpar_prefix_reused_tokens_total") - reused)
  assert computed == len(prompt) + 3
  tokens = [c.token_ids for c in sorted(four.choices, key=lambda c: c.index)]
  assert [c.index for c in four.choices] == [0, 1, 2, 3] and len(set(map(tuple, tokens))) == 4
  assert four.usage.prompt_tokens == len(prompt) and four.usage.completion_tokens == 24
  assert [c.token_ids for c in ask(n=4).choices] == tokens
  streamed = {0: [], 1: []}
  for chunk in ask(n=2, stream=True):
    for c in chunk.choices:
      streamed[c.index] += c.token_ids
  assert [streamed[0], streamed[1]] == tokens[:2]
  three = ask(n=3, logprobs=0)
  totals = [sum(c.logprobs.token_logprobs) for c in three.choices]
  best = ask(n=2, best_of=3)
  order = np.argsort(totals)[::-1][:2]
  assert [c.token_ids for c in best.choices] == [three.choices[i].token_ids for i in order]
  assert best.choices[0].logprobs is None and best.usage.completion_tokens == 18


def test_streamed_text_equals_whole_text(client, hf):
  model, tokenizer = hf
  prompt = "w5 w17 w200 w3 w9"
  whole = complete(client, prompt, 10)
  chunks = list(complete(client, prompt, 10, stream=True,
                         stream_options={"include_usage": True}))
  text = "".join(c.choices[0].text for c in chunks if c.choices)
  assert text == whole.choices[0].text
  expected = hf_greedy(model, tokenizer.encode(prompt, add_special_tokens=False), 10)
  assert whole.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
  assert sum(len(c.choices[0].token_ids) for c in chunks if c.choices) == 10
  assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []


def test_stop_string_cuts_the_text(client, hf):
  model, tokenizer = hf
  prompt = "w1 w2 w3"
  full = tokenizer.decode(hf_greedy(model, tokenizer.encode(prompt, add_special_tokens=False),
                                    12), skip_special_tokens=True)
  stop = " ".join(full.split()[3:5])  # words 4 and 5 of the greedy continuation
  for stream in (False, True):
    answer = complete(client, prompt, 12, stop=[stop], stream=stream)
    if stream:
      answer = list(answer)
      text = "".join(c.choices[0].text for c in answer)
      reason = answer[-1].choices[0].finish_reason
    else:
      text, reason = answer.choices[0].text, answer.choices[0].finish_reason
    assert text == full[:full.index(stop)] and reason == "stop"


def test_chat_completion_renders_the_template(client, hf):
  model, tokenizer = hf
  messages = [{"role": "user", "content": "w10 w11 w12"}]
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
  answer = client.chat.completions.create(model="test-model", messages=messages, max_tokens=6,
                                          temperature=0)
  assert answer.usage.prompt_tokens == len(ids)
  assert answer.choices[0].message.content == tokenizer.decode(hf_greedy(model, ids, 6),
                                                                skip_special_tokens=True)
  chunks = list(client.chat.completions.create(model="test-model", messages=messages,
                                               max_tokens=6, temperature=0, stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
      answer.choices[0].message.content)


def test_chat_accepts_what_openai_clients_send(live):
  """Text parts, an assistant's null content, and options at their ask-nothing values
  (logprobs false, top_logprobs 0, tool_choice "none") answer as the plain request does;
  asking for something not served (n 3) is refused by name."""
  url = live[0] + "/v1/chat/completions"
  plain = [{"role": "user", "content": "w10\nw11"}, {"role": "assistant", "content": ""},
           {"role": "user", "content": "w12"}]
  sent = [{"role": "user", "content": [{"type": "text", "text": "w10"},
                                       {"type": "text", "text": "w11"}]},
          {"role": "assistant", "content": None}, {"role": "user", "content": "w12"}]
  base = {"model": "test-model", "max_tokens": 4, "temperature": 0}
  code, want = post(url, json.dumps({**base, "messages": plain}))
  assert code == 200
  code, got = post(url, json.dumps({**base, "messages": sent, "logprobs": False,
                                    "top_logprobs": 0, "tool_choice": "none"}))
  assert code == 200, got
  assert got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"]
  assert got["usage"] == want["usage"]
  code, refused = post(url, json.dumps({**base, "messages": plain, "echo": True}))
  assert code == 400 and refused["error"]["param"] == "echo"
  dated = openai_api.ChatTemplate("{{ strftime_now('%Y') }}", {})  # as transformers gives it
  assert dated.render(messages=[]) == str(time.localtime().tm_year)


def test_logprobs_equal_transformers(client, hf):
  """Log-probabilities through the `openai` client on data=2 x model=4 (the vocabulary split
  4 ways): completions' `logprobs` (greedy and sampled, whole and streamed) and chat's
  `top_logprobs`: each token's and its alternatives', in order, equal transformers'
  log-softmax within 1e-4; each token is named by its text, text_offset counts them."""
  model, tokenizer = hf
  ids = lambda texts: [tokenizer.convert_tokens_to_ids(t) for t in texts]
  prompt = PROMPTS[2]
  for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
    whole = client.completions.create(model="test-model", prompt=prompt, max_tokens=6,
                                      logprobs=5, **kw).choices[0]
    lp, tokens = whole.logprobs, whole.token_ids
    assert ids(lp.tokens) == tokens
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(tokens))]
    check_logprobs(model, prompt, tokens, lp.token_logprobs,
                   [list(zip(ids(top), top.values())) for top in lp.top_logprobs])
    chunks = list(client.completions.create(model="test-model", prompt=prompt, max_tokens=6,
                                            logprobs=5, stream=True, **kw))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    # The same tokens; a cached prefix may make the values differ in the last bits.
    assert [t for c in chunks for t in c.choices[0].token_ids] == tokens
    np.testing.assert_allclose([v for s in streamed for v in s.token_logprobs],
                               lp.token_logprobs, atol=1e-5)
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
  messages = [{"role": "user", "content": "w10 w11 w12"}]
  answer = client.chat.completions.create(model="test-model", messages=messages, max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3)
  content = answer.choices[0].logprobs.content
  chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  chat_ids = chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids
  check_logprobs(model, chat_ids, ids([c.token for c in content]),
                 [c.logprob for c in content],
                 [[(i, t.logprob) for i, t in zip(ids([t.token for t in c.top_logprobs]),
                                                   c.top_logprobs)] for c in content])
  assert all(bytes(c.bytes).decode() == c.token for c in content)
  plain = client.chat.completions.create(model="test-model", messages=messages, max_tokens=5,
                                         temperature=0)
  assert plain.choices[0].logprobs is None


def test_echo_scores_the_prompt_like_transformers(client, hf):
  """Completions' echo with logprobs (as evaluation harnesses score answers): the prompt's
  text, then the completion's; each prompt token after the first with its log-probability
  and alternatives equal to transformers' log-softmax (the vocabulary split 4 ways); with
  max_tokens 0 the prompt alone, scored; streamed, the same."""
  model, tokenizer = hf
  prompt = PROMPTS[9]
  text = " ".join(WORDS[t] for t in prompt)
  completion = complete(client, text, 3).choices[0]
  for max_tokens in (3, 0):
    answer = complete(client, text, max_tokens, echo=True, logprobs=2)
    choice, lp = answer.choices[0], answer.choices[0].logprobs
    assert choice.token_ids == completion.token_ids[:max_tokens]
    assert choice.text == text + (completion.text if max_tokens else "")
    assert len(lp.tokens) == len(prompt) + max_tokens and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    check_logprobs(model, prompt[:1], prompt[1:], lp.token_logprobs[1:len(prompt)],
                   [[(tokenizer.convert_tokens_to_ids(t), v) for t, v in top.items()]
                    for top in lp.top_logprobs[1:len(prompt)]])
    assert choice.finish_reason == "length" and answer.usage.completion_tokens == max_tokens
  two = complete(client, text, 0, echo=True, logprobs=2, n=2).choices  # scored twice, alike
  assert two[0].logprobs.token_logprobs == two[1].logprobs.token_logprobs == lp.token_logprobs
  chunks = [c.choices[0] for c in complete(client, text, 3, echo=True, logprobs=2, stream=True)
            if c.choices]
  assert "".join(c.text for c in chunks) == text + completion.text
  assert [t for c in chunks for t in c.logprobs.token_logprobs][0] is None
  assert sum(len(c.logprobs.tokens) for c in chunks) == len(prompt) + 3


def test_tokenize_and_detokenize(live, hf):
  _, tokenizer = hf
  code, got = post(live[0] + "/tokenize", json.dumps({"model": "test-model",
                                                      "prompt": "w5 w17 w200"}))
  assert code == 200 and got["tokens"] == tokenizer.encode("w5 w17 w200")
  assert got["count"] == 3 and got["max_model_len"] == live[1].length
  messages = [{"role": "user", "content": "w10"}]
  code, chat = post(live[0] + "/tokenize", json.dumps({"messages": messages}))
  want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  assert code == 200 and chat["tokens"] == (want["input_ids"] if hasattr(want, "keys") else want)
  code, text = post(live[0] + "/detokenize", json.dumps({"tokens": got["tokens"]}))
  assert code == 200 and text == {"prompt": "w5 w17 w200"}
  code, bad = post(live[0] + "/detokenize", json.dumps({"tokens": [1, 999]}))
  assert code == 400 and bad["error"]["param"] == "tokens"


def test_seeded_sampling_is_repeatable_and_independent_of_neighbours(client):
  kw = dict(model="test-model", prompt=PROMPTS[0], max_tokens=10, temperature=1.0, top_p=0.9,
            extra_body={"top_k": 20})  # top_k: an extension, as vLLM's
  alone = client.completions.create(seed=7, **kw).choices[0].token_ids
  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    busy = list(pool.map(lambda s: client.completions.create(seed=s, **kw).choices[0].token_ids,
                         [7, 8, 9, 7, 10, 11]))
  assert busy[0] == busy[3] == alone
  assert len({tuple(t) for t in busy}) > 1  # other seeds draw other tokens


BAD = [  # (body, status, what the error names)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": [1, 2]}, 400, "model"),
    ({"model": "other", "prompt": [1, 2]}, 404, "model"),
    ({"model": "test-model"}, 400, "prompt"),
    ({"model": "test-model", "prompt": []}, 400, "prompt"),
    ({"model": "test-model", "prompt": [1, 251]}, 400, "prompt"),
    ({"model": "test-model", "prompt": [1, -1]}, 400, "prompt"),
    ({"model": "test-model", "prompt": [1] * 31, "max_tokens": 5}, 400, "max_tokens"),
    ({"model": "test-model", "prompt": [1] * 40, "max_tokens": 1}, 400, "prompt"),
    ({"model": "test-model", "prompt": [1], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "test-model", "prompt": [1], "max_tokens": 25}, 400, "max_tokens"),
    ({"model": "test-model", "prompt": [1], "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "test-model", "prompt": [1], "temperature": -1}, 400, "temperature"),
    ({"model": "test-model", "prompt": [1], "top_p": 0}, 400, "top_p"),
    ({"model": "test-model", "prompt": [1], "n": SLOTS + 1}, 400, "n"),
    ({"model": "test-model", "prompt": [1], "n": 2, "best_of": 1}, 400, "best_of"),
    ({"model": "test-model", "prompt": [1], "best_of": 2, "stream": True}, 400, "best_of"),
    ({"model": "test-model", "prompt": [1], "stop": [1]}, 400, "stop"),
    ({"model": "test-model", "messages": "hi"}, 400, "messages"),
    ({"model": "test-model", "prompt": [1], "logprobs": 21}, 400, "logprobs"),
    ({"model": "test-model", "prompt": [1], "logprobs": True}, 400, "logprobs"),
    ({"model": "test-model", "messages": [{"role": "user", "content": "w1"}], "echo": True},
     400, "echo"),
    ({"model": "test-model", "prompt": [1], "echo": 1}, 400, "echo"),
    ({"model": "test-model", "messages": [{"role": "user", "content": "w1"}],  # no tools in
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),  # TEMPLATE
    ({"model": "test-model", "messages": [{"role": "user", "content": "w1"}],
      "tool_choice": "required"}, 400, "tool_choice"),  # no tools
    ({"model": "test-model", "prompt": [1], "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"model": "test-model", "prompt": [1], "guided_regex": "w1"}, 400,  # a word-level
     "guided_regex"),                                       # tokenizer: no grammar reads it
    ({"model": "test-model", "prompt": [1], "repetition_penalty": 0}, 400,
     "repetition_penalty"),
    ({"model": "test-model", "prompt": [1], "logit_bias": {"w1": 1}}, 400, "logit_bias"),
    ({"model": "test-model", "prompt": [1], "logit_bias": {"251": 1}}, 400, "logit_bias"),
    ({"model": "test-model", "prompt": [1], "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"model": "test-model", "prompt": [1], "max_tokens": 2, "min_tokens": 3}, 400,
     "min_tokens"),
    ({"model": "test-model", "prompt": [1], "stop_token_ids": [1] * 17}, 400,
     "stop_token_ids"),
    ({"model": "test-model", "messages": [{"role": "user", "content": "w1"}], "logprobs": True,
      "top_logprobs": 21}, 400, "top_logprobs"),
    ({"model": "test-model", "messages": [{"role": "user", "content": "w1"}],
      "top_logprobs": 2}, 400, "top_logprobs"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_request_gets_a_json_error_and_serving_goes_on(live, client, hf, body, status,
                                                           param):
  chat = isinstance(body, dict) and "messages" in body
  url = live[0] + ("/v1/chat/completions" if chat else "/v1/completions")
  code, answer = post(url, body if isinstance(body, bytes) else json.dumps(body))
  assert code == status
  assert answer["error"]["param"] == param and answer["error"]["message"]
  assert answer["error"]["type"] == "invalid_request_error"
  assert complete(client, [4, 5, 6], 3).choices[0].token_ids == hf_greedy(hf[0], [4, 5, 6], 3)


def test_without_max_tokens_a_request_gets_what_the_context_leaves(live, hf):
  """No max_tokens: a completion makes 16 new tokens (OpenAI's default), or what the 32
  positions of its slot leave after the prompt; a chat up to serve.max_tokens (24 here)."""
  url = live[0] + "/v1/completions"
  for prompt, want in [([4, 5, 6], 16), ([4, 5, 6] * 9, 32 - 27)]:
    code, answer = post(url, json.dumps({"model": "test-model", "prompt": prompt,
                                         "temperature": 0}))
    assert code == 200 and answer["usage"]["completion_tokens"] == want
    assert answer["choices"][0]["token_ids"] == hf_greedy(hf[0], prompt, want)
    assert answer["choices"][0]["finish_reason"] == "length"
  code, answer = post(live[0] + "/v1/chat/completions", json.dumps(
      {"model": "test-model", "messages": [{"role": "user", "content": "hi"}],
       "temperature": 0}))
  prompt_len = answer["usage"]["prompt_tokens"]
  assert code == 200 and answer["usage"]["completion_tokens"] == min(24, 32 - prompt_len)


def test_slot_length_is_capped_and_must_fit(root, devices):
  """serve.max_len 0: model.max_seq_len, at most 8192 positions (a Llama 3.x checkpoint says
  131072); a length whose KV cache cannot fit in memory is refused before compiling (64
  slots x 2**22 positions x 1 KiB = 256 GiB)."""
  from jaxpar.runtime import generate
  from jaxpar.serve import engine as engine_lib
  one = make_mesh(MeshConfig(1, 1, 1), devices=devices[:1])
  for max_seq_len, want in [(32, 32), (2**22, 8192)]:
    config = config_lib.load(root / "configs" / "tiny.yaml", [
        "model.family=llama", f"model.max_seq_len={max_seq_len}", "serve.max_slots=64"])
    gen = generate.build(config, one)
    assert gen.cache_bytes_per_device(64, 1) == 64 * 2 * 2 * 8 * 8 * 4  # k, v; 2 layers
    assert engine_lib.slot_length(config, gen) == want
  huge = dataclasses.replace(config, serve=dataclasses.replace(config.serve, max_len=2**22))
  with pytest.raises(UserError, match=r"serve.max_len=4194304: 64 slots of 4194304 positions "
                                      r"need 256.0 GiB of KV cache per device"):
    engine_lib.slot_length(huge, gen)


def test_spans_past_the_shortest_read_at_most_8_mib_of_a_leaf():
  """Worked by hand: 2048 positions from 256 (length / 8), doubling while 4 t <= 3 x 2048;
  at 24 KiB a position (8 slots x 12 heads x 64 float32) 512 positions are 12 MiB, so only
  the shortest and the whole; at 8 KiB, 1024 positions are exactly 8 MiB."""
  from jaxpar.serve.shapes import spans
  assert spans(2048, 16, 24 << 10) == (256, 2048)
  assert spans(2048, 16, 8 << 10) == (256, 512, 1024, 2048)
  assert spans(32, 16) == (16, 32)


def test_a_body_over_the_limit_gets_413_unread(live, client, hf):
  """The context is 32 positions, so the limit is 1 MiB: a body that says it has 2 MiB is
  refused before it is sent, and one streamed without a length (chunked) as soon as it passes
  the limit, with a 413 that names the limit; serving goes on."""
  import http.client
  host, port = live[0].removeprefix("http://").split(":")
  for chunked in (False, True):
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader(*("Transfer-Encoding", "chunked") if chunked else
                   ("Content-Length", str(2**21)))
    conn.endheaders()
    if chunked:
      try:
        for _ in range(32):  # 32 x 64 KiB: 2 MiB, the server stops reading at 1 MiB
          conn.send(b"10000\r\n" + b"a" * 2**16 + b"\r\n")
      except (BrokenPipeError, ConnectionResetError):
        pass
    response = conn.getresponse()
    answer = json.loads(response.read())
    assert response.status == 413 and "larger than 1048576 bytes" in answer["error"]["message"]
    conn.close()
  assert complete(client, [4, 5, 6], 3).choices[0].token_ids == hf_greedy(hf[0], [4, 5, 6], 3)


def test_eos_ends_a_request(live, client, hf):
  """A request stops at its first end-of-text token (kept in token_ids, finish 'stop')."""
  expected = hf_greedy(hf[0], PROMPTS[2], 12)
  eos = expected[4]
  engine = live[1]
  kept, engine.eos_ids = engine.eos_ids, {eos}
  try:
    answer = complete(client, PROMPTS[2], 12)
  finally:
    engine.eos_ids = kept
  assert answer.choices[0].token_ids == expected[:expected.index(eos) + 1]
  assert answer.choices[0].finish_reason == "stop"


def test_full_queue_answers_429(live, client, hf):
  engine = live[1]
  limit, engine.max_queue = engine.max_queue, 0
  try:
    code, answer = post(live[0] + "/v1/completions",
                        json.dumps({"model": "test-model", "prompt": [1, 2]}))
  finally:
    engine.max_queue = limit
  assert code == 429 and "queue is full" in answer["error"]["message"]
  assert complete(client, [4, 5, 6], 3).choices[0].token_ids == hf_greedy(hf[0], [4, 5, 6], 3)


def test_disconnect_mid_stream_frees_the_slot(live, client, hf):
  import http.client
  body = {"model": "test-model", "prompt": [1, 2, 3], "max_tokens": 24, "temperature": 0,
          "stream": True}
  connection = http.client.HTTPConnection(live[0].removeprefix("http://"), timeout=30)
  connection.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
  response = connection.getresponse()
  assert response.readline().startswith(b"data: ")  # the first token arrived; now hang up
  connection.close()
  deadline = time.time() + 10
  while live[1].running() and time.time() < deadline:
    time.sleep(0.02)
  assert live[1].running() == 0
  assert complete(client, [7, 8], 4).choices[0].token_ids == hf_greedy(hf[0], [7, 8], 4)
  text = urllib.request.urlopen(live[0] + "/metrics").read().decode()
  assert 'jaxpar_requests_total{finish_reason="cancelled"}' in text
  for name in ("jaxpar_queue_length", "jaxpar_running_slots", "jaxpar_tokens_per_second",
               "jaxpar_time_to_first_token_seconds_bucket",
               "jaxpar_time_per_output_token_seconds_bucket", "jaxpar_generated_tokens_total"):
    assert name in text


def test_models_and_health(live):
  models = json.loads(urllib.request.urlopen(live[0] + "/v1/models").read())
  assert [m["id"] for m in models["data"]] == ["test-model"]
  assert json.loads(urllib.request.urlopen(live[0] + "/health").read())["status"] == "ok"


@pytest.mark.parametrize("data,model,policies", [(8, 1, ("continuous", "static")),
                                                 (1, 8, ("continuous", "static")),
                                                 (1, 1, ("continuous",))])
def test_python_api_on_other_meshes(root, checkpoint, devices, hf, data, model, policies):
  """The engine without HTTP; greedy equals transformers on data-only and model-only meshes
  and on one device, with a static-batching engine giving the same tokens; so do
  log-probabilities (a vocabulary whole, and split 8 ways)."""
  for policy in policies:
    engine = engine_for(root, checkpoint, devices[:data * model], f"mesh.data={data}",
                        f"mesh.model={model}", f"serve.max_slots={8 if data == 8 else SLOTS}",
                        f"serve.policy={policy}", "serve.min_bucket=32",
                        f"serve.precompile={data * model == 1}").start()
    if data * model == 1:  # every program compiled at start: no request compiles one
      assert len(engine.runner.compiled) == len(engine.runner.compiled.makers) == 10
      engine.runner.compiled.makers = {}
    try:
      streams = [engine.submit(p, serve.Params(max_tokens=m))
                 for p, m in zip(PROMPTS[:10], MAX_TOKENS[:10])]
      for stream, prompt, m in zip(streams, PROMPTS, MAX_TOKENS):
        tokens = [t for out in stream for t in out.token_ids]
        assert tokens == hf_greedy(hf[0], prompt, m)
      if policy == "continuous":
        engine_logprobs(hf[0], engine.generate([PROMPTS[3]], serve.Params(
            max_tokens=4, logprobs=20, echo=True))[0])
    finally:
      engine.stop()


@pytest.mark.parametrize("data,stage,model,scan", [(2, 1, 4, False), (1, 1, 8, False),
                                                   (1, 1, 8, True), (1, 2, 4, True)])
def test_prefix_reuse_gives_the_tokens_of_a_fresh_prefill(root, checkpoint, devices, hf, data,
                                                          stage, model, scan):
  """Prompts that share a 12-token system prompt, then a second turn that repeats the first
  with its answer: each starts from the longest prefix a slot holds (a running or a finished
  request's; on a pipeline, each stage's layers' cache of the source slot in its group) and
  gives transformers' greedy tokens; the reused tokens are counted, and with
  serve.prefix_reuse=false none are."""
  rng = np.random.default_rng(7)
  system = rng.integers(0, 247, 12).tolist()
  prompts = [system + rng.integers(0, 247, int(n)).tolist() for n in (3, 1, 5, 2, 4, 3)]
  new = [8, 3, 6, 5, 2, 7]
  for reuse in (True, False):
    engine = engine_for(root, checkpoint, devices, f"mesh.data={data}", f"mesh.stage={stage}",
                        f"mesh.model={model}", f"model.scan_layers={str(scan).lower()}",
                        f"serve.prefix_reuse={str(reuse).lower()}").start()
    reused = lambda: engine.metrics.registry.get_sample_value(
        "jaxpar_prefix_reused_tokens_total")
    try:
      first = engine.submit(prompts[0], serve.Params(max_tokens=new[0])).result().token_ids
      assert first == hf_greedy(hf[0], prompts[0], new[0])
      assert reused() == 0
      streams = [engine.submit(p, serve.Params(max_tokens=m)) for p, m in zip(prompts, new)]
      for stream, prompt, m in zip(streams, prompts, new):
        assert stream.result().token_ids == hf_greedy(hf[0], prompt, m)
      # The first prompt again (its whole prompt less the last token is cached), and the rest
      # through 4 slots: at least the system prompt each.
      assert reused() >= (len(prompts[0]) - 1) + 5 * len(system) if reuse else reused() == 0
      before = reused()
      turn = prompts[0] + first + [5, 6, 7]  # the first request's answer is cached too
      assert engine.generate([turn], serve.Params(max_tokens=6))[0].token_ids == (
          hf_greedy(hf[0], turn, 6))
      # 22 of the 26-token turn are cached; its suffix pads to 16 tokens, which must fit in
      # the 32 slots, so it starts at 16.
      assert reused() - before == (16 if reuse else 0)
      short = [3, 1, 4, 1]
      answer = engine.generate([short], serve.Params(max_tokens=5))[0].token_ids
      before, turn = reused(), short + answer + [5, 9]
      assert engine.generate([turn], serve.Params(max_tokens=4))[0].token_ids == (
          hf_greedy(hf[0], turn, 4))
      assert reused() - before == (8 if reuse else 0)  # the answer's last token is not cached
    finally:
      engine.stop()


@pytest.mark.parametrize("data,stage,model", [(2, 1, 4), (2, 2, 2)])
def test_chunked_prefill_gives_the_tokens_of_a_whole_prefill(root, checkpoint, devices, hf,
                                                             data, stage, model):
  """serve.step_tokens=16 (chunks of 16, the smallest bucket), plain and pipelined (each
  chunk continues its row the way prefix reuse does, tested on other meshes above): a
  40-token prompt arriving while three requests decode is computed 16 tokens a step between
  their steps (never more in a step), and every request gives transformers' greedy tokens; a
  seeded sampled request gives the tokens the same engine gives it with whole prompts (no
  budget, no prefix reuse: one 48-token bucket from position 0)."""
  rng = np.random.default_rng(3)
  long = rng.integers(0, 247, 40).tolist()
  short = [rng.integers(0, 247, int(n)).tolist() for n in (5, 3, 7)]
  sampled = serve.Params(max_tokens=6, temperature=0.9, top_k=20, seed=11)
  engine = engine_for(root, checkpoint, devices, f"mesh.data={data}", f"mesh.stage={stage}",
                      f"mesh.model={model}", "serve.max_len=64", "serve.step_tokens=16")
  steps = []  # each step's prefill chunks: (request id, start, end, bucket)
  admit = engine.scheduler.admit

  def recorded():
    placements, dropped = admit()
    steps.append([(p.stream.id, p.start, p.end, p.bucket) for p in placements])
    return placements, dropped
  engine.scheduler.admit = recorded
  engine.start()
  try:
    streams = [engine.submit(p, serve.Params(max_tokens=12)) for p in short]
    while len(engine.scheduler.decoding()) - engine.scheduler.decoding().count(None) < 3:
      time.sleep(0.01)
    streams.append(engine.submit(long, serve.Params(max_tokens=8)))
    chunked = engine.submit(long[:-1] + [7], sampled)
    for stream, prompt, m in zip(streams, short + [long], [12, 12, 12, 8]):
      assert stream.result().token_ids == hf_greedy(hf[0], prompt, m)
    chunked = chunked.result().token_ids
    assert [c for step in steps for c in step if c[0] == streams[3].id] == [
        (streams[3].id, 0, 16, 16), (streams[3].id, 16, 32, 16), (streams[3].id, 32, 40, 16)]
    assert max(sum(c[3] for c in step) for step in steps) == 16
    engine.scheduler.step_tokens, engine.scheduler.prefix_reuse = 0, False
    whole = engine.submit(long[:-1] + [7], sampled).result()
    assert [c for step in steps for c in step if c[0] == whole.id] == [(whole.id, 0, 40, 48)]
    assert chunked == whole.token_ids
  finally:
    engine.stop()


# (method, data, stage, model): each proposer and each mesh kind once, and pipelines (rounds
# between ring steps: a request with log-probabilities does not speculate).
SPECULATING = [("ngram", 1, 1, 1), ("self", 2, 1, 4), ("draft", 4, 1, 2), ("ngram", 2, 2, 2),
               ("draft", 1, 2, 4)]


def perturbed_copy(model, path):
  """`model` with noise in its last MLP (greedy tokens agree with the model's about half the
  time), saved by transformers: a draft that is sometimes right."""
  import copy

  import torch
  draft = copy.deepcopy(model)
  torch.manual_seed(1)
  with torch.no_grad():
    w = draft.model.layers[-1].mlp.down_proj.weight
    w.add_(0.1 * torch.randn_like(w))
  draft.save_pretrained(path)
  return path


@pytest.mark.parametrize("method,data,stage,model", SPECULATING)
def test_speculating_engine_gives_the_tokens_of_transformers(root, checkpoint, devices, hf,
                                                             tmp_path, method, data, stage,
                                                             model):
  """A speculating engine (k=2) serves continuous batches of greedy requests (runs of two
  tokens, which this model continues with repeats that prompt lookup finds; prompts sharing a
  system prompt, so prefix reuse copies the draft's cache too) beside a request that cannot
  speculate (log-probabilities: rounds with it check nothing) and requests with penalties,
  logit biases and min_tokens (checked on logits adjusted position by position): every token
  is transformers' (adjusted in NumPy).
  The model as its own draft has every proposal accepted, a noisy copy of it some; a seeded
  sampled request repeats. The greedy round writes the caches in place and gathers nothing."""
  rng = np.random.default_rng(11)
  system = rng.integers(0, 247, 12).tolist()
  prompts = [[t] * 6 + [t + 1] * 6 for t in (3, 4, 5, 6)] + [
      system + rng.integers(0, 247, int(n)).tolist() for n in (2, 5, 1, 3)] + PROMPTS[:4]
  new = [8] * 4 + [int(n) for n in rng.integers(3, 10, len(prompts) - 4)]
  K = 2  # (a round's attention scores, [rows, heads, K + 1 queries, span] on a device, are
  # smaller than a key cache's shard, [rows, heads, 8, span]: a copy of one would show)
  sets = [f"speculative.method={method}", f"speculative.k={K}", "speculative.ngram_min=1"]
  if method == "draft":
    sets.append(f"speculative.draft={perturbed_copy(hf[0], tmp_path)}")
  engine = engine_for(root, checkpoint, devices[:data * stage * model], f"mesh.data={data}",
                      f"mesh.stage={stage}", f"mesh.model={model}", *sets)
  runner, step, drift = engine.runner, engine.runner.step, []
  if method == "draft":  # the warm-up a precompiled engine runs (here of a few programs, the
    # draft's prefill among them) takes each one's own state and leaves none behind
    from jaxpar.serve.compiled import warm_up
    for key in [("prefill", runner.buckets[0]), ("draft prefill", runner.buckets[0]),
                ("speculate", True, runner.spans[0], runner.rows[-1])]:
      runner.compiled[key]  # noqa: B018 (compiles it)
    warm_up(runner)
    import jax
    for state, d in ((runner._state, runner.decoder), (runner._draft_state, runner.draft)):
      for warm, empty in zip(jax.tree.leaves(state), jax.tree.leaves(d.empty_state())):
        np.testing.assert_array_equal(np.asarray(warm), np.asarray(empty))

  def checked_step(running):  # the host's positions are the devices' once no round is unread
    if not runner._firsts and not any(isinstance(q[0], Checked) for q in runner._queued):
      on_device = np.asarray(runner._state.slots.positions)
      drift.extend((b, runner._positions[b], on_device[b]) for b, s in enumerate(running)
                   if s is not None and runner._positions[b] != on_device[b])
    return step(running)
  runner.step = checked_step
  engine.start()
  value = lambda name: engine.metrics.registry.get_sample_value(name + "_total")
  try:
    streams = [engine.submit(p, serve.Params(max_tokens=m)) for p, m in zip(prompts, new)]
    scored = engine.submit(PROMPTS[5], serve.Params(max_tokens=6, logprobs=2))
    for stream, prompt, m in zip(streams, prompts, new):
      assert stream.result().token_ids == hf_greedy(hf[0], prompt, m)
    assert scored.result().token_ids == hf_greedy(hf[0], PROMPTS[5], 6)
    proposed, accepted = (value(f"jaxpar_speculative_{n}_tokens")
                          for n in ("proposed", "accepted"))
    checks = value("jaxpar_speculative_checks")
    assert proposed == K * checks > 0 and accepted > 0
    assert engine.metrics.mean_accepted_length() == 1 + accepted / checks
    assert not drift
    assert accepted == proposed if method == "self" else accepted < proposed
    # Each checked position counts the proposals before it (the draft's are unpenalised).
    adjusted = [(engine.submit(q, p), q, p) for q, p in adjusted_requests(hf[0])]
    for stream, prompt, p in adjusted:
      assert stream.result().token_ids == hf_adjusted_greedy(hf[0], prompt, p), p
    sampled = serve.Params(max_tokens=8, temperature=1.0, seed=5)
    assert len({tuple(engine.generate([prompts[0]], sampled)[0].token_ids)
                for _ in range(2)}) == 1
  finally:
    engine.stop()
  if method == "self":  # no cache leaf's shard is copied (with one row per device a draft's
    # passes copy its caches: not solved yet)
    import jax
    runner = engine.runner
    shards = {a.sharding.shard_shape(a.shape) for a in jax.tree.leaves(
        runner.decoder.empty_state(abstract=True).caches)}
    program = runner.compiled["speculate", True, runner.spans[-1], runner.rows[-1]]
    assert set(inspect.hlo_census(program.as_text()).counts()) == {"all-reduce"}
    assert not shards & set(copied_shapes(program.as_text()))


def test_a_failed_step_ends_its_requests_and_forgets_the_cached_prefixes(root, checkpoint,
                                                                          devices, hf):
  """A decode step that raises ends its requests with 'error' and zeroes the caches; the next
  request shares a prefix with the earlier ones but prefills it again (and equals
  transformers)."""
  engine = engine_for(root, checkpoint, devices, "mesh.data=1", "mesh.model=8").start()
  prompt, params = PROMPTS[2] + [7, 8], serve.Params(max_tokens=4)
  try:
    engine.generate([prompt], params)
    working = dict(engine.runner.compiled)

    def fail(*args):
      raise RuntimeError("injected")
    engine.runner.compiled.update({k: fail for k in engine.runner.compiled.makers
                                   if k[0] == "decode"})
    assert engine.submit(prompt + [9], params).result().finish_reason == "error"
    engine.runner.compiled.clear()  # the fakes out (a program not restored compiles again)
    engine.runner.compiled.update(working)
    reused = engine.metrics.registry.get_sample_value("jaxpar_prefix_reused_tokens_total")
    turn = prompt + [9, 10]
    assert engine.generate([turn], params)[0].token_ids == hf_greedy(hf[0], turn, 4)
    assert engine.metrics.registry.get_sample_value(
        "jaxpar_prefix_reused_tokens_total") == reused
  finally:
    engine.stop()


@pytest.mark.parametrize("data,stage,model", [(2, 2, 2), (1, 4, 2)])
def test_pipelined_engine(root, checkpoint, devices, hf, live, data, stage, model):
  """mesh.stage > 1: 10 requests through 4 slots rotating through the stages give
  transformers' greedy tokens; so do prompts that take over the rows of short requests
  whose last steps are still in flight through the stages (the late rows' tokens go to whoever
  held the row when the step entered); a seeded sampled request gives the same
  tokens as on the data=2 x model=4 engine (draws keyed by seed and token number only)."""
  engine = engine_for(root, checkpoint, devices, f"mesh.data={data}", f"mesh.stage={stage}",
                      f"mesh.model={model}", "serve.min_bucket=32").start()  # 3 programs
  try:
    streams = [engine.submit(p, serve.Params(max_tokens=m))
               for p, m in zip(PROMPTS[:10], MAX_TOKENS[:10])]
    for stream, prompt, m in zip(streams, PROMPTS, MAX_TOKENS):
      assert stream.result().token_ids == hf_greedy(hf[0], prompt, m)
      assert stream.finish_reason == "length"
    # Each short request ends on its first token with its step at position 2 in flight.
    short = [engine.submit([3, 1 + i], serve.Params(max_tokens=1)) for i in range(SLOTS)]
    takers = [(PROMPTS[i][:3] * 3)[:4 + i % 2] for i in range(SLOTS)]
    streams = [engine.submit(p, serve.Params(max_tokens=3)) for p in takers]
    assert all(len(s.result().token_ids) == 1 for s in short)
    for stream, prompt in zip(streams, takers):
      assert stream.result().token_ids == hf_greedy(hf[0], prompt, 3)
    # Two plain requests first: the adjusted ones start in late rows (2 and 3).
    plain = [engine.submit(PROMPTS[i], serve.Params(max_tokens=7)) for i in (6, 7)]
    adjusted = [(prompt, engine.submit(prompt, p)) for prompt, p in adjusted_requests(hf[0])]
    for prompt, stream in adjusted:
      assert stream.result().token_ids == hf_adjusted_greedy(hf[0], prompt, stream.params)
    for i, stream in zip((6, 7), plain):
      assert stream.result().token_ids == hf_greedy(hf[0], PROMPTS[i], 7)
    sampled = serve.Params(max_tokens=10, temperature=1.0, top_k=20, seed=3)
    piped = engine.generate([PROMPTS[1]], sampled)[0].token_ids
    for params in (serve.Params(max_tokens=5, logprobs=4, echo=True),
                   dataclasses.replace(sampled, logprobs=2)):
      engine_logprobs(hf[0], engine.generate([PROMPTS[2]], params)[0])
    every = SLOTS // engine.runner.decoder.data_ways
    assert engine.runner.rows == (every,)  # a pipeline steps every row
    for span in engine.runner.spans:
      program = engine.runner.compiled["decode", True, span, every]
      census = inspect.hlo_census(program.as_text()).counts()
      assert census["collective-permute"]["count"] >= 1  # activations and tokens move on
      assert census.get("all-gather", {"bytes": 0})["bytes"] <= 64  # no cache is gathered
  finally:
    engine.stop()
  assert live[1].generate([PROMPTS[1]], sampled)[0].token_ids == piped


def test_decode_step_collectives(live):
  """The decode step on data=2 x model=4: two all-reduces per block, one for the
  vocab-parallel embedding and two for the greedy token over the vocab-parallel logits (the
  largest logit, then the first column that holds it: [B] each); nothing is gathered. The
  sampled step's forward gives the logits split as they are; its choice gathers tokens and
  log-probability candidates only (penalties, biases and grammar masks gather nothing)."""
  engine = live[1]
  layers, runner = engine.generator.config.model.n_layers, engine.runner
  assert len(runner.spans) > 1 and runner.rows == (1, 2)  # active rows of 2 per group
  steps = [(span, A) for span in runner.spans for A in runner.rows]
  # A device's smallest cache leaf: the steps write into the caches in place, never copy one
  # (reshaped caches of a step of fewer rows were copied whole, 27x slower at 2048 positions).
  import jax
  leaf = min(math.prod(a.sharding.shard_shape(a.shape)) for a in jax.tree.leaves(
      runner.decoder.empty_state(abstract=True).caches))  # (the live state may be donated)
  for span, A in steps:
    program = runner.compiled["decode", True, span, A]
    census = inspect.hlo_census(program.as_text()).counts()
    assert census["all-reduce"]["count"] == 2 * layers + 1 + 2
    assert set(census) == {"all-reduce"}
    assert max(map(math.prod, copied_shapes(program.as_text())), default=0) < leaf
  # The sampled programs (log-probabilities too) gather the tokens and each shard's
  # TOP_LOGPROBS candidates, never a row of logits (V / 4 = 63 columns) or a cache.
  from jaxpar.runtime.sampling import TOP_LOGPROBS
  V = engine.generator.layout.vocab_multiple * -(-engine.vocab_size
                                                  // engine.generator.layout.vocab_multiple)
  # A prefill scores its prompt's positions (echo) a chunk at a time: a chunk's candidates.
  from jaxpar.runtime.slots import PROMPT_CHUNK
  # The decode step's bound as before; a prefill's: a chunk's positions, each candidate's
  # value and id.
  sampled = [(runner.compiled["prefill", b], min(b, PROMPT_CHUNK) * 2)
             for b in runner.buckets] + [(runner.compiled["choose", A], 2 * A)
                                         for A in runner.rows]
  for span, A in steps:  # the sampled step's forward: as the greedy one's, less the
    census = inspect.hlo_census(  # choice's two all-reduces; its logits stay split
        runner.compiled["forward", span, A].as_text()).counts()
    assert census == {"all-reduce": {**census["all-reduce"], "count": 2 * layers + 1}}
  for program, rows in sampled:
    gathered = gathered_shapes(program.as_text())
    assert gathered and all(V // 4 not in shape and V not in shape for shape in gathered)
    assert max(math.prod(shape) for shape in gathered) <= rows * 4 * TOP_LOGPROBS


def copied_shapes(hlo: str) -> list[tuple[int, ...]]:
  """The result shapes of a program's copies."""
  import re
  found = re.findall(r"= [a-z0-9]+\[([0-9,]*)\][^ ]* copy\(", hlo)
  return [tuple(int(n) for n in dims.split(",") if n) for dims in found]


def gathered_shapes(hlo: str) -> list[tuple[int, ...]]:
  """The result shapes of a program's all-gathers."""
  import re
  found = re.findall(r"= [a-z0-9]+\[([0-9,]*)\][^ ]* all-gather(?:-start)?\(", hlo)
  return [tuple(int(n) for n in dims.split(",") if n) for dims in found]


def start_server(root, checkpoint, *sets) -> tuple[subprocess.Popen, str]:
  """`scripts/run.py serve` on tiny.yaml's mesh, 8 slots, model name 'm', one prompt bucket
  and one attention span (3 programs to compile, not 11): the process and its /v1 URL from
  the ready line."""
  process = subprocess.Popen(
      [sys.executable, str(root / "scripts" / "run.py"), "serve", "--config",
       str(root / "configs" / "tiny.yaml"), "--port", "0", "--set",
       f"model.checkpoint={checkpoint}", "--set", "serve.max_slots=8", "--set",
       "serve.model_name=m", "--set", "serve.min_bucket=64",
       *[a for s in sets for a in ("--set", s)]],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())
  lines = []
  for line in process.stdout:
    lines.append(line)
    if line.startswith("serving"):
      break
  assert lines and lines[-1].startswith("serving 'm' at http://127.0.0.1:"), "".join(lines)
  return process, lines[-1].split(" at ")[1].split()[0]


def wait_running(url: str, n: int) -> None:
  while f"jaxpar_running_slots {n}.0".encode() not in urllib.request.urlopen(
      url.removesuffix("/v1") + "/metrics").read():
    time.sleep(0.005)


def test_serve_command_and_sigterm(root, checkpoint, tmp_path):
  """`scripts/run.py serve`: a ready line with the address; SIGTERM while a request is in
  flight lets it finish, then the process exits cleanly."""
  process, url = start_server(root, checkpoint)
  try:
    body = json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 20, "temperature": 0})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = pool.submit(post, url + "/completions", body)
      wait_running(url, 1)
      process.send_signal(signal.SIGTERM)
      code, answer = pending.result(timeout=60)
    assert code == 200 and answer["choices"][0]["finish_reason"] == "length"
    assert len(answer["choices"][0]["token_ids"]) == 20
    assert process.wait(timeout=60) == 0
    assert "server stopped" in process.stdout.read()
  finally:
    process.kill()


def test_sigterm_past_the_shutdown_timeout_ends_every_request_cleanly(root, checkpoint):
  """serve.shutdown_timeout 0: requests still running at SIGTERM end at once, each with an
  OpenAI-style error (a 503 to a waiting client; an error event and [DONE] to a stream) and
  a log line; no traceback."""
  import http.client
  process, url = start_server(root, checkpoint, "serve.shutdown_timeout=0")
  try:
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 60, "temperature": 0}
    stream = http.client.HTTPConnection(host, int(port), timeout=60)
    stream.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                   {"Content-Type": "application/json"})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = pool.submit(post, url + "/completions", json.dumps(body))
      wait_running(url, 2)
      process.send_signal(signal.SIGTERM)
      code, answer = pending.result(timeout=60)
    assert code == 503 and answer["error"]["code"] == "shutting_down", answer
    events = [line for line in stream.getresponse().read().decode().splitlines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert process.wait(timeout=60) == 0
    log = process.stdout.read()
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert log.count("new tokens, cancelled") == 2, log
  finally:
    process.kill()
