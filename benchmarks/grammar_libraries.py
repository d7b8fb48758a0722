"""Which grammar library constrains jaxpar's structured output: llguidance, xgrammar and
outlines-core, measured on the same JSON schema and vocabulary.

Needs the three libraries, which jaxpar does not install (`pip install llguidance xgrammar
outlines-core`; a missing one is reported and skipped). The vocabulary is a byte-level BPE of
GPT-2's size (50257 tokens) trained here on synthetic English and JSON (no model hub). For each
library: the time to compile the schema (the first, then another schema), and the time to
compute the token mask at each step while a valid answer is fed token by token (median and
max); each mask must allow the answer's next token.

  python benchmarks/grammar_libraries.py

Prints a table and writes JSON to benchmarks/results/grammar_libraries.json.
"""

import importlib.util
import json
import pathlib
import random
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_json  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[a-z]+$"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}},
    "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                 "zip": {"type": "number"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"]}
OTHER = {**SCHEMA, "title": "another"}
ANSWER = json.dumps({"name": "alice", "age": 41, "tags": ["red", "blue"],
                     "address": {"city": "paris", "zip": 75001.5}})


def train_tokenizer(size: int = 50257):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  rng = random.Random(0)
  words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
           for _ in range(20000)]

  def doc() -> str:
    if rng.random() < 0.5:
      return " ".join(rng.choice(words) for _ in range(60)) + "."
    value = lambda: rng.choice([rng.choice(words), rng.randint(0, 10**6), rng.random(),
                                [rng.randint(0, 99) for _ in range(3)], {rng.choice(words): True}])
    return json.dumps({rng.choice(words): value() for _ in range(6)},
                      indent=rng.choice([None, 2]))
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([doc() for _ in range(60000)], trainers.BpeTrainer(
      vocab_size=size, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def byte_strings(tok) -> dict[int, bytes]:
  """Each token's bytes (the inverse of GPT-2's byte-to-character map)."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1)]
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  inverse = {chr(c): b for b, c in zip(bs, cs)}
  return {i: bytes(inverse[ch] for ch in s) for s, i in tok.get_vocab().items()}


def llguidance_run(tok, eos, ids):
  import llguidance
  import llguidance.numpy as lln
  vocab = llguidance.LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(), eos_token=eos)
  compile_s, matcher = [], None
  for schema in (SCHEMA, OTHER):
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(vocab, llguidance.LLMatcher.grammar_from_json_schema(schema))
    compile_s.append(time.perf_counter() - start)
  mask, steps = lln.allocate_token_bitmask(1, tok.get_vocab_size()), []
  for t in ids:
    start = time.perf_counter()
    lln.fill_next_token_bitmask(matcher, mask, 0)
    steps.append(time.perf_counter() - start)
    assert (int(mask[0, t // 32]) >> (t % 32)) & 1 and matcher.consume_token(t)
  return compile_s, steps


def xgrammar_run(tok, eos, ids):
  import xgrammar as xgr
  V = tok.get_vocab_size()
  vocab = [None] * V
  for s, i in tok.get_vocab().items():
    vocab[i] = s
  compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_LEVEL,
                                                   vocab_size=V, stop_token_ids=[eos]),
                                 max_threads=1)
  compile_s, compiled = [], None
  for schema in (SCHEMA, OTHER):
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema))
    compile_s.append(time.perf_counter() - start)
  matcher, mask, steps = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, V), []
  for t in ids:
    start = time.perf_counter()
    matcher.fill_next_token_bitmask(mask, 0)
    steps.append(time.perf_counter() - start)
    assert (int(mask[0, t // 32]) >> (t % 32)) & 1 and matcher.accept_token(t)
  return compile_s, steps


def outlines_run(tok, eos, ids):
  from outlines_core import Guide, Index, Vocabulary
  from outlines_core.json_schema import build_regex_from_schema
  tokens: dict = {}
  for i, b in byte_strings(tok).items():
    if i != eos:
      tokens.setdefault(b, []).append(i)
  vocab = Vocabulary(eos, tokens)
  compile_s, index = [], None
  for schema in (SCHEMA, OTHER):
    start = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(schema)), vocab)
    compile_s.append(time.perf_counter() - start)
  guide, steps = Guide(index), []
  for t in ids:
    start = time.perf_counter()
    allowed = guide.get_tokens()  # a list of ids (a mask still to be built from it)
    steps.append(time.perf_counter() - start)
    assert t in allowed
    guide.advance(t)
  return compile_s, steps


LIBRARIES = {"llguidance": (llguidance_run, "llguidance"), "xgrammar": (xgrammar_run, "xgrammar"),
             "outlines-core": (outlines_run, "outlines_core")}


def main() -> None:
  tok = train_tokenizer()
  eos = tok.token_to_id("<|endoftext|>")
  ids = tok.encode(ANSWER).ids
  print(f"vocabulary {tok.get_vocab_size()} tokens; an answer of {len(ids)} tokens")
  print("| library | needs | compile first (ms) | compile another (ms) | mask median (ms) | "
        "mask max (ms) |")
  print("|---|---|---|---|---|---|")
  results = {}
  for name, (run, module) in LIBRARIES.items():
    if importlib.util.find_spec(module) is None:
      print(f"| {name} | not installed: pip install {name} |")
      continue
    from importlib.metadata import requires
    needs = sorted({r.split()[0].split(";")[0].split(">")[0].split("=")[0].split("<")[0]
                    for r in (requires(name) or []) if "extra" not in r})
    compile_s, steps = run(tok, eos, ids)
    results[name] = {"requires": needs, "compile_s": compile_s, "mask_s": steps}
    print(f"| {name} | {', '.join(needs) or 'nothing'} | {compile_s[0] * 1e3:.1f} | "
          f"{compile_s[1] * 1e3:.1f} | {statistics.median(steps) * 1e3:.4f} | "
          f"{max(steps) * 1e3:.3f} |")
  write_json(str(ROOT / "benchmarks" / "results" / "grammar_libraries.json"),
             {"benchmark": "grammar_libraries", "vocab": tok.get_vocab_size(),
              "answer_tokens": len(ids), "results": results})


if __name__ == "__main__":
  main()
