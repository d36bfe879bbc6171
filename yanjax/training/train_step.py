"""The jitted train and eval steps over a train state that is one pytree of arrays.

Train state: {"step": int32 [], "params": pure dict of float32 arrays, "opt_state": optax state,
"rng": uint32 [2] base key}. The step's randomness (router exploration) is fold_in(rng, step), so a run is a
pure function of (seed, step), like its data.

The loss is the model's final hidden states through the output head (yanjax/model/head.py `head_loss`): the
targets' cross-entropy plus train.z_loss_weight x logsumexp^2, summed over the loss mask, `train.loss_chunk`
positions at a time (0: the whole logits at once), so the float32 logits [B, T, V] are never held whole.

The model's per-layer metrics (`aux["layer_metrics"]`, name -> [L] or [L, E]; yanjax/model/lm.py `LayerAux`)
take one generic route: training logs each scalar metric's mean over layers under its name, validation every
layer's value as `<prefix>/layer<i>/<rest>` (name "router_dropped" -> "router/layer0/dropped"), a vector's
entries suffixed with their index ("router_load_group" -> "router/layer0/load_group3").

Batch: {"inputs", "targets", "segment_ids", "positions": int32 [B, T], "loss_mask": float32 [B, T]}.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from yanjax.model.head import head_loss


def _objective(params, graphdef, batch, step, key, z_loss_weight, loss_chunk):
  """Summed (not averaged) loss of one micro-batch, and its metrics; divided by the token count later."""
  model = nnx.merge(graphdef, params)
  x, aux = model.hidden_states(batch["inputs"], batch["segment_ids"], batch["positions"], step=step, key=key)
  head_objective, sums = head_loss(x, model.output_head(x.dtype), batch["targets"], batch["loss_mask"],
                                   chunk=loss_chunk, z_weight=z_loss_weight)
  tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
  objective = head_objective + aux["aux_loss"] * tokens
  metrics = {"nll_sum": sums.nll, "z_loss_sum": sums.z, "aux_loss_sum": aux["aux_loss"] * tokens, "tokens": tokens}
  metrics.update({f"{name}_sum": jnp.mean(per_layer) * tokens
                  for name, per_layer in aux["layer_metrics"].items() if per_layer.ndim == 1})
  return objective, metrics


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int, z_loss_weight: float, loss_chunk: int) -> Callable[[Any, dict], tuple[Any, dict]]:
  """(state, batch) -> (state, metrics). Skips the update (keeping params and optimizer state) when the loss
  or the gradients are not finite; metrics["skipped"] says so. The loss takes `loss_chunk` positions at a time
  (0: all; yanjax/model/head.py)."""
  grad_fn = jax.grad(_objective, has_aux=True)

  def train_step(state, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    micro = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)

    def accumulate(carry, micro_batch):
      grads, metrics = grad_fn(state["params"], graphdef, micro_batch, step, key, z_loss_weight, loss_chunk)
      return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    zero_metrics = jax.eval_shape(lambda: grad_fn(state["params"], graphdef, jax.tree.map(lambda x: x[0], micro),
                                                  step, key, z_loss_weight, loss_chunk)[1])
    init = (jax.tree.map(jnp.zeros_like, state["params"]),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics))
    (grads, sums), _ = jax.lax.scan(accumulate, init, micro)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    loss = sums["nll_sum"] / tokens
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    def keep(new, old):
      return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {"step": step + 1, "params": keep(params, state["params"]),
                 "opt_state": keep(opt_state, state["opt_state"]), "rng": state["rng"]}
    metrics = {name[:-4]: value / tokens for name, value in sums.items() if name.endswith("_sum")}
    metrics.update({"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(step),
                    "tokens": sums["tokens"], "skipped": 1.0 - finite.astype(jnp.float32)})
    del metrics["nll"]
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, loss_chunk: int) -> Callable[[Any, dict], dict]:
  """(params, batch) -> validation sums, no router exploration: {"nll_sum", "correct_sum" (tokens whose argmax is
  the target), "tokens"}, "bytes" when the batch holds "target_bytes" (`with_target_bytes`) and "layer_metrics":
  the model's per-layer metrics, token-weighted ({name: [L] or [L, E]}). The loss takes `loss_chunk` positions
  at a time (0: all)."""

  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    x, aux = model.hidden_states(batch["inputs"], batch["segment_ids"], batch["positions"])
    _, loss = head_loss(x, model.output_head(x.dtype), batch["targets"], batch["loss_mask"], chunk=loss_chunk,
                        z_weight=0.0)
    mask = batch["loss_mask"].astype(jnp.float32)
    tokens = jnp.sum(mask)
    sums = {"nll_sum": loss.nll, "correct_sum": loss.correct, "tokens": tokens}
    if "target_bytes" in batch:
      sums["bytes"] = jnp.sum(batch["target_bytes"] * mask)
    sums["layer_metrics"] = {name: per_layer * tokens for name, per_layer in aux["layer_metrics"].items()}
    return sums

  return eval_step


def with_target_bytes(batch: dict[str, np.ndarray], token_bytes: np.ndarray) -> dict[str, np.ndarray]:
  """`batch` and "target_bytes" float32 [b, T]: the UTF-8 bytes of text each target stands for, from the
  tokenizer's `token_bytes()` [V] (yanjax/data/tokenizer.py); the eval step sums them for bits per byte."""
  return {**batch, "target_bytes": token_bytes[batch["targets"]].astype(np.float32)}


def eval_scalars(batch_sums: list[dict]) -> dict[str, float]:
  """Named validation metrics from the eval step's sums over several batches: val_loss, val_perplexity,
  val_accuracy (next-token top-1), val_bits_per_byte (the summed loss in bits over the bytes of text the
  targets stand for: comparable across tokenizers; with "bytes" in the sums) and every layer's metrics (with a
  router: router/layer{i}/load_group{e}, max_load, dropped, entropy, explore)."""
  total = jax.tree.map(lambda *values: np.sum(np.stack(values), axis=0), *batch_sums)
  tokens = max(float(total["tokens"]), 1.0)
  loss = float(total["nll_sum"]) / tokens
  scalars = {"val_loss": loss, "val_perplexity": float(np.exp(min(loss, 50.0))),
             "val_accuracy": float(total["correct_sum"]) / tokens}
  if "bytes" in total:
    scalars["val_bits_per_byte"] = float(total["nll_sum"]) / np.log(2.0) / max(float(total["bytes"]), 1.0)
  for name, per_layer in total["layer_metrics"].items():
    prefix, _, rest = name.partition("_")
    for i, value in enumerate(per_layer / tokens):
      if value.ndim:
        scalars.update({f"{prefix}/layer{i}/{rest}{e}": float(v) for e, v in enumerate(value)})
      else:
        scalars[f"{prefix}/layer{i}/{rest}"] = float(value)
  return scalars
