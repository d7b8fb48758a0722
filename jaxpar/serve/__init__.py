"""Serving: the continuous-batching engine (`engine`, over a `scheduler`, a runner and an
`output` processor) and the OpenAI-compatible HTTP server (`server`).

The names below load on first use, so that the JAX-free parts (`request`, `scheduler`,
`output`) import without JAX."""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from jaxpar.serve.engine import Engine, build
  from jaxpar.serve.request import Output, Params, RequestError, Stream

_WHERE = {"Engine": "engine", "build": "engine", "Output": "request", "Params": "request",
          "RequestError": "request", "Stream": "request"}
__all__ = ["Engine", "Output", "Params", "RequestError", "Stream", "build"]


def __getattr__(name: str):
  if name in _WHERE:
    return getattr(importlib.import_module(f"jaxpar.serve.{_WHERE[name]}"), name)
  raise AttributeError(f"module 'jaxpar.serve' has no attribute {name!r}")
