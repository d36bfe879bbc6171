"""EleutherAI's LM Evaluation Harness (lm-eval) over yanjax models: the `YanjaxLM` model class and `evaluate`.

Needs the `eval` extra (`pip install -e ".[eval]" -c constraints.txt`); docs/evaluation.md has the command.

    from yanjax.eval.harness import YanjaxLM, evaluate
    lm = YanjaxLM.from_workdir("runs/yan_tiny")           # or YanjaxLM.from_export("exports/yan_tiny")
    results = evaluate(lm, ["my_task.yaml"])               # task names, or task YAML files

Every request is read as the run's documents were trained: it starts with the tokenizer's bos id.
  - loglikelihood (context, continuation): log p(continuation | bos, context), summed over its tokens; the
    pair is tokenized as lm-eval's TemplateLM does (the whole text encoded, split where the context's encoding
    ends). Batched; a long request goes through the model in windows (yanjax.eval.scoring).
  - loglikelihood_rolling (text): log p(text | bos), every token scored with all the text before it as
    context. An MCSD model reads the text once, window by window, through its O(1) state, however long; an
    attention model holds at most model.max_decode_len tokens, so a longer text is scored in lm-eval's rolling
    windows (each window re-reads up to max_decode_len tokens of context).
  - generate_until (context, gen_kwargs): greedy unless gen_kwargs has do_sample=True, at most max_gen_toks
    new tokens, the text cut before the first `until` string; the tokenizer's eos stops a row.
A context (and, to generate, the new tokens) longer than an attention model's KV cache is refused.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

from absl import logging

from yanjax.core.errors import UserError
from yanjax.eval.scoring import Backend, JaxBackend, NumpyBackend, check_fits, score

try:
  import lm_eval
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
except ImportError as error:  # the optional extra is missing: say which install gives it
  raise UserError(f"lm-eval is not installed ({error}): pip install -e \".[eval]\" -c constraints.txt") from error

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p")


class YanjaxLM(TemplateLM):
  """An lm-eval model over a yanjax model (a trained run or an export) and the run's tokenizer."""

  def __init__(self, backend: Backend, tokenizer, *, batch_size: int = 8, window: int = 1024, seed: int = 0):
    super().__init__()
    if batch_size < 1 or window < 1:
      raise UserError(f"--batch_size={batch_size}, --window={window}: both must be >= 1")
    if tokenizer.vocab_size > backend.vocab_size:
      raise UserError(f"{tokenizer.source} has {tokenizer.vocab_size} ids but the model's vocabulary has "
                      f"{backend.vocab_size}: use the tokenizer the run was trained with")
    self.backend, self.tok = backend, tokenizer
    self.batch_size, self.window, self.seed = batch_size, window, seed

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike, mesh: str | None = None, **kwargs) -> YanjaxLM:
    """The newest readable checkpoint of a training run (yanjax.inference.loading) and the run's tokenizer."""
    from yanjax.inference.loading import load_inference_model  # pylint: disable=import-outside-toplevel
    model, _, tokenizer_path = load_inference_model(workdir, mesh_spec=mesh)
    if tokenizer_path is None:
      raise UserError(f"{workdir} has no tokenizer.model or tokenizer.json: lm-eval's tasks are text, so the "
                      "run's tokenizer is needed")
    return cls(JaxBackend(model), _read_tokenizer(tokenizer_path), **kwargs)

  @classmethod
  def from_export(cls, export_dir: str | os.PathLike, **kwargs) -> YanjaxLM:
    """An export (docs/export.md), run by the NumPy runtime."""
    # pylint: disable=import-outside-toplevel
    from yanjax.data.tokenizer import FILE_NAMES
    from yanjax.data.tokenizer import read as read_tokenizer
    from yanjax.numpy_runtime import Model, load_export
    export = load_export(export_dir)
    if export.tokenizer_path is None:
      raise UserError(f"{export_dir} has no {' or '.join(FILE_NAMES.values())}: export from a run that has one")
    return cls(NumpyBackend(Model(export)), read_tokenizer(export.tokenizer_path), **kwargs)

  # ---- what lm-eval's TemplateLM asks for --------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tok.bos_id  # every training document starts with bos

  @property
  def tokenizer_name(self) -> str:
    return f"yanjax-{self.tok.kind}-{self.tok.sha256[:16]}"

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """The ids of `string`, after bos unless add_special_tokens is False."""
    del kwargs
    return ([] if add_special_tokens is False else [self.tok.bos_id]) + self.tok.encode(string)

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.tok.decode(tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """requests: ((context, continuation), context ids, continuation ids) -> (log-likelihood, is greedy)."""
    del disable_tqdm, kwargs
    sequences = [list(context) + list(continuation) for _, context, continuation in requests]
    for i, (_, context, _) in enumerate(requests):
      if not context:
        raise ValueError(f"request {i} has no context ids (lm-eval gives at least the prefix token)")
    scores = score(self.backend, sequences, [len(context) for _, context, _ in requests],
                   batch_size=self.batch_size, window=self.window)
    out = []
    for (pair, _, _), s in zip(requests, scores):
      out.append((s.logprob, s.greedy))
      if pair is not None:
        self.cache_hook.add_partial("loglikelihood", pair, out[-1])
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """log p(text | bos) of each request's text, every token scored once (see the module doc)."""
    del disable_tqdm
    cap = self.backend.max_context
    sequences, starts, owner = [], [], []
    for i, request in enumerate(requests):
      (text,) = request.args
      ids = self.tok.encode(text)
      if cap is None or len(ids) <= cap:  # the whole text in one stream through the cache
        sequences.append([self.prefix_token_id] + ids)
        starts.append(1)
        owner.append(i)
        continue
      windows = lm_utils.get_rolling_token_windows(token_list=ids, prefix_token=self.prefix_token_id,
                                                   max_seq_len=cap, context_len=1)
      for context, predicted in map(lm_utils.make_disjoint_window, windows):
        sequences.append(list(context) + list(predicted))
        starts.append(len(context))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, s in zip(owner, score(self.backend, sequences, starts, batch_size=self.batch_size,
                                 window=self.window)):
      totals[i] += s.logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each request's generated text, cut before the first of its `until` strings."""
    del disable_tqdm
    from yanjax.inference.sampling import Sampling  # pylint: disable=import-outside-toplevel
    groups: dict[tuple[int, Sampling], list[int]] = {}
    prompts, stops = [], []
    for i, request in enumerate(requests):
      context, gen_kwargs = request.args
      kwargs = dict(gen_kwargs or {})
      until = kwargs.pop("until", None) or []
      stops.append([until] if isinstance(until, str) else list(until))
      max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
      sampling = _sampling(kwargs, i)
      prompts.append(self.tok_encode(context))
      check_fits(self.backend, len(prompts[-1]) + max_new - 1, f"request {i}'s context plus max_gen_toks={max_new}")
      groups.setdefault((max_new, sampling), []).append(i)
    texts: list[str | None] = [None] * len(requests)
    for (max_new, sampling), members in groups.items():
      members = sorted(members, key=lambda i: len(prompts[i]))  # similar lengths share a batch
      for first in range(0, len(members), self.batch_size):
        batch = members[first:first + self.batch_size]
        filler = [batch[0]] * (self.batch_size - len(batch))  # same shapes for every batch; dropped below
        generated = self.backend.generate([prompts[i] for i in batch + filler], max_new_tokens=max_new,
                                          sampling=sampling, eos_id=self.tok.eos_id, seed=self.seed,
                                          row_seeds=batch + filler, vocab_limit=self.tok.vocab_size)
        for i, ids in zip(batch, generated):
          texts[i] = cut(self.tok.decode(ids), stops[i])
          self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
    return texts


def cut(text: str, stops: Sequence[str]) -> str:
  """`text` up to (not including) the earliest occurrence of any of `stops`."""
  end = min((text.find(s) for s in stops if s and s in text), default=len(text))
  return text[:end]


def _sampling(kwargs: dict[str, Any], index: int):
  """The Sampling of one generate_until request's remaining gen_kwargs (lm-eval's names, as HF's)."""
  from yanjax.inference.sampling import Sampling  # pylint: disable=import-outside-toplevel
  unknown = sorted(set(kwargs) - set(SAMPLING_KEYS))
  if unknown:
    logging.warning("request %d: gen_kwargs %s are not used by yanjax's sampler (it knows until, max_gen_toks, "
                    "%s)", index, unknown, ", ".join(SAMPLING_KEYS))
  if not kwargs.get("do_sample", False):
    return Sampling()
  try:
    return Sampling(float(kwargs.get("temperature", 1.0)), int(kwargs.get("top_k", 0) or 0),
                    float(kwargs.get("top_p", 1.0) or 1.0))
  except ValueError as error:
    raise UserError(f"request {index}: gen_kwargs {kwargs}: {error}") from None


def _read_tokenizer(path):
  from yanjax.core import storage  # pylint: disable=import-outside-toplevel
  from yanjax.data.tokenizer import read  # pylint: disable=import-outside-toplevel
  return read(storage.as_path(path))


# ---- tasks and the run -------------------------------------------------------------------------------------

def resolve_tasks(tasks: Sequence[str], include_path: str | None = None):
  """The lm-eval TaskManager that knows `tasks`: names of lm-eval's tasks, of tasks in `include_path` (a directory
  of task YAMLs), or paths of task YAML files.

  Only the task YAMLs of `include_path` are indexed when they hold every name asked for (quick); lm-eval's own
  (some 15,000, seconds to index) otherwise. Raises UserError for a task file that does not parse (lm-eval's
  index would skip it silently) or a name that is not a task.
  """
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  if include_path is not None and not pathlib.Path(include_path).is_dir():
    raise UserError(f"--include_path {include_path}: not a directory of task YAML files")
  files = [task for task in tasks if task.endswith((".yaml", ".yml"))]
  for path in files + sorted(str(p) for p in pathlib.Path(include_path or ".").rglob("*.yaml") if include_path):
    load_task_file(path)
  names = [task for task in tasks if task not in files]
  manager = TaskManager(include_path=include_path, include_defaults=False)
  if any(name not in manager.all_tasks for name in names):
    manager = TaskManager(include_path=include_path)
  unknown = [name for name in names if name not in manager.all_tasks]
  if unknown:
    where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks"
    raise UserError(f"unknown task {', '.join(map(repr, unknown))}: not among {where}; give a task name "
                    "(python -m lm_eval ls tasks), a task YAML file, or --include_path DIR with your task YAMLs")
  return manager


def load_task_file(path: str) -> dict[str, Any]:
  """A task YAML file as lm-eval reads it (its `include:`s merged, `!function`s not imported); UserError if it
  does not parse or is not a task or group."""
  import yaml  # pylint: disable=import-outside-toplevel
  from lm_eval.tasks._yaml_loader import load_yaml  # pylint: disable=import-outside-toplevel
  if not pathlib.Path(path).is_file():
    raise UserError(f"task file {path} does not exist")
  try:
    config = load_yaml(path, resolve_func=False)
  except yaml.YAMLError as error:
    raise UserError(f"task file {path} does not parse: {' '.join(str(error).split())}") from None
  except (OSError, ValueError) as error:  # an include that is missing, a cycle, not a mapping
    raise UserError(f"task file {path} cannot be read: {' '.join(str(error).split())}") from None
  if not {"task", "group"} & set(config):
    raise UserError(f"task file {path} is not an lm-eval task: it needs a 'task' (or 'group') key")
  return config


def evaluate(lm: YanjaxLM, tasks: Sequence[str], *, include_path: str | None = None, num_fewshot: int | None = None,
             limit: float | None = None, bootstrap_iters: int = 100000, log_samples: bool = False,
             seed: int = 0) -> dict[str, Any]:
  """lm-eval's results of `tasks` (see resolve_tasks) for `lm`: its `simple_evaluate` dictionary."""
  manager = resolve_tasks(tasks, include_path)
  return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                 limit=limit, bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                                 random_seed=seed, numpy_random_seed=seed, torch_random_seed=None,
                                 fewshot_random_seed=seed)


def results_json(results: dict[str, Any], about: dict[str, Any]) -> str:
  """The results file's text: lm-eval's results (what JSON cannot hold written as text) and `about` (what was
  evaluated, how) under "yanjax", which marks the file as ours."""
  from lm_eval.utils import handle_non_serializable  # pylint: disable=import-outside-toplevel
  return json.dumps({"yanjax": about, **results}, indent=2, default=handle_non_serializable, ensure_ascii=False)
