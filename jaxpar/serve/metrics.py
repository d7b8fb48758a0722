"""What `GET /metrics` reports (Prometheus text format): queue length, running slots, tokens
generated (and a tokens/s gauge over the last 10 s), prompt tokens admitted and those reused
from a cached prefix, speculation's proposed and accepted tokens and its mean accepted
length, time to first token and time per output token histograms, requests by
finish reason."""

import collections
import threading
import time
from collections.abc import Callable

import prometheus_client as prom

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
  """One engine's metrics, in a registry of their own."""

  def __init__(self, window_s: float = 10.0):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self._queue = prom.Gauge("jaxpar_queue_length", "requests waiting for a slot", registry=r)
    self._running = prom.Gauge("jaxpar_running_slots", "slots decoding a request", registry=r)
    self._tokens = prom.Counter("jaxpar_generated_tokens", "output tokens generated", registry=r)
    self._rate = prom.Gauge("jaxpar_tokens_per_second",
                            f"output tokens per second over the last {window_s:g} s", registry=r)
    self._ttft = prom.Histogram("jaxpar_time_to_first_token_seconds",
                                "from a request's arrival to its first token", buckets=_SECONDS,
                                registry=r)
    self._tpot = prom.Histogram("jaxpar_time_per_output_token_seconds",
                                "mean time between a request's tokens after the first",
                                buckets=_SECONDS, registry=r)
    self._prompt = prom.Counter("jaxpar_prompt_tokens", "prompt tokens admitted", registry=r)
    self._reused = prom.Counter("jaxpar_prefix_reused_tokens",
                                "prompt tokens whose keys and values came from a cached prefix",
                                registry=r)
    self._proposed = prom.Counter("jaxpar_speculative_proposed_tokens",
                                  "tokens proposed to the model for checking", registry=r)
    self._accepted = prom.Counter("jaxpar_speculative_accepted_tokens",
                                  "proposed tokens the model kept", registry=r)
    self._checks = prom.Counter("jaxpar_speculative_checks",
                                "passes of a request's row that checked proposals", registry=r)
    self._mean = prom.Gauge("jaxpar_speculative_mean_accepted_length",
                            "tokens a request made per pass that checked proposals (1 + "
                            "accepted / checks)", registry=r)
    self._mean.set_function(self.mean_accepted_length)
    self._requests = prom.Counter("jaxpar_requests", "requests ended, by finish reason",
                                  ["finish_reason"], registry=r)
    self._window_s, self._recent = window_s, collections.deque()
    self._lock = threading.Lock()
    self._rate.set_function(self.tokens_per_second)

  def bind(self, *, queue: Callable[[], int], running: Callable[[], int]) -> None:
    self._queue.set_function(queue)
    self._running.set_function(running)

  def tokens(self, n: int) -> None:
    self._tokens.inc(n)
    with self._lock:
      self._recent.append((time.perf_counter(), n))

  def tokens_per_second(self) -> float:
    now = time.perf_counter()
    with self._lock:
      while self._recent and self._recent[0][0] < now - self._window_s:
        self._recent.popleft()
      return sum(n for _, n in self._recent) / self._window_s

  def prompt_tokens(self, total: int, reused: int) -> None:
    self._prompt.inc(total)
    self._reused.inc(reused)

  def speculated(self, proposed: int, accepted: int, checks: int) -> None:
    self._proposed.inc(proposed)
    self._accepted.inc(accepted)
    self._checks.inc(checks)

  def mean_accepted_length(self) -> float:
    total = lambda counter: next(s.value for s in counter.collect()[0].samples
                                 if s.name.endswith("_total"))
    checks = total(self._checks)
    return 1 + total(self._accepted) / checks if checks else 0.0

  def first_token(self, seconds: float) -> None:
    self._ttft.observe(seconds)

  def token_time(self, seconds: float) -> None:
    self._tpot.observe(seconds)

  def finished(self, reason: str) -> None:
    self._requests.labels(finish_reason=reason).inc()

  def text(self) -> bytes:
    return prom.generate_latest(self.registry)
