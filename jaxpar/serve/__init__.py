"""Serving: the continuous-batching engine (`engine`) and the OpenAI-compatible HTTP server
(`server`)."""

from jaxpar.serve.engine import Engine, Output, Params, RequestError, Stream, build

__all__ = ["Engine", "Output", "Params", "RequestError", "Stream", "build"]
