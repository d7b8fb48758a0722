"""The README's Python examples run verbatim, in a fresh process (as a new user pastes them)."""

import re
import subprocess
import sys


def test_readme_python_blocks_run_as_written(root, tmp_path):
  text = (root / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "the README has no Python example"
  for i, code in enumerate(blocks):
    script = tmp_path / f"block_{i}.py"
    script.write_text(code)
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"README block {i} failed:\n{code}\n{proc.stderr[-3000:]}"
