"""Model summary: parameter table, one forward pass and a short decode of random tokens.

Run: python -m yanjax.main.summary --config configs/yan_tiny.py[:variant]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from yanjax.core import cli
from yanjax.core.config import ConfigError, load_config_file
from yanjax.model.config import ModelConfig
from yanjax.model.counting import flops_per_token, param_count
from yanjax.model.lm import LanguageModel


def parameter_table(model: nnx.Module) -> list[tuple[str, tuple[int, ...], tuple]]:
  """(dotted name, shape, logical axes) of every parameter."""
  rows = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    rows.append((".".join(map(str, path)), tuple(var.shape), var.get_metadata().get("out_sharding", ())))
  return rows


def main(argv=None):
  """The command; a bad --config (missing file, unknown variant or key) is a ConfigError: one line, exit 2."""
  parser = argparse.ArgumentParser(prog="python -m yanjax.main.summary", description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/yan_tiny.py")
  parser.add_argument("--seq_len", type=int, default=64)
  parser.add_argument("--decode_tokens", type=int, default=16)
  args = parser.parse_args(argv)
  if args.seq_len < 1 or args.decode_tokens < 0:
    raise ConfigError(f"--seq_len={args.seq_len} --decode_tokens={args.decode_tokens}: give --seq_len >= 1 and "
                      "--decode_tokens >= 0")

  try:
    cfg = ModelConfig.from_dict(load_config_file(args.config).model)
  except ConfigError as error:
    raise ConfigError(f"--config {args.config}: {error}") from error
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  print(f"== {args.config}: pattern={cfg.pattern_name} router={cfg.router} layers={cfg.layers} width={cfg.width}")
  for name, shape, axes in parameter_table(model):
    print(f"  {name:<40} {str(shape):<22} {axes}")
  count = param_count(cfg)
  print(f"parameters: total {count.total:,}  active per token {count.active:,}  "
        f"training FLOPs/token at T={args.seq_len}: {flops_per_token(cfg, args.seq_len):,.0f}")

  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, args.seq_len), 0, cfg.vocab_size)
  forward = nnx.jit(lambda m, t: m(t))
  start = time.perf_counter()
  logits, aux = jax.block_until_ready(forward(model, tokens))
  print(f"forward {tokens.shape} -> logits {logits.shape} in {time.perf_counter() - start:.2f}s (with compile); "
        f"mean logsumexp {float(jnp.mean(jax.nn.logsumexp(logits, -1))):.3f}, aux loss {float(aux['aux_loss']):.4f}")

  step = nnx.jit(lambda m, c, t: m.decode_step(c, t))
  cache = model.init_cache(1)
  token = tokens[:1, 0]
  generated = [int(token[0])]
  for _ in range(args.decode_tokens):
    logits, cache = step(model, cache, token)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    generated.append(int(token[0]))
  state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(cache))
  print(f"greedy decode of {args.decode_tokens} tokens (random weights): {generated}")
  print(f"decode state: {state_bytes:,} bytes for batch 1")


if __name__ == "__main__":
  cli.run(main)
