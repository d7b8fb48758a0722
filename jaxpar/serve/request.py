"""One request to the serving engine, without JAX: how it is decoded (`Params`), what it gives
back (`Output`, through its `Stream`), and the refusals (`RequestError`, `check`)."""

import dataclasses
import queue
import time
from collections.abc import Callable


class RequestError(ValueError):
  """A request the engine refuses: `param` names the field; `status` is the HTTP status the
  server answers with (400 invalid, 429 queue full, 503 shutting down)."""

  def __init__(self, message: str, *, param: str | None = None, status: int = 400):
    super().__init__(message)
    self.param, self.status = param, status


MAX_LOGPROBS = 20  # alternatives per token, at most (jaxpar.runtime.sampling.TOP_LOGPROBS)
MAX_LOGIT_BIAS = 300  # logit_bias entries, at most (OpenAI's limit)
MAX_STOP_TOKEN_IDS = 16


@dataclasses.dataclass(frozen=True)
class Params:
  """How one request is decoded: up to `max_tokens` new tokens (EOS, `stop_token_ids` and
  stop strings end it sooner; not before `min_tokens`; EOS not at all with `ignore_eos`),
  greedy when `temperature` is 0; `seed` makes sampling repeatable; `logprobs` (0 to 20)
  gives each new token's log-probability and that many likeliest alternatives. The logits
  are adjusted first (vLLM's semantics): `logit_bias` ((token id, bias) pairs) added,
  `repetition_penalty` over the prompt's and the output's tokens, `frequency_penalty` and
  `presence_penalty` over the output's; `min_p` filters like top_p."""
  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  logit_bias: tuple[tuple[int, float], ...] = ()
  seed: int | None = None
  stop: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  min_tokens: int = 0
  ignore_eos: bool = False
  logprobs: int | None = None
  echo: bool = False  # the prompt's tokens' log-probabilities too (with `logprobs`)
  choice: int = -1  # which of a request's choices this is (its draws keyed by it); -1: one
  grammar: str | None = None  # what the output must match (llguidance's, `serve.grammar`)

  @property
  def scores_prompt(self) -> bool:
    """Whether the prefill gives the prompt's log-probabilities (echo with logprobs)."""
    return self.echo and self.logprobs is not None

  def greedy(self) -> bool:
    """Whether the likeliest token is all a step needs for it: no draw, no adjustment of the
    logits, no log-probabilities."""
    return (self.temperature == 0 and self.speculates() and not self.logit_bias
            and not self.min_tokens and self.presence_penalty == 0
            and self.frequency_penalty == 0 and self.repetition_penalty == 1)

  def speculates(self) -> bool:
    """Whether a speculating server checks proposals for it: no grammar (its masks follow
    each token) and no log-probabilities."""
    return self.logprobs is None and self.grammar is None


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
  """A new token's log-probability under the model (before temperature and filtering) and
  the likeliest tokens' [(token id, log-probability)], likeliest first."""
  logprob: float
  top: list[tuple[int, float]]


@dataclasses.dataclass
class Output:
  """What one request produced since its last Output; `finish_reason` is set on the last:
  'stop' (EOS or a stop string), 'length' (max_tokens), 'cancelled' or 'error'."""
  token_ids: list[int]
  text: str
  finish_reason: str | None = None
  logprobs: list[TokenLogprobs] | None = None  # one per token id, when the request asks


class Stream:
  """A submitted request: iterate it for Outputs as they come, or call `result()`."""

  def __init__(self, rid: int, prompt: list[int], params: Params,
               listener: Callable[[Output], None] | None, matcher=None):
    self.id, self.prompt, self.params = rid, prompt, params
    self.matcher = matcher  # params.grammar's (llguidance), fed each token as it is read
    self.token_ids: list[int] = []
    self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
    # With echo and logprobs: the prompt's, from its second token (set with the first Output).
    self.prompt_logprobs: list[TokenLogprobs] | None = None
    self.text = ""
    self.finish_reason: str | None = None
    self.submitted = time.perf_counter()
    self.first_token_at: float | None = None
    self.finished_at: float | None = None
    self.cancelled = False
    self._sent_text = 0
    self._queue: queue.Queue | None = None if listener else queue.Queue()
    self._listener = listener or self._queue.put

  def __iter__(self):
    while True:
      out = self._queue.get()
      yield out
      if out.finish_reason is not None:
        return

  def result(self) -> "Stream":
    """Waits until the request is done (only without a listener)."""
    for _ in self:
      pass
    return self

  def cancel(self) -> None:
    """Frees the request's slot at the next step (its last Output says 'cancelled')."""
    self.cancelled = True


def check(prompt: list[int], params: Params, *, vocab_size: int, length: int,
          can_detokenize: bool) -> None:
  """RequestError for a request that a model of `vocab_size` tokens, serving rows of `length`
  positions, cannot run (before it is queued)."""
  if not prompt:
    raise RequestError("the prompt is empty: give at least one token", param="prompt")
  bad = [t for t in prompt if not 0 <= t < vocab_size]
  if bad:
    raise RequestError(f"token id {bad[0]} is outside the vocabulary (0 to "
                       f"{vocab_size - 1})", param="prompt")
  if params.max_tokens < (0 if params.echo else 1):
    raise RequestError(f"max_tokens={params.max_tokens}: must be at least 1 (0 with echo)",
                       param="max_tokens")
  if len(prompt) + params.max_tokens > length:
    raise RequestError(f"this model's maximum context length is {length} tokens; the "
                       f"request has {len(prompt)} prompt tokens and max_tokens="
                       f"{params.max_tokens}: shorten the prompt or lower max_tokens",
                       param="max_tokens" if len(prompt) < length else "prompt")
  if params.temperature < 0 or params.top_k < 0 or not 0 < params.top_p <= 1:
    raise RequestError(f"temperature={params.temperature}, top_k={params.top_k}, top_p="
                       f"{params.top_p}: need temperature >= 0, top_k >= 0 and "
                       f"0 < top_p <= 1", param="temperature")
  for name, low, high in [("min_p", 0, 1), ("presence_penalty", -2, 2),
                          ("frequency_penalty", -2, 2), ("repetition_penalty", 0, 2)]:
    value = getattr(params, name)
    if not low <= value <= high or (name == "repetition_penalty" and value == 0):
      raise RequestError(f"{name}={value}: expected a number from {low} to {high}"
                         f"{' (not 0)' if name == 'repetition_penalty' else ''}", param=name)
  tokens = [("logit_bias", t, MAX_LOGIT_BIAS, params.logit_bias) for t, _ in params.logit_bias]
  tokens += [("stop_token_ids", t, MAX_STOP_TOKEN_IDS, params.stop_token_ids)
             for t in params.stop_token_ids]
  for name, t, most, given in tokens:
    if not 0 <= t < vocab_size or len(given) > most:
      raise RequestError(f"{name}: token id {t} of {len(given)} (expected at most {most} "
                         f"ids from 0 to {vocab_size - 1})", param=name)
  bad = [(t, b) for t, b in params.logit_bias if not -100 <= b <= 100]
  if bad:
    raise RequestError(f"logit_bias: token {bad[0][0]} has bias {bad[0][1]}; expected -100 "
                       f"to 100", param="logit_bias")
  if not 0 <= params.min_tokens <= params.max_tokens:
    raise RequestError(f"min_tokens={params.min_tokens}: expected 0 to max_tokens="
                       f"{params.max_tokens}", param="min_tokens")
  if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
    raise RequestError(f"logprobs={params.logprobs}: expected 0 to {MAX_LOGPROBS} "
                       f"alternatives per token", param="logprobs")
  if params.stop and not can_detokenize:
    raise RequestError("stop strings need a tokenizer (tokenizer.json in the checkpoint)",
                       param="stop")
