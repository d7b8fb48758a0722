"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) in front of one `Engine`.

    POST /v1/completions        prompt as text or token ids; "stream": true for server-sent events
    POST /v1/chat/completions   messages through the checkpoint's chat template
    POST /tokenize, /detokenize text (or chat messages) to token ids and back, as vLLM
    GET  /v1/models, /health, /metrics (Prometheus)

Each request is queued on the engine with a listener that hands its Outputs to the request's
asyncio queue; a streamed response sends them as they come. A client that goes away cancels
its request, which frees the slot at the engine's next step. A request for `n` choices (or
`best_of` candidates, of which the `n` likeliest return) queues that many streams of one prompt,
one after another, so the scheduler prefills the prompt once and the others start from the
first's cached prefix (each computes its last token only; on a pipeline, which reuses no
prefix, each is prefilled whole); choice i's draws are keyed by (seed, i, token number).
"""

import asyncio
import dataclasses
import json
import signal
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from jaxpar.distributed import say
from jaxpar.serve import openai_api as api
from jaxpar.serve import grammar, tools
from jaxpar.serve.engine import Engine
from jaxpar.serve.request import Output, RequestError, Stream


def make_app(engine: Engine, *, limits: api.Limits, tokenizer=None, template=None,
             log: bool = True) -> FastAPI:
  app = FastAPI(title="jaxpar", docs_url=None, redoc_url=None)
  created = int(time.time())
  handler = _Completions(engine, limits, tokenizer, template, log)

  @app.exception_handler(api.ApiError)
  async def api_error(_, e: api.ApiError):
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(RequestError)
  async def request_error(_, e: RequestError):
    return await api_error(_, api.ApiError(e.status, str(e), param=e.param))

  @app.exception_handler(404)
  async def not_found(request: Request, _):
    e = api.ApiError(404, f"no route {request.method} {request.url.path}", code="not_found")
    return JSONResponse(e.body(), status_code=404)

  @app.exception_handler(405)
  async def wrong_method(request: Request, _):
    e = api.ApiError(405, f"{request.method} is not allowed on {request.url.path}")
    return JSONResponse(e.body(), status_code=405)

  @app.get("/health")
  async def health():
    return {"status": "ok", "running": engine.running(), "slots": engine.slots}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": limits.model, "object": "model",
                                        "created": created, "owned_by": "jaxpar",
                                        "max_model_len": limits.context}]}

  @app.get("/metrics")
  async def metrics():
    return PlainTextResponse(engine.metrics.text().decode(),
                             media_type="text/plain; version=0.0.4")

  @app.post("/v1/completions")
  async def completions(request: Request):
    return await handler(request, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    return await handler(request, chat=True)

  @app.post("/tokenize")
  async def tokenize(request: Request):
    return await handler.tokenize(request)

  @app.post("/detokenize")
  async def detokenize(request: Request):
    return await handler.detokenize(request)

  return app


class _Completions:
  """A completion request: parsed, queued on the engine, answered whole or streamed."""

  def __init__(self, engine: Engine, limits: api.Limits, tokenizer, template, log: bool):
    self.engine, self.limits, self.log = engine, limits, log
    self.tokenizer, self.template = tokenizer, template
    self.family = engine.runner.generator.config.model.family
    # The tokenizer's special tokens (text -> id): a constrained call writes its markers so.
    self.special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()
                    if t.special} if tokenizer is not None else {}

  def raw_text(self, token_ids: list[int]) -> str:
    """A reply's text with its special tokens (tool-call markers), EOS left out."""
    eos = self.engine.eos_ids
    return self.tokenizer.decode([t for t in token_ids if t not in eos],
                                 skip_special_tokens=False)

  def token_text(self, token: int) -> str:
    """A token's own text (log-probabilities name tokens by it), `token_id:N` without a
    tokenizer."""
    if self.tokenizer is None:
      return f"token_id:{token}"
    return self.tokenizer.decode([token], skip_special_tokens=False)

  def _logprobs(self, chat: bool, entries, token_ids: list[int], offset: int = 0):
    if entries is None:
      return None
    if chat:
      return api.chat_logprobs(entries, token_ids, self.token_text)
    return api.completion_logprobs(entries, token_ids, self.token_text, offset)

  def _tools(self, body: dict) -> tuple[list | None, str | None, str | None]:
    """A chat body's tools to render, the format to parse calls in and what `tool_choice`
    forces (`tools.requested`)."""
    if self.template is None:
      return None, None, None
    return tools.requested(body, self.template.source, self.family)

  def _grammar(self, body: dict, listed: list | None, tool_format: str | None,
               forced: str | None) -> str | None:
    """The grammar the reply must match: `response_format` or vLLM's options, or the calls
    `tool_choice` forces, in the model's format (`grammar.requested`, `tools.constraint`)."""
    calls = tools.constraint(listed, tool_format, forced, self.special)
    asked = grammar.requested(body, calls)
    return None if asked is None else self.engine.grammar(*asked)

  async def tokenize(self, request: Request) -> dict:
    """/tokenize: text, or chat messages (and tools) through the template, as token ids."""
    body = api.parse_json(await self._read(request))
    if "model" in body:
      api.check_model(body, self.limits)
    chat = "messages" in body
    tokens = await asyncio.to_thread(
        *(api.chat_prompt, body, self.template, self.tokenizer, self._tools(body)[0]) if chat
        else (api.text_tokens, body, self.tokenizer))
    return {"count": len(tokens), "max_model_len": self.limits.context, "tokens": tokens}

  async def detokenize(self, request: Request) -> dict:
    body = api.parse_json(await self._read(request))
    if "model" in body:
      api.check_model(body, self.limits)
    return {"prompt": api.detokenize(body, self.tokenizer, self.engine.vocab_size)}

  async def __call__(self, request: Request, *, chat: bool):
    body = api.parse_json(await self._read(request))
    api.check_model(body, self.limits)
    listed, tool_format, forced = self._tools(body) if chat else (None, None, None)
    # Off the event loop: a long text prompt must not hold up /health and the streams.
    prompt = await asyncio.to_thread(
        *(api.chat_prompt, body, self.template, self.tokenizer, listed) if chat else
        (api.completion_prompt, body, self.tokenizer))
    params, stream_it, include_usage = api.sampling_params(body, self.limits,
                                                           prompt_len=len(prompt), chat=chat)
    rules = await asyncio.to_thread(self._grammar, body, listed, tool_format, forced)
    params = dataclasses.replace(params, grammar=rules)
    n, best_of = api.choice_counts(body, chat=chat, stream=stream_it, most=self.engine.slots)
    streams, outputs = self._submit(prompt, params, best_of)
    echo = api.echo_text(body, prompt, self.tokenizer) if params.echo else None
    reply = _Reply(streams, outputs, n, params.logprobs is not None,
                   api.new_id("chatcmpl" if chat else "cmpl"), echo, tool_format)
    if stream_it:
      events = self._events(reply, chat=chat, include_usage=include_usage)
      return StreamingResponse(events, media_type="text/event-stream")
    return await self._whole(request, reply, chat=chat)

  def _submit(self, prompt: list[int], params,
              count: int) -> tuple[list[Stream], asyncio.Queue]:
    """`count` streams of `prompt` queued in a row (several: each its own `choice`; all with
    log-probabilities, which rank best_of's candidates); their Outputs go to one asyncio
    queue as (choice, Output)."""
    loop, outputs, streams = asyncio.get_running_loop(), asyncio.Queue(), []

    def listener(i: int):
      def put(out: Output) -> None:
        try:
          loop.call_soon_threadsafe(outputs.put_nowait, (i, out))
        except RuntimeError:  # the server's loop has closed: nobody is left to tell
          streams[i].cancel()
      return put
    if count > 1:
      params = dataclasses.replace(params, logprobs=params.logprobs or 0)
    try:
      for i in range(count):  # only the first echoes (but for max_tokens 0): the others reuse
        echo = params.echo and (i == 0 or params.max_tokens == 0)  # its prefix
        choice = params if count == 1 else dataclasses.replace(params, choice=i, echo=echo)
        streams.append(self.engine.submit(prompt, choice, listener=listener(i)))
    except RequestError:  # answered by the app's handler
      for stream in streams:
        stream.cancel()
      raise
    return streams, outputs

  async def _read(self, request: Request) -> bytes:
    """The body, refused with a 413 as soon as it passes `limits.body_bytes`."""
    limit, chunks, size = self.limits.body_bytes, [], 0
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
      raise api.too_large(int(declared), limit)
    async for chunk in request.stream():
      size += len(chunk)
      if size > limit:
        raise api.too_large(size, limit)
      chunks.append(chunk)
    return b"".join(chunks)

  async def _whole(self, request: Request, reply: "_Reply", *, chat: bool):
    try:
      done = 0
      while done < len(reply.streams):
        try:
          _, out = await asyncio.wait_for(reply.outputs.get(), timeout=0.25)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            reply.cancel()
            for stream in reply.streams:
              self._log(stream, "the client went away")
            return JSONResponse({}, status_code=499)
          continue
        done += out.finish_reason is not None
    finally:
      reply.cancel()
    for stream in reply.streams:
      self._log(stream)
    reasons = {stream.finish_reason for stream in reply.streams}
    if "error" in reasons:
      raise api.engine_failed()
    if "cancelled" in reasons:  # by the server: the client is still here
      raise api.shut_down(next(s for s in reply.streams if s.finish_reason == "cancelled"))
    choices = []
    for i, stream in enumerate(reply.best()):
      text, scored, entries = reply.echoed(stream.text, stream.token_ids, stream.logprobs)
      choice = api.choice(chat, text, stream.token_ids, stream.finish_reason, delta=False,
                          logprobs=self._logprobs(chat, entries if reply.logprobs else None,
                                                  scored), index=i)
      if reply.tool_format:
        content, calls = tools.parse(self.raw_text(stream.token_ids), reply.tool_format)
        if calls:
          choice["message"] = {"role": "assistant", "content": content or None,
                               "tool_calls": [c.body(j) for j, c in enumerate(calls)]}
          choice["finish_reason"] = "tool_calls"
      choices.append(choice)
    result = api.envelope(chat, reply.rid, self.limits.model, choices, chunk=False)
    result["usage"] = reply.usage()
    return result

  async def _events(self, reply: "_Reply", *, chat: bool, include_usage: bool):
    model, rid = self.limits.model, reply.rid

    def event(i: int, payload: dict) -> str:
      chunk = api.envelope(chat, rid, model, [{**payload, "index": i}], chunk=True)
      return f"data: {json.dumps(chunk)}\n\n"
    try:
      if chat:  # the role first, as OpenAI sends it
        for i in range(len(reply.streams)):
          yield event(i, {"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
      offsets = [0] * len(reply.streams)  # where each choice's next token's text starts
      started = [False] * len(reply.streams)
      held = [tools.StreamedReply(reply.tool_format) for _ in reply.streams]
      done = 0
      while done < len(reply.streams):
        i, out = await reply.outputs.get()
        stream = reply.streams[i]
        if out.finish_reason in ("error", "cancelled"):  # cancelled by the server: shutdown
          error = api.engine_failed() if out.finish_reason == "error" else api.shut_down(stream)
          self._log(stream)
          yield f"data: {json.dumps(error.body())}\n\n"
          break
        text, scored, entries = out.text, out.token_ids, out.logprobs
        if not started[i]:  # the echoed prompt comes with the first
          started[i] = True
          text, scored, entries = reply.echoed(text, scored, entries)
        calls = []
        if reply.tool_format:  # the text that may be a call is held back, the calls sent whole
          text, calls = held[i].step(self.raw_text(stream.token_ids),
                                     out.finish_reason is not None)
        if text or out.token_ids or out.finish_reason:
          logprobs = self._logprobs(chat, entries if reply.logprobs else None, scored,
                                    offsets[i])
          if logprobs is not None and not chat:
            offsets[i] += sum(map(len, logprobs["tokens"]))
          delta = api.choice(chat, text, out.token_ids, out.finish_reason, delta=True,
                             logprobs=logprobs)
          if calls:
            delta["delta"]["tool_calls"] = [c.body(j) for j, c in enumerate(calls)]
            delta["finish_reason"] = "tool_calls"
          yield event(i, delta)
        if out.finish_reason is not None:
          done += 1
          self._log(stream)
      if done == len(reply.streams) and include_usage:
        last = api.envelope(chat, rid, model, [], chunk=True)
        last["usage"] = reply.usage()
        yield f"data: {json.dumps(last)}\n\n"
      yield "data: [DONE]\n\n"
    finally:  # the client went away (the task is cancelled) or the stream ended
      for stream in reply.streams:
        if stream.finish_reason is None:
          stream.cancel()
          self._log(stream, "the client went away")

  def _log(self, stream: Stream, why: str = "") -> None:
    """One line per request: its tokens, how it ended, its first token's latency."""
    if not self.log:
      return
    n = len(stream.token_ids)
    line = (f"request {stream.id}: {len(stream.prompt)} prompt + {n} new tokens, "
            f"{why or stream.finish_reason}")
    if stream.first_token_at is not None:
      ttft = stream.first_token_at - stream.submitted
      total = (stream.finished_at or time.perf_counter()) - stream.submitted
      line += f"; first token {ttft * 1e3:.0f} ms"
      if n > 1 and total > ttft:
        line += f", {(n - 1) / (total - ttft):.1f} tok/s after it"
    say(line)


@dataclasses.dataclass
class _Reply:
  """A request's streams (one per choice, or per best_of candidate) and their Outputs'
  queue; `logprobs`: whether the client asked for them."""
  streams: list[Stream]
  outputs: asyncio.Queue
  n: int
  logprobs: bool
  rid: str
  echo: str | None = None  # the prompt's text, to send first (completions' echo)
  tool_format: str | None = None  # the tool-call format to parse replies in (chat, tools)

  def echoed(self, text: str, token_ids: list[int], logprobs):
    """(text, the tokens log-probabilities describe, their log-probabilities), the echoed
    prompt's before a choice's first (its first token's null; the first stream's)."""
    if self.echo is None:
      return text, token_ids, logprobs
    prompt = self.streams[0].prompt
    if logprobs is not None:
      logprobs = [None, *(self.streams[0].prompt_logprobs or [])] + logprobs
    return self.echo + text, prompt + token_ids, logprobs

  def cancel(self) -> None:
    for stream in self.streams:
      if stream.finish_reason is None:
        stream.cancel()

  def best(self) -> list[Stream]:
    """The n choices: with best_of, the n candidates of the highest total log-probability
    (in that order), as vLLM ranks them."""
    if len(self.streams) == self.n:
      return self.streams
    total = lambda s: sum(e.logprob for e in s.logprobs)
    return sorted(self.streams, key=total, reverse=True)[:self.n]

  def usage(self) -> dict:
    """Prompt tokens once; every candidate's tokens (best_of's unreturned ones too)."""
    return api.usage(len(self.streams[0].prompt), sum(len(s.token_ids) for s in self.streams))


def run(engine: Engine, app: FastAPI, *, host: str, port: int, ready: str,
        shutdown_timeout: float) -> None:
  """Serves until SIGTERM or Ctrl-C: then requests in flight get `shutdown_timeout` seconds
  to finish, the rest are cancelled, and the engine stops."""
  import uvicorn

  class Server(uvicorn.Server):
    async def startup(self, sockets=None):
      await super().startup(sockets=sockets)
      if self.started:
        bound = self.servers[0].sockets[0].getsockname()
        say(ready.format(address=f"http://{bound[0]}:{bound[1]}"))

    async def shutdown(self, sockets=None):
      # First the engine: requests in flight get `shutdown_timeout` to finish, the rest end
      # (a 503 error to a waiting client, an error event and [DONE] to a stream, a log line
      # each) while the connections are still open; new ones are refused with 503.
      await asyncio.to_thread(engine.stop, timeout=shutdown_timeout)
      await super().shutdown(sockets=sockets)

  config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                          timeout_graceful_shutdown=5, access_log=False)
  server = Server(config)
  # uvicorn handles SIGTERM and Ctrl-C (a graceful shutdown), then raises the signal again
  # for the handler that was there before: this one, so the process ends normally.
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda *_: None)
  try:
    server.run()
  finally:
    engine.stop(timeout=0)
    say("server stopped")
