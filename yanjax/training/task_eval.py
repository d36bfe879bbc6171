"""In-loop evaluation: the `evaluate` section's tasks run on the training parameters every `evaluate.every` steps.

    --config.evaluate.every=500 --config.evaluate.tasks="('passkey', 'configs/eval/python_syntax.yaml')"

A task is "passkey" (yanjax/eval/passkey.py, on the run's first store's validation documents) or an lm-eval task:
a name, or a task YAML file (yanjax/eval/harness.py; the `eval` extra). Their scores go through the run's metric
writers (metrics.jsonl, TensorBoard, W&B) at the step they were measured:

    passkey/accuracy@<context>, passkey/needle_gain@<context>   (means over evaluate.passkey_depths)
    lm_eval/<task>/<metric>                                     (e.g. lm_eval/python_syntax/acc)

Every process runs the same evaluation on the sharded parameters as they are (the jitted windows are collectives;
nothing is gathered onto one host) and gets the same scores; process 0 writes them. `TaskEvaluation` is built
before the first step, so a task that does not resolve, or passkey contexts too short for the needle, stop the
run at start-up with one line (the section's values are checked with the whole config, yanjax/training/run_config.py).
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np
from flax import nnx

from yanjax.eval.passkey import haystack_ids, make_trial, passkey_accuracy
from yanjax.eval.scoring import JaxBackend
from yanjax.training.hosts import say
from yanjax.training.loop import StepInfo
from yanjax.training.writers import Writers

PASSKEY = "passkey"


class TaskEvaluation:
  """`evaluation(info, writers)` (a hook, every=evaluate.every) scores `eval_cfg.tasks` on the state's parameters
  and writes the scores; building it resolves the tasks (UserError)."""

  def __init__(self, graphdef: nnx.GraphDef, tokenizer, store, eval_cfg: ml_collections.ConfigDict):
    self.graphdef, self.tokenizer, self.cfg = graphdef, tokenizer, eval_cfg
    self.harness_tasks = [t for t in eval_cfg.tasks if t != PASSKEY]
    self.haystack = None
    if PASSKEY in eval_cfg.tasks:
      self.haystack = haystack_ids(store, max(eval_cfg.passkey_contexts))
      for context in eval_cfg.passkey_contexts:  # too short a context fails now, not at the first evaluation
        make_trial(tokenizer, self.haystack, context, 0.5, key=10 ** 4, offset=0.0)
    if self.harness_tasks:
      from yanjax.eval import harness  # pylint: disable=import-outside-toplevel  # the `eval` extra
      harness.resolve_tasks(self.harness_tasks, eval_cfg.include_path or None)

  def __call__(self, info: StepInfo, writers: Writers):
    backend = JaxBackend(nnx.merge(self.graphdef, info.state["params"]))
    scores = {}
    if self.haystack is not None:
      rows = passkey_accuracy(backend, self.tokenizer, self.haystack, self.cfg.passkey_contexts,
                              self.cfg.passkey_depths, self.cfg.passkey_trials, seed=0)
      for context in self.cfg.passkey_contexts:
        at = [r for r in rows if r["context"] == context and r["fits"]]
        if at:
          scores[f"passkey/accuracy@{context}"] = float(np.mean([r["accuracy"] for r in at]))
          scores[f"passkey/needle_gain@{context}"] = float(np.mean([r["needle_gain"] for r in at]))
    if self.harness_tasks:
      scores.update(self._harness(backend))
    writers.write(info.step, scores)
    say(f"step {info.step}: " + ", ".join(f"{name} {value:.4f}" for name, value in sorted(scores.items())))

  def _harness(self, backend) -> dict[str, float]:
    from yanjax.eval import harness  # pylint: disable=import-outside-toplevel
    lm = harness.YanjaxLM(backend, self.tokenizer)
    results = harness.evaluate(lm, self.harness_tasks, include_path=self.cfg.include_path or None,
                               limit=self.cfg.limit or None, bootstrap_iters=0)
    scores = {}
    for task, metrics in results["results"].items():
      for key, value in metrics.items():
        metric, _, task_filter = key.partition(",")  # lm-eval writes "acc,none": metric, filter
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and not metric.endswith("_stderr"):
          scores[f"lm_eval/{task}/{metric}" + ("" if task_filter in ("", "none") else f"/{task_filter}")] = value
    return scores
