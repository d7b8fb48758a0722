"""The README's Python examples run verbatim, in a fresh process (as a new user pastes them)."""

import os
import re
import subprocess
import sys

from tests.conftest import cli_env


def test_readme_python_blocks_run_as_written(root, tmp_path):
  text = (root / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "the README has no Python example"
  for i, code in enumerate(blocks):
    script = tmp_path / f"block_{i}.py"
    script.write_text(code)
    # The quick compiles of every CLI process the tests start (the README's blocks add their
    # device count to XLA_FLAGS) and the tests' compilation cache (tests/conftest.py), so a
    # repeated run compiles nothing.
    env = cli_env()
    env.update(JAX_COMPILATION_CACHE_DIR=os.environ["JAXPAR_CACHE_DIR"],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"README block {i} failed:\n{code}\n{proc.stderr[-3000:]}"
