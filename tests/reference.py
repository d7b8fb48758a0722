"""An independent NumPy GPT-2 forward, written from the GPT-2 equations (float64).

It shares no code with jaxpar's model: it reads the parameter dict by name and computes the
logits with plain NumPy, so it checks the model's numerics rather than restating them.
"""

import math

import numpy as np


def _layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def gpt2_logits(params: dict, tokens: np.ndarray, *, vocab_size: int, n_heads: int,
                eps: float = 1e-5):
  """Logits [B, T, vocab_size] for token ids [B, T]."""
  n_heads_of = lambda _: n_heads
  f64 = lambda a: np.asarray(a, np.float64)
  B, T = tokens.shape
  p = params
  x = f64(p["wte"])[tokens] + f64(p["wpe"])[:T]
  blocks = p["blocks"]
  n_layers = f64(blocks["ln_1"]["scale"]).shape[0]
  for l in range(n_layers):
    layer = lambda *path: f64(_get(blocks, path)[l])
    h = _layer_norm(x, layer("ln_1", "scale"), layer("ln_1", "bias"), eps)
    wq, wk, wv = layer("attn", "w_q"), layer("attn", "w_k"), layer("attn", "w_v")
    bq, bk, bv = layer("attn", "b_q"), layer("attn", "b_k"), layer("attn", "b_v")
    n_heads = n_heads_of(params)
    head_dim = wq.shape[0] // n_heads
    # Projections are [N*H, D] (heads fused, [out, in]); w_o is [D, N*H].
    wq, wk, wv = (w.reshape(n_heads, head_dim, -1) for w in (wq, wk, wv))
    bq, bk, bv = (b.reshape(n_heads, head_dim) for b in (bq, bk, bv))
    wo = layer("attn", "w_o").reshape(-1, n_heads, head_dim)  # [D, N, H]
    attn = np.zeros_like(x)
    mask = np.tril(np.ones((T, T), bool))
    for n in range(n_heads):
      q = h @ wq[n].T + bq[n]
      k = h @ wk[n].T + bk[n]
      v = h @ wv[n].T + bv[n]
      s = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)
      s = np.where(mask, s, -np.inf)
      s = np.exp(s - s.max(-1, keepdims=True))
      s = s / s.sum(-1, keepdims=True)
      attn += (s @ v) @ wo[:, n, :].T
    x = x + attn + layer("attn", "b_o")
    h = _layer_norm(x, layer("ln_2", "scale"), layer("ln_2", "bias"), eps)
    h = _gelu_tanh(h @ layer("mlp", "w_up").T + layer("mlp", "b_up"))
    x = x + h @ layer("mlp", "w_down").T + layer("mlp", "b_down")
  x = _layer_norm(x, f64(p["ln_f"]["scale"]), f64(p["ln_f"]["bias"]), eps)
  return (x @ f64(p["wte"]).T)[..., :vocab_size]


def gpt2_greedy(params: dict, prompts: list, new: int, *, vocab_size: int,
                n_heads: int) -> np.ndarray:
  """Greedy continuations [B, new] of each prompt, its logits recomputed from scratch for
  every token (no cache)."""
  out = []
  for prompt in prompts:
    seq = list(prompt)
    for _ in range(new):
      logits = gpt2_logits(params, np.array([seq]), n_heads=n_heads, vocab_size=vocab_size)
      seq.append(int(logits[0, -1].argmax()))
    out.append(seq[len(prompt):])
  return np.array(out)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree
