"""Test set-up: 8 emulated CPU devices, a persistent compilation cache and quick compiles.

XLA_FLAGS must be set before JAX is imported, so this runs first. Fixtures build small models
once per session.

The tests' models are tiny, so compiling costs more than running: XLA's CPU backend compiles
without LLVM's optimisations here (`--xla_backend_optimization_level=0`, which cut a cold run
from 8.6 to 7.3 minutes on 2 cores) and emits its fusions with the older elemental emitters
(`--xla_cpu_use_fusion_emitters=false`: 20-25% less compile time for the same programs).
Results are checked against the same references at the same tolerances; the HLO
(partitioning, fusion, collectives) is the one users get. The CLI processes the tests start
inherit the flags.
"""

import contextlib
import dataclasses
import os
import pathlib

QUICK_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count=8 {QUICK_COMPILE}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxpar import config as config_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# JAXPAR_TEST_CACHE points a run at another cache (an empty one measures a cold run).
CACHE = pathlib.Path(os.environ.get("JAXPAR_TEST_CACHE", ROOT / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", str(CACHE))
# The CLI processes the tests start (README blocks, ranks, conversions) share it.
os.environ["JAXPAR_CACHE_DIR"] = str(CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The modules by their time in a cold run, slowest first (on 2 cores, `--durations=0`: 132 s
# for test_generate down to 17 s for test_hf). `--dist loadfile` hands each module whole to
# the next free worker, in collection order (`--no-loadscope-reorder`, pyproject.toml): the
# longest first, so the two workers end together (measured: the workers' sums differ by 26 s
# in xdist's own order, by test counts; a few seconds in this one).
SLOWEST_FIRST = ("test_generate", "test_serve", "test_user_reports", "test_speculative",
                 "test_multiprocess", "test_quant", "test_llama", "test_checkpoint",
                 "test_pipeline", "test_structured", "test_properties", "test_plan",
                 "test_readme", "test_uneven", "test_forward", "test_own_model", "test_hf")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable within a module


def build_generator(config, devices, data=1, stage=1, model=1, **model_overrides):
  """A `generate.Generator` of `config` on a data x stage x model mesh of the first devices,
  with `model_overrides` (e.g. scan_layers, quantize) and no EOS."""
  from jaxpar.config import MeshConfig
  from jaxpar.mesh import make_mesh
  from jaxpar.runtime import generate
  config = dataclasses.replace(
      config, mesh=MeshConfig(data=data, stage=stage, model=model),
      model=config_lib.replace_model(config.model, **model_overrides))
  return generate.build(config, make_mesh(config.mesh, devices=devices[:data * stage * model]),
                        eos_id=-1)


def cli_env() -> dict:
  """The environment of a CLI process a test starts: this one's, with the quick compiles and
  no device count (its --devices or config decides)."""
  return {**os.environ, "XLA_FLAGS": QUICK_COMPILE}


@pytest.fixture(scope="session", autouse=True)
def torch_on_one_thread():
  """transformers' reference models are tiny: on 2 busy cores, torch's default of a thread per
  core made a greedy generate 20x slower than one thread (the test extra has torch)."""
  import torch
  torch.set_num_threads(1)


@pytest.fixture(scope="session")
def root() -> pathlib.Path:
  return ROOT


@pytest.fixture(scope="session")
def tiny() -> config_lib.Config:
  """configs/tiny.yaml: vocab 250 (padded on every split), 8 heads, 2 layers."""
  return config_lib.load(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def devices() -> list:
  assert len(jax.devices()) == 8, "tests expect 8 emulated CPU devices"
  return jax.devices()


def write_hf_gpt2(path: pathlib.Path, *, n_layer: int, seed: int) -> pathlib.Path:
  """A randomly initialised Hugging Face GPT-2 saved with save_pretrained (config.json +
  model.safetensors): vocab 250 (padded on every split), width 64, 8 heads, 64 positions;
  initializer_range 0.2 so greedy tokens depend on the context."""
  import torch  # the test extra: a missing reference library is a failure, not a skip
  import transformers
  torch.manual_seed(seed)
  config = transformers.GPT2Config(vocab_size=250, n_embd=64, n_layer=n_layer, n_head=8,
                                   n_positions=64, initializer_range=0.2)
  transformers.GPT2LMHeadModel(config).save_pretrained(path)
  return path


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> pathlib.Path:
  """A 4-layer random GPT-2 checkpoint (see `write_hf_gpt2`)."""
  return write_hf_gpt2(tmp_path_factory.mktemp("hf_gpt2"), n_layer=4, seed=0)


HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
              "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
              "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
              "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}


def write_hf_decoder(path: pathlib.Path, family: str, *, seed: int = 0, dtype=None,
                     max_shard_size=None, **overrides) -> pathlib.Path:
  """A randomly initialised Llama-family model saved by `transformers`: vocab 251 (no mesh
  axis divides it), width 64, 8 query heads over 2 key/value heads, 4 layers, an untied head.
  initializer_range 0.2 and random biases and norm scales, so every parameter matters and
  greedy tokens depend on the context."""
  import torch
  import transformers
  config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[family])
  args = dict(vocab_size=251, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
              initializer_range=0.2, tie_word_embeddings=False)
  torch.manual_seed(seed)
  model = model_cls(config_cls(**{**args, **overrides})).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.3 * torch.randn_like(p))
  if dtype is not None:
    model = model.to(dtype)
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(path, **kwargs)
  return path


def byte_bpe(corpus: list[str], vocab_size: int, special: list[str]):
  """A byte-level BPE (as GPT-2's, Llama 3's and Qwen's tokenizers) trained on `corpus`, with
  `special` tokens first (ids 0, 1, ...): tokens span several characters, and any text
  can be written."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=special,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tokenizer


@contextlib.contextmanager
def serving(engine, limits, tokenizer, checkpoint):
  """The OpenAI server over a started `engine` (with `checkpoint`'s chat template), on a free
  port in a thread of this process: its base URL. Stops the server and the engine after."""
  import threading
  import time

  import uvicorn

  from jaxpar.serve import openai_api, server
  app = server.make_app(engine, limits=limits, tokenizer=tokenizer,
                        template=openai_api.ChatTemplate.load(str(checkpoint)), log=False)
  uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  while not uv.started:
    time.sleep(0.05)
  try:
    yield f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
  finally:
    uv.should_exit = True
    thread.join(timeout=10)
    engine.stop()
