"""The output processor: turns a request's accepted tokens into its Outputs (no JAX).

Each token is recorded and counted (the first one's latency too), ends the request on EOS (not
with `ignore_eos`), on one of its `stop_token_ids` or at `max_tokens`, and is detokenised
incrementally: the text sent holds back what may still turn into a stop string or a
multi-byte character. A request that ends gets its last Output with
the finish reason, and `on_finish` is told first, so that its row frees.
"""

import time
from collections.abc import Callable

from jaxpar.serve.metrics import Metrics
from jaxpar.serve.request import Output, Stream, TokenLogprobs


class OutputProcessor:
  """Outputs for the requests of one engine; `detokenize` None: token ids only."""

  def __init__(self, *, eos_ids, detokenize: Callable[[list[int]], str] | None,
               metrics: Metrics, on_finish: Callable[[Stream], None]):
    self.eos_ids, self.detokenize = set(eos_ids), detokenize
    self.metrics, self.on_finish = metrics, on_finish

  def accept(self, stream: Stream, token: int, logprobs: TokenLogprobs | None = None) -> None:
    """The next token of `stream` (and its log-probabilities, when the request asks for
    them): recorded, streamed, maybe its last."""
    now = time.perf_counter()
    if stream.params.max_tokens == 0:  # echo alone: the prompt scored, no new token
      self.finish(stream, "length")
      return
    if stream.first_token_at is None:
      stream.first_token_at = now
      self.metrics.first_token(now - stream.submitted)
    stream.token_ids.append(token)
    lps = None
    if stream.logprobs is not None:
      lps = [logprobs]
      stream.logprobs.append(logprobs)
    self.metrics.tokens(1)
    reason, p = None, stream.params
    if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
      reason = "stop"
    elif stream.matcher is not None and stream.matcher.is_stopped():
      reason = "stop"  # the grammar is complete: nothing may follow
    elif len(stream.token_ids) >= stream.params.max_tokens:
      reason = "length"
    text, hit = self.text(stream, final=reason is not None)
    if hit:
      reason = "stop"
    if reason is None:
      stream._listener(Output([token], text, logprobs=lps))
      return
    self.finish(stream, reason, token_ids=[token], text=text, logprobs=lps)

  def text(self, stream: Stream, *, final: bool) -> tuple[str, bool]:
    """The new text to send, and whether a stop string ended the request (not before
    `min_tokens`). Text that may be the start of a stop string, or of a multi-byte character,
    is held back until known. EOS and a stop token id that ended the request give no text."""
    if self.detokenize is None:
      return "", False
    p = stream.params
    ids = [t for t in stream.token_ids if t not in self.eos_ids]
    if ids and ids[-1] in p.stop_token_ids:
      ids = ids[:-1]
    full = self.detokenize(ids)
    hit = False
    for stop in p.stop if len(stream.token_ids) >= p.min_tokens else ():
      at = full.find(stop)
      if at >= 0:
        full, hit = full[:at], True
    stream.text = full
    ready = len(full)
    if not (final or hit):
      held = max((len(s) - 1 for s in stream.params.stop), default=0)
      ready = max(stream._sent_text, len(full.rstrip("\ufffd")) - held)
    new = full[stream._sent_text:ready]
    stream._sent_text = ready
    return new, hit

  def finish(self, stream: Stream, reason: str, *, token_ids=(), text: str = "",
             logprobs: list[TokenLogprobs] | None = None) -> None:
    """Ends `stream` with `reason`: its row frees (`on_finish`), then its last Output."""
    stream.finish_reason = reason
    stream.finished_at = time.perf_counter()
    self.on_finish(stream)
    if reason in ("stop", "length") and len(stream.token_ids) > 1:
      per_token = (stream.finished_at - stream.first_token_at) / (len(stream.token_ids) - 1)
      self.metrics.token_time(per_token)
    self.metrics.finished(reason)
    stream._listener(Output(list(token_ids), text, reason, logprobs))
