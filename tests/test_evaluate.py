"""lm-eval over yanjax models (yanjax/eval, yanjax/main/evaluate.py): the harness's numbers are the model's own.

The tasks are written here (a task YAML over a local JSONL file): nothing is downloaded. For an MCSD and an
attention model, every log-likelihood lm-eval receives equals the sum of log_softmax(logits) over the
continuation's tokens from one full forward pass; a rolling log-likelihood equals the whole text's (an MCSD
model reads it window by window through its state); generation stops at the task's `until` string.
"""

import functools
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_eval import utils as lm_utils  # the `eval` extra, in `test` too: missing, these tests fail
from lm_eval.api.instance import Instance
from model_helpers import random_model
from test_inference_sharded import write_checkpoint
from tokenizer_helpers import word_level

from yanjax.core import cli
from yanjax.core.errors import UserError
from yanjax.data.tokenizer import from_bytes
from yanjax.eval import harness, scoring
from yanjax.inference.generate import generate
from yanjax.main import evaluate as evaluate_cli
from yanjax.model.config import ModelConfig
from yanjax.numpy_runtime.format import ExportError

MODEL = dict(vocab_size=48, width=32, layers=2, channels=4, heads=2, mlp_width=64, max_decode_len=40)
MIXERS = ("mcsd", "attention")
TOLERANCE = 2e-4  # summed log-probabilities: windows and batches vs one pass, float32 logits
BATCH, WINDOW = 4, 8  # the harness's rows per batch and tokens per prefill here: every test shares their compiles


def words(*ids):
  return " ".join(f"w{i}" for i in ids)


CHOICE_DOCS = [{"question": words(1, 2, 3), "choices": [words(4, 5), words(6), words(7, 8, 9)], "answer": 1},
               {"question": words(9, 9, 30, 2, 11), "choices": [words(12), words(13, 14)], "answer": 0},
               {"question": words(*range(20, 35)), "choices": [words(35, 36, 37, 38), words(1)], "answer": 0}]
ROLLING_DOCS = [{"text": words(5, 6, 7)}, {"text": words(*range(3, 13))},
                {"text": words(*[(7 * i) % 40 for i in range(55)])}]  # 55 tokens: past the attention cache
GENERATE_DOCS = [{"question": words(3, 1, 4, 1, 5), "answer": "w9"}, {"question": words(2, 7), "answer": "w1"}]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
  path.write_bytes(word_level(40))  # <unk> <s> </s> w0 .. w39
  return path


@pytest.fixture(scope="module")
def tok(tokenizer_file):
  return from_bytes(tokenizer_file.read_bytes(), str(tokenizer_file))


@pytest.fixture(scope="module", params=MIXERS)
def model(request):
  return random_model(ModelConfig(pattern=(request.param,), **MODEL), scale=0.2)


_forward = nnx.jit(lambda m, tokens: m(tokens)[0])


def direct(model, sequences):
  """log p(sequence[j] | sequence[:j]) for j >= 1 of each sequence, from one forward pass over the batch (padded
  to 8k rows of 64 tokens: one compile)."""
  tokens = np.zeros((-(-len(sequences) // 8) * 8, 64), np.int32)
  for i, s in enumerate(sequences):
    tokens[i, :len(s)] = s
  logits = np.asarray(_forward(model, jnp.asarray(tokens)), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return [logp[i, np.arange(len(s) - 1), s[1:]] for i, s in enumerate(sequences)]


def write_tasks(directory, generate_until):
  """Three task YAMLs over JSONL files in `directory`: multiple choice, rolling, generation."""
  common = "dataset_path: json\ntest_split: test\n"
  files = {}
  for name, docs, body in [
      ("yj_choice", CHOICE_DOCS, "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
       "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"),
      ("yj_rolling", ROLLING_DOCS, "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
       "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"),
      ("yj_generate", GENERATE_DOCS, "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
       f"doc_to_target: '{{{{answer}}}}'\ngeneration_kwargs:\n  until: [{json.dumps(generate_until)}]\n"
       "  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n")]:
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    files[name] = directory / f"{name}.yaml"
    files[name].write_text(f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n    test: {data}\n{body}")
  return files


class Recording(harness.YanjaxLM):
  """The harness's LM, keeping every request's arguments and its answer."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.seen = {"loglikelihood": [], "loglikelihood_rolling": [], "generate_until": []}

  def loglikelihood(self, requests, disable_tqdm=False):
    out = super().loglikelihood(requests, disable_tqdm)
    self.seen["loglikelihood"] += [(r.args, o) for r, o in zip(requests, out)]
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    out = super().loglikelihood_rolling(requests, disable_tqdm)
    self.seen["loglikelihood_rolling"] += [(r.args, o) for r, o in zip(requests, out)]
    return out

  def generate_until(self, requests, disable_tqdm=False):
    out = super().generate_until(requests, disable_tqdm)
    self.seen["generate_until"] += [(r.args, o) for r, o in zip(requests, out)]
    return out


def test_windows_and_batches_equal_one_pass(model):
  """score(): batched rows of different lengths, fed WINDOW tokens at a time through the cache (a row of one
  window too), == one pass."""
  rng = np.random.default_rng(0)
  sequences = [rng.integers(0, 48, n).tolist() for n in (1, 2, 7, 11, 23, 41, 17)]  # rows [41, 23, 17, 11], [7, 2, 1]
  starts = [1, 1, 3, 1, 10, 40, 16]
  expected = [float(lp[s - 1:].sum()) for lp, s in zip(direct(model, sequences), starts)]
  got = scoring.score(scoring.JaxBackend(model), sequences, starts, batch_size=BATCH, window=WINDOW)
  err = max(abs(g.logprob - e) for g, e in zip(got, expected))
  print(f"{model.cfg.pattern_name} window {WINDOW} batch {BATCH}: max abs error {err:.2e}")
  assert err < TOLERANCE
  assert got[0] == scoring.Score(0.0, True)
  assert scoring.window_widths(40, WINDOW, 40) == [WINDOW] * 5 and scoring.window_widths(6, WINDOW) == [WINDOW]
  assert scoring.window_widths(37, 16, 40) == [16, 16, 8] and scoring.window_widths(20, 1024) == [32]


def test_harness_log_likelihoods_are_the_models(model, tok, tmp_path):
  """A multiple-choice, a rolling and a generation task through lm_eval.simple_evaluate: every number the
  harness received is the model's own, computed directly; the accuracy lm-eval reports is built from them."""
  # the batch the harness generates (shortest prompt first, filled with copies of it), generated directly
  short, long = ([tok.bos_id] + tok.encode(d["question"]) for d in GENERATE_DOCS[::-1])
  direct_texts = [tok.decode(c.tokens) for c in generate(model, [short, long, short, short], max_new_tokens=6,
                                                         eos_id=tok.eos_id, vocab_limit=tok.vocab_size)][1::-1]
  until = (direct_texts[0].split() + ["w0"] * 3)[2]  # a word the first document's generation holds
  tasks = write_tasks(tmp_path, until)
  lm = Recording(scoring.JaxBackend(model), tok, batch_size=BATCH, window=WINDOW)
  results = harness.evaluate(lm, [str(p) for p in tasks.values()], bootstrap_iters=0, log_samples=True)

  pairs = lm.seen["loglikelihood"]
  assert len(pairs) == sum(len(d["choices"]) for d in CHOICE_DOCS)
  sequences, starts = [], []
  for (context, continuation), _ in pairs:
    starts.append(1 + len(tok.encode(context)))
    sequences.append([tok.bos_id] + tok.encode(context + continuation))
  expected = [float(lp[s - 1:].sum()) for lp, s in zip(direct(model, sequences), starts)]
  err = max(abs(got - e) for (_, (got, _)), e in zip(pairs, expected))
  print(f"{model.cfg.pattern_name}: loglikelihood max abs error {err:.2e} over {len(pairs)} requests")
  assert err < TOLERANCE
  answers = {args: value for args, (value, _) in pairs}
  correct = [np.argmax([answers[(d["question"], " " + c)] for c in d["choices"]]) == d["answer"]
             for d in CHOICE_DOCS]
  assert results["results"]["yj_choice"]["acc,none"] == pytest.approx(np.mean(correct))

  rolled = lm.seen["loglikelihood_rolling"]
  assert [args[0] for args, _ in rolled] == [d["text"] for d in ROLLING_DOCS]
  for (text,), got in rolled:
    ids = tok.encode(text)
    if model.cfg.max_context is None or len(ids) <= model.cfg.max_context:  # the whole text in one pass
      want = float(direct(model, [[tok.bos_id] + ids])[0].sum())
    else:  # lm-eval's rolling windows of max_decode_len tokens, each scored in one pass
      windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
          token_list=ids, prefix_token=tok.bos_id, max_seq_len=model.cfg.max_context, context_len=1)]
      assert len(windows) > 1
      want = sum(float(lp[len(c) - 1:].sum())
                 for lp, (c, _) in zip(direct(model, [list(c) + list(p) for c, p in windows]), windows))
    print(f"{model.cfg.pattern_name}: rolling {len(ids)} tokens: {got:.4f} vs {want:.4f}")
    assert abs(got - want) < TOLERANCE

  generated = lm.seen["generate_until"]
  assert [args[0] for args, _ in generated] == [d["question"] for d in GENERATE_DOCS]
  assert [text for _, text in generated] == [harness.cut(t, [until]) for t in direct_texts]
  assert until not in generated[0][1]


def test_an_export_scores_as_the_workdir_model(tok, tokenizer_file, tmp_path):
  """The NumPy runtime over an export gives the JAX model's log-likelihoods (MCSD, through windows)."""
  from yanjax.export.writer import export_model  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig(pattern=("mcsd",), **MODEL)
  model = random_model(cfg, scale=0.2)
  export_model(model, cfg, tmp_path / "export", tokenizer_path=str(tokenizer_file))
  requests = [Instance("loglikelihood", {}, (d["question"], " " + d["choices"][0]), 0) for d in CHOICE_DOCS]
  jax_lm = harness.YanjaxLM(scoring.JaxBackend(model), tok, batch_size=BATCH, window=WINDOW)
  numpy_lm = harness.YanjaxLM.from_export(tmp_path / "export", batch_size=BATCH, window=WINDOW)
  got, want = numpy_lm.loglikelihood(requests), jax_lm.loglikelihood(requests)
  assert max(abs(g[0] - w[0]) for g, w in zip(got, want)) < 1e-3
  assert [g[1] for g in got] == [w[1] for w in want]


# ---- bad input: one clear line, exit 2 ------------------------------------------------------------------------

def _error(argv):
  """The one line `python -m yanjax.main.evaluate argv` prints, run in-process."""
  with pytest.raises(Exception) as caught:
    evaluate_cli.main(argv)
  assert cli.is_user_error(caught.value, (ExportError,)), caught.value
  return cli.describe(caught.value)


def test_bad_inputs_are_one_line(tmp_path, tok, monkeypatch):
  """Each refused in-process as `cli.run` would: a user error, one line. (lm-eval's own index of some 15,000 tasks,
  which a name not among --include_path's is looked up in, takes seconds to build: here it is left out.)"""
  import lm_eval.tasks  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                       include_defaults=False))
  good = write_tasks(tmp_path, "w0")["yj_choice"]
  broken = tmp_path / "broken.yaml"
  broken.write_text("task: broken\ndoc_to_text: [unclosed\n")
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks/other.yaml").write_text(good.read_text().replace("yj_choice", "other"))
  assert "does not parse" in _error(["--workdir", str(tmp_path / "run"), "--tasks", str(broken)])
  assert "unknown task 'no_such_task'" in _error(["--workdir", str(tmp_path / "run"), "--tasks", "no_such_task",
                                                  "--include_path", str(tmp_path / "tasks")])
  assert "no checkpoint under" in _error(["--workdir", str(tmp_path / "run"), "--tasks", str(good)])
  (tmp_path / "export").mkdir()
  (tmp_path / "export/manifest.json").write_text('{"format": "something-else"}')
  assert "not a yanjax-export manifest" in _error(["--export", str(tmp_path / "export"), "--tasks", str(good),
                                                   "--output", str(tmp_path / "r.json")])
  (tmp_path / "notes.json").write_text("{}")
  assert "is not a results file" in _error(["--workdir", str(tmp_path / "run"), "--tasks", str(good),
                                            "--output", str(tmp_path / "notes.json")])
  assert "--batch_size=0" in _error(["--workdir", str(tmp_path / "run"), "--tasks", str(good), "--batch_size=0"])

  attention = harness.YanjaxLM(scoring.JaxBackend(random_model(ModelConfig(pattern=("attention",), **MODEL))), tok)
  long_context = words(*range(40)) + " " + words(*range(10))
  for method, args in (("loglikelihood", (long_context, " w1")),
                       ("generate_until", (long_context, {"until": ["w1"], "max_gen_toks": 4}))):
    with pytest.raises(UserError, match="model.max_decode_len=40"):
      getattr(attention, method)([Instance(method, {}, args, 0)])


# ---- the command, end to end ----------------------------------------------------------------------------------

@pytest.mark.slow  # end to end, a checkpoint over 8 devices: about 8 s
def test_evaluate_command_on_a_run(tok, tokenizer_file, tmp_path):
  """`python -m yanjax.main.evaluate --workdir` (in-process) on a checkpoint of the MCSD model and its tokenizer:
  the results JSON's accuracy is the one the in-memory model's log-likelihoods give; the next run may replace it."""
  model = random_model(ModelConfig(pattern=("mcsd",), **MODEL), scale=0.2)
  workdir = tmp_path / "run"
  write_checkpoint(workdir, model)  # sharded over 8 devices, as a trainer saves
  shutil.copy(tokenizer_file, workdir / "tokenizer.json")
  task = write_tasks(tmp_path, "w0")["yj_choice"]
  lm = harness.YanjaxLM(scoring.JaxBackend(model), tok, batch_size=BATCH, window=WINDOW)
  answers = lm.loglikelihood([Instance("loglikelihood", {}, (d["question"], " " + c), 0)
                              for d in CHOICE_DOCS for c in d["choices"]])
  scores, correct = iter(value for value, _ in answers), []
  for d in CHOICE_DOCS:
    correct.append(np.argmax([next(scores) for _ in d["choices"]]) == d["answer"])
  evaluate_cli.main([f"--workdir={workdir}", f"--tasks={task}", "--bootstrap_iters=0", "--mesh=fsdp=1",
                     f"--batch_size={BATCH}", f"--window={WINDOW}"])
  results = json.loads((workdir / "eval/yj_choice.json").read_text())
  assert results["yanjax"]["command"] == "yanjax.main.evaluate" and results["yanjax"]["pattern"] == ["mcsd"]
  assert results["results"]["yj_choice"]["acc,none"] == pytest.approx(np.mean(correct))
  evaluate_cli.check_replaceable(workdir / "eval/yj_choice.json", overwrite=False)  # ours: the next run replaces it
  assert [p.name for p in (workdir / "eval").iterdir()] == ["yj_choice.json"]  # no temporary file left
