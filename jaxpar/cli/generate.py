"""`scripts/run.py generate`: autoregressive generation with a sharded KV cache, from text
prompts, token ids or seeded prompts."""

from jaxpar import config as config_lib
from jaxpar.cli import prologue, report
from jaxpar.cli.prologue import say
from jaxpar.errors import UserError

# The flags that are shorthands for config keys.
FLAGS = {"max_new_tokens": "generate.max_new_tokens", "temperature": "generate.temperature",
         "top_k": "generate.top_k", "top_p": "generate.top_p", "seed": "run.seed"}


def add_parser(commands) -> None:
  sub = prologue.add_command(commands, "generate", "autoregressive generation with a sharded KV "
                             "cache", "configs/default.yaml")
  sub.add_argument("--prompt-ids", metavar="IDS",
                   help="prompts as token ids: rows separated by ';', ids by ',' (rows may "
                        "differ in length), e.g. '1,2,3;4,5'")
  sub.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a text prompt (repeatable); needs tokenizer.json in model.checkpoint")
  sub.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="tokens to generate per prompt (generate.max_new_tokens)")
  sub.add_argument("--temperature", type=float, help="0: greedy (generate.temperature)")
  sub.add_argument("--top-k", type=int, help="sample among the k likeliest (generate.top_k)")
  sub.add_argument("--top-p", type=float, help="nucleus sampling mass (generate.top_p)")
  sub.add_argument("--seed", type=int, help="sampling and seeded-prompt seed (run.seed)")
  sub.add_argument("--save-tokens", metavar="OUT.npy",
                   help="write the new tokens, int32 [B, max_new_tokens]; after EOS: EOS")


def overrides(args) -> list[str]:
  """The shorthand flags given, as config overrides."""
  if args.prompt and args.prompt_ids is not None:
    raise UserError("--prompt and --prompt-ids both given: pass the prompts one way, as text "
                    "(--prompt, repeatable) or as token ids (--prompt-ids '1,2;3')")
  return [f"{key}={getattr(args, flag)}" for flag, key in FLAGS.items()
          if getattr(args, flag) is not None]


def run(args, config: config_lib.Config) -> dict:
  from jaxpar.runtime import generate as gen_lib

  g = config.generate
  tokenizer = prologue.load_tokenizer(config, required=bool(args.prompt))
  prompts = _prompts(args, config, tokenizer)
  mesh = prologue.open_mesh(config, args)
  prologue.say_mesh(mesh, config.model)
  generator, param_bytes = _build(config, mesh)
  speculation = _speculation(config, generator, mesh)
  batch = generator.padded_batch(len(prompts))
  # A speculating decoder holds k positions more per row (a check's last proposals), and a
  # draft its own cache.
  length = max(map(len, prompts)) + g.max_new_tokens + (speculation.k if speculation.on else 0)
  cache_bytes = generator.cache_bytes_per_device(batch, length)
  if speculation.uses_draft:
    cache_bytes += speculation.draft.cache_bytes_per_device(batch, length)
    if speculation.draft is not generator:
      param_bytes += speculation.draft.param_bytes_per_device()
  _say_plan(config, generator, prompts, batch, cache_bytes)
  result = generator.generate(prompts, max_new_tokens=g.max_new_tokens,
                              sampling=gen_lib.Sampling(
                                  g.temperature, g.top_k, g.top_p, g.min_p, g.presence_penalty,
                                  g.frequency_penalty, g.repetition_penalty),
                              seed=config.run.seed, progress=True, speculation=speculation)
  texts = _say_result(result, tokenizer)
  checked = {}
  if speculation.on:
    checked = {"speculative": {"method": speculation.method, "k": speculation.k,
                               "proposed": result.proposed, "accepted": result.accepted,
                               "passes": result.passes}}
    rate = result.accepted / max(result.proposed, 1)
    say(f"speculative ({speculation.method}, k={speculation.k}): {result.accepted} of "
        f"{result.proposed} proposed tokens accepted ({rate:.0%}); {result.passes} passes of "
        f"the model for {result.steps} tokens per row")
  if args.save_tokens:
    report.save_npy(args.save_tokens, result.tokens.astype("int32"), "new tokens")
  new = result.tokens.shape[0] * result.steps  # the user's rows only
  return {
      **({"texts": texts} if texts else {}),
      **prologue.header("generate", mesh),
      "new_tokens": result.tokens.tolist(),
      "steps": result.steps,
      "compile_s": result.compile_s,
      "prefill_s": result.prefill_s,
      "decode_s": result.decode_s,
      "tokens_per_s": new / (result.prefill_s + result.decode_s),  # prefill included
      "decode_tokens_per_s": _decode_rate(result),
      "kv_cache_bytes_per_device": cache_bytes,
      "param_bytes_per_device": param_bytes,
      "scan_layers": generator.scan,
      **checked,
  }


def _prompts(args, config: config_lib.Config, tokenizer) -> list[list[int]]:
  """The prompts as token ids: --prompt encoded, else --prompt-ids, else seeded; checked."""
  from jaxpar.runtime import generate as gen_lib
  if args.prompt:
    prompts = [tokenizer.encode(text).ids for text in args.prompt]
  elif args.prompt_ids is not None:
    prompts = prologue.parse_prompt_ids(args.prompt_ids)
  else:
    prompts = gen_lib.seeded_prompts(config)
  prologue.check_token_ids(prompts, config.model.vocab_size)
  return prompts


def _build(config: config_lib.Config, mesh):
  """The generator and its parameter bytes per device, said."""
  from jaxpar import inspect
  from jaxpar.runtime import generate as gen_lib
  generator, seconds = prologue.timed_build(gen_lib.build, config, mesh)
  for note in generator.notes:
    say(note)
  param_bytes = generator.param_bytes_per_device()
  say(f"{prologue.params_line(config, generator.init_timings, seconds)}: "
      f"{inspect.human(param_bytes)} per device")
  return generator, param_bytes


def _speculation(config: config_lib.Config, generator, mesh):
  """`config.speculative`, its draft model built (and said) when it has one."""
  from jaxpar.runtime import generate as gen_lib
  s = config.speculative
  if s.method == "draft":
    say(f"draft model: {s.draft}")
  return gen_lib.speculation(config, generator, mesh)


def _say_plan(config: config_lib.Config, generator, prompts: list, batch: int,
              cache_bytes: int) -> None:
  """What is about to run: prompts, padding, sampling, EOS, layers, KV cache."""
  from jaxpar import inspect
  g, lengths = config.generate, [len(p) for p in prompts]
  if batch != len(prompts):
    say(f"{report.count(len(prompts), 'prompt')} padded to {batch} rows to fill the mesh (extra "
        f"rows dropped)")
  mode = "greedy" if g.temperature == 0 else (
      f"sampling (temperature {g.temperature}, top_k {g.top_k}, top_p {g.top_p}, min_p "
      f"{g.min_p})")
  penalties = [f"{k} {v}" for k, v, off in [("presence", g.presence_penalty, 0),
                                             ("frequency", g.frequency_penalty, 0),
                                             ("repetition", g.repetition_penalty, 1)] if v != off]
  if penalties:
    mode += f", penalties: {', '.join(penalties)}"
  if g.temperature == 0 and (g.top_k or g.top_p != 1):
    say(f"note: top_k {g.top_k} and top_p {g.top_p} apply when sampling; temperature 0 decodes "
        f"greedily (pass --temperature 1 to sample)")
  span = f"{min(lengths)}-{max(lengths)}" if min(lengths) != max(lengths) else str(lengths[0])
  say(f"{report.count(len(prompts), 'prompt')} of {span} tokens, {g.max_new_tokens} new "
      f"tokens each, {mode}, eos {list(generator.eos_ids) or 'none'}; "
      f"layers {'scanned' if generator.scan else 'unrolled'}; KV cache "
      f"{inspect.human(cache_bytes)} per device")


def _say_result(result, tokenizer) -> list[str] | None:
  """The speed and the first rows of new tokens (decoded when there is a tokenizer)."""
  new = result.tokens.shape[0] * result.steps  # the user's rows only
  total_s = result.prefill_s + result.decode_s
  say(f"compiled in {result.compile_s:.2f} s; prefill {result.prefill_s * 1e3:.1f} ms, decode "
      f"{result.steps} steps in {result.decode_s * 1e3:.1f} ms: {new / total_s:,.1f} tokens/s "
      f"with the prefill, {_decode_rate(result):,.1f} decoding")
  texts = [tokenizer.decode(row.tolist()) for row in result.tokens] if tokenizer else None
  for b, row in enumerate(result.tokens[:8]):
    say(f"  [{b}] {row.tolist()}" + (f" {texts[b]!r}" if texts else ""))
  if len(result.tokens) > 8:
    say(f"  ... {len(result.tokens) - 8} more rows")
  return texts


def _decode_rate(result) -> float:
  """New tokens/s of the decode loop alone (the first token of each row is the prefill's)."""
  return result.tokens.shape[0] * max(result.steps - 1, 0) / max(result.decode_s, 1e-9)
