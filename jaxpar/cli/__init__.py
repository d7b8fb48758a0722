"""The command line, `scripts/run.py`: `main` parses, checks, starts JAX and runs one command
module (`forward`, `classify`, `generate`, `serve`, `convert`, `plan`); `prologue` is what they
share. Importing this package imports no JAX: `--devices` must act before JAX starts."""

from jaxpar.cli.main import main
from jaxpar.cli.prologue import (check_token_ids, describe_model, enable_compilation_cache,
                                 load_tokenizer, parse_prompt_ids, pick_devices)

__all__ = ["check_token_ids", "describe_model", "enable_compilation_cache", "load_tokenizer",
           "main", "parse_prompt_ids", "pick_devices"]
