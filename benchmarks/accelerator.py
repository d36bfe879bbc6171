"""The Python side of benchmarks/accelerator.sh: the environment probe, each step's record, the closing summary.

  probe OUT                  writes OUT/env.txt (date, Python, jax / jaxlib / flax / tokamax versions, backend,
                             jax.devices(), the recurrence forms this checkout has) and prints the facts the
                             script branches on as shell assignments
  record OUT STEP BENCH RC SECONDS LIMIT [TAGS]
                             files step STEP's JSON lines (OUT/logs/STEP.out) into OUT/BENCH.jsonl; a step that
                             did not end well (RC: 124 or 137 timed out, "skipped", "unavailable", else failed) adds
                             a status line there with its error (the last error line of OUT/logs/STEP.log); every
                             step adds a line to OUT/steps.jsonl and prints one progress line. TAGS: a JSON object
                             copied into the status line (e.g. {"form": "pallas"})
  summary OUT                prints (and writes to OUT/summary.txt) each step's status and wall time, the measured
                             figures, and the issue's three goals: met, missed by how much, or unmeasured

Only `probe` imports JAX; `record` and `summary` read files, so they cost no device time.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import pathlib
import re
import shlex
import sys

GOAL_MFU = 0.45  # MCSD train step at the 1.6B layer shape, on an H100 (issue #26)
GOAL_VS_FLASH = 1.5  # MCSD tokens/s over the flash-attention baseline's at 8192 tokens
GOAL_SELECTIVE = 1.0  # selective over dense tokens/s at 1.6B width
ERROR_LINE = re.compile(r"^(error:|[A-Za-z_][\w.]*(Error|Exception)\b)")


def probe(out: pathlib.Path) -> None:
  """OUT/env.txt and the shell facts BACKEND and FORMS."""
  import jax  # pylint: disable=import-outside-toplevel

  from yanjax.model.recurrence import FORMS  # pylint: disable=import-outside-toplevel

  def version(package: str) -> str:
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return "not installed"

  device = jax.devices()[0]
  lines = [f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
           f"python: {sys.version.split()[0]}",
           "versions: " + ", ".join(f"{p} {version(p)}" for p in ("jax", "jaxlib", "jax-cuda12-plugin",
                                                                   "jax-cuda13-plugin", "flax", "tokamax")),
           f"backend: {jax.default_backend()}", f"jax.devices(): {jax.devices()}",
           f"device_kind: {device.device_kind}", f"recurrence forms: {', '.join(FORMS)}"]
  (out / "env.txt").write_text("\n".join(lines) + "\n")
  facts = {"BACKEND": jax.default_backend(), "FORMS": " ".join(FORMS)}
  print("\n".join(f"{key}={shlex.quote(str(value))}" for key, value in facts.items()))


def error_line(log: pathlib.Path) -> str:
  """The last line of `log` that reads as an error (a Python exception, a one-line `error:`), else its last line."""
  lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] \
      if log.exists() else []
  errors = [line for line in lines if ERROR_LINE.match(line)]
  return (errors or lines or [""])[-1][:400]


def status_of(rc: str) -> str:
  """A step's status from its exit code (or the word the script gives for a step it did not start)."""
  if rc in ("skipped", "unavailable"):
    return rc
  return "ok" if rc == "0" else "timeout" if rc in ("124", "137") else "failed"


def record(out: pathlib.Path, step: str, bench: str, rc: str, seconds: float, limit: int, tags: dict) -> None:
  """Files step `step`'s JSON lines into OUT/`bench`.jsonl with its status; see the module docstring."""
  stdout = out / "logs" / f"{step}.out"
  lines = [line for line in (stdout.read_text().splitlines() if stdout.exists() else []) if line.startswith("{")]
  rows, status = len(lines), status_of(rc)
  if status != "ok":
    error = tags.pop("error", None) or error_line(out / "logs" / f"{step}.log")
    if status == "skipped":
      error = f"not started: {limit} s of the budget were left"
    elif status == "timeout":
      error = f"timed out after {limit} s; last log line: {error}"
    lines.append(json.dumps({"bench": bench, "step": step, **tags, "status": status,
                             "rc": int(rc) if rc.isdigit() else None, "error": error}))
  if lines:
    with open(out / f"{bench}.jsonl", "a") as file:
      file.writelines(line + "\n" for line in lines)
  with open(out / "steps.jsonl", "a") as file:
    file.write(json.dumps({"step": step, "bench": bench, "status": status, "rc": int(rc) if rc.isdigit() else None,
                           "seconds": round(seconds, 1), "limit_s": limit, "rows": rows}) + "\n")
  print(f"[accelerator] {step}: {status} in {seconds:.1f} s (limit {limit} s, {rows} lines)", flush=True)


def read(out: pathlib.Path, bench: str) -> list[dict]:
  path = out / f"{bench}.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")] if path.exists() else []


def verdict(value: float | None, goal: float, what: str) -> str:
  """'met' / 'missed by' / 'unmeasured' of `value` against `goal`."""
  if value is None:
    return f"unmeasured ({what})"
  if value >= goal:
    return f"met ({value:.3f} >= {goal}; {what})"
  return f"missed by {goal - value:.3f} ({value:.3f} < {goal}; {what})"


def goal_mfu(mcsd: list[dict]) -> str:
  """Goal 1 from the MCSD train-step rows: the best MFU."""
  rows = [row for row in mcsd if isinstance(row.get("mfu"), float)]
  if not rows:
    return verdict(None, GOAL_MFU, "no MCSD row with an MFU: the step failed, or the device's peak is unknown")
  best = max(rows, key=lambda row: row["mfu"])
  return verdict(best["mfu"], GOAL_MFU, f"best of {len(rows)} MCSD rows: {best['recurrence']} at "
                 f"{best['seq_len']} tokens on {best['device']}")


def goal_vs_flash(rows: list[dict]) -> str:
  """Goal 2 from the train-step rows at their longest length: the fastest MCSD row over attention's, a verdict
  only where attention ran cuDNN's flash kernel."""
  longest = max((row["seq_len"] for row in rows), default=None)
  mcsd = [row for row in rows if row["seq_len"] == longest and row["variant"] == "mcsd"]
  attention = [row for row in rows if row["seq_len"] == longest and row["variant"] == "attention"]
  if not (mcsd and attention):
    return verdict(None, GOAL_VS_FLASH, f"needs an MCSD and an attention row at {longest} tokens")
  fastest = max(mcsd, key=lambda row: row["tokens_per_s"])
  ratio = fastest["tokens_per_s"] / attention[0]["tokens_per_s"]
  what = f"MCSD {fastest['recurrence']} over attention ({attention[0]['attention_kernel']}) at {longest} tokens"
  if attention[0]["attention_kernel"] != "cudnn":
    return verdict(None, GOAL_VS_FLASH, f"attention did not run cuDNN's flash kernel; {what}: {ratio:.3f}")
  return verdict(ratio, GOAL_VS_FLASH, what)


def goal_selective(rows: list[dict], selective: list[dict]) -> list[str]:
  """Goal 3, per length: the selective train step over MCSD's (its dense FFN, the same recurrence form), and each
  ratio line of benchmarks/selective.py."""
  lines = []
  for seq_len in sorted({row["seq_len"] for row in rows}):
    pair = {row["variant"]: row["tokens_per_s"] for row in rows
            if row["seq_len"] == seq_len and row["recurrence"] in (None, "auto")}
    value = pair["selective"] / pair["mcsd"] if {"selective", "mcsd"} <= pair.keys() else None
    lines.append(f"train step at {seq_len} tokens: " + verdict(value, GOAL_SELECTIVE, "selective over MCSD"))
  lines += [f"benchmarks/selective.py {row['ratio']} at {row['seq_len']} tokens: "
            + verdict(row["value"], GOAL_SELECTIVE, "selective.py") for row in selective if "ratio" in row]
  return lines


def goals(train: list[dict], selective: list[dict]) -> list[str]:
  """The issue's three goals from the train-step rows and benchmarks/selective.py's ratio lines."""
  rows = [row for row in train if "tokens_per_s" in row]
  configs = ", ".join(sorted({f"{row['config']} {' '.join(row['settings'])}".strip() for row in rows})) or "none"
  return [f"(train-step rows of {configs})",
          "1. MCSD train step >= 45% MFU on an H100: " + goal_mfu([row for row in rows if row["variant"] == "mcsd"]),
          "2. MCSD >= 1.5x the flash-attention baseline's tokens/s: " + goal_vs_flash(rows),
          *(f"3. selective >= 1.0x dense, {line}" for line in goal_selective(rows, selective))]


def figures(out: pathlib.Path) -> list[str]:
  """One compact line per measurement of each benchmark file."""
  lines = []
  for row in read(out, "mixer"):
    if "ms" in row:
      name = f"mcsd {row['form']}" if row["mixer"] == "mcsd" else f"attention ({row['attention_kernel']})"
      lines.append(f"mixer      {name:<28} t={row['seq_len']:<6} {row['ms']:>10.3f} ms fwd+bwd")
  for row in read(out, "train"):
    if "tokens_per_s" in row:
      name = f"{row.get('variant')} {row['recurrence'] or ''}".strip()
      if row["attention_kernel"]:
        name += f" ({row['attention_kernel']})"
      mfu = f"{row['mfu']:.1%}" if isinstance(row["mfu"], float) else row["mfu"]
      lines.append(f"train      {name:<28} t={row['seq_len']:<6} {row['tokens_per_s']:>12,.0f} tokens/s  MFU {mfu}  "
                   f"step {row['step_ms']} ms  batch {row['global_batch']}")
  for row in read(out, "selective"):
    if "tokens_per_s" in row:
      lines.append(f"selective  {row.get('variant', ''):<28} t={row['seq_len']:<6} {row['tokens_per_s']:>12,.0f} "
                   f"tokens/s")
  for row in read(out, "decode"):
    if "ms_per_token" in row:
      lines.append(f"decode     {row['mixer']:<28} ctx={row['context']:<6} batch {row['batch']:<3} "
                   f"{row['ms_per_token']:>8.3f} ms/token  state {row['state_bytes']:,} bytes")
  return lines


def where(bench: str, row: dict) -> str:
  """A failed row's step, or its benchmark and what it was timing (a benchmark's own error line)."""
  keys = ("mixer", "form", "requested", "variant", "seq_len")
  return row.get("step") or " ".join([bench, *(f"{key}={row[key]}" for key in keys if key in row)])


def summary(out: pathlib.Path) -> None:
  """Prints and writes OUT/summary.txt; see the module docstring."""
  steps = read(out, "steps")
  env = (out / "env.txt").read_text().splitlines() if (out / "env.txt").exists() else ["env.txt: missing"]
  lines = ["== accelerator benchmark summary", *env[:7], "", "steps (wall seconds, status):"]
  lines += [f"  {s['step']:<24} {s['seconds']:>7.1f} s  {s['status']}" + (f" (rc {s['rc']})" if s["rc"] else "")
            + f"  {s['rows']} lines" for s in steps]
  lines.append(f"  {'all steps':<24} {sum(s['seconds'] for s in steps):>7.1f} s")
  problems = [f"{where(bench, row)}: {row.get('status', 'error')}: {row['error']}"
              for bench in ("install", "plan", "mixer", "train", "selective", "decode") for row in read(out, bench)
              if "error" in row]
  lines += ["", "not measured:", *(f"  {line}" for line in problems)] if problems else []
  lines += ["", "figures:", *(f"  {line}" for line in figures(out)), "", "goals (issue #26):"]
  lines += [f"  {line}" for line in goals(read(out, "train"), read(out, "selective"))]
  text = "\n".join(lines) + "\n"
  (out / "summary.txt").write_text(text)
  print(text, end="")


def main(argv: list[str]) -> None:
  command, out = argv[0], pathlib.Path(argv[1])
  if command == "probe":
    probe(out)
  elif command == "record":
    step, bench, rc, seconds, limit = argv[2:7]
    record(out, step, bench, rc, float(seconds), int(limit), json.loads(argv[7]) if len(argv) > 7 else {})
  elif command == "summary":
    summary(out)
  else:
    raise SystemExit(f"usage: {sys.argv[0]} probe|record|summary OUT ...")


if __name__ == "__main__":
  main(sys.argv[1:])
