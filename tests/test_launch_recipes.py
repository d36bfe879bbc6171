"""The launch recipes besides Slurm (tests/test_slurm.py runs those on a real cluster): the local launcher's
documented command is run; the TPU-VM script and the JobSet manifest, which need Google Cloud or Kubernetes,
are rendered and checked offline (what they run, with which env vars, and that the trainer accepts the
command line).
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from test_train import REPO, tiny_flags

from yanjax.core.cli import PREEMPTED_EXIT_CODE

README = REPO / "launch/README.md"

# Parses a trainer command line with the trainer's own flags (absl + config_flags), validates the config and
# reads the multi-host settings from this process's env; prints what it found as JSON. Trains nothing.
PARSE_TRAINER_ARGV = """
import json, sys
from yanjax.training import distributed, sharding
from yanjax.main import train
from yanjax.training.run_config import validate_run_config
train.parse_flags(["yanjax.main.train", *sys.argv[2:]])
cfg = train.FLAGS.config
validate_run_config(cfg)
settings = distributed.read_settings()
devices = int(sys.argv[1])
shape = sharding.mesh_shape(dict(cfg.mesh), devices) if devices else None
print(json.dumps({"workdir": train.FLAGS.workdir, "stores": list(cfg.data.stores),
                  "global_batch": cfg.train.global_batch, "mesh": shape,
                  "settings": settings._asdict(), "mode": distributed.detect_mode(settings)}))
"""


def parse_trainer_argv(argv: list[str], env: dict[str, str] | None = None, devices: int = 0) -> dict:
  """What the trainer makes of `argv` (the arguments after `python -m yanjax.main.train`), run from the repo root.

  `env`: the recipe's env vars; `devices`: the run's device count, to resolve the config's mesh (0: don't).
  """
  proc = subprocess.run([sys.executable, "-c", PARSE_TRAINER_ARGV, str(devices), *argv], cwd=REPO,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, f"the trainer rejects {argv}:\n{proc.stdout}{proc.stderr}"
  return json.loads(proc.stdout.strip().splitlines()[-1])


def trainer_argv(command: list[str]) -> list[str]:
  """The arguments after `-m yanjax.main.train` in a command."""
  for i in range(len(command) - 1):
    if command[i:i + 2] == ["-m", "yanjax.main.train"]:
      return command[i + 2:]
  raise AssertionError(f"no `-m yanjax.main.train` in {command}")


def readme_command(marker: str) -> list[str]:
  """The first ```bash block command in launch/README.md that contains `marker`, as argv."""
  for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
    command = block.replace("\\\n", " ")
    for line in command.splitlines():
      if marker in line:
        return shlex.split(line.split("#")[0])
  raise AssertionError(f"no command with {marker!r} in {README}")


# ---------------------------------------------------------------------------------------------------------
# The local launcher: run.


@pytest.mark.slow
def test_local_launcher_documented_command(small_store, tmp_path):
  """launch/README.md's local.py command, as written plus a tiny model on a small store: 2 processes x 2 devices."""
  command = readme_command("launch/local.py")
  assert command[:6] == ["python", "launch/local.py", "--num_processes", "2", "--devices_per_process", "2"], command
  separator = command.index("--")
  trainer = command[separator + 1:]
  assert trainer[:3] == ["python", "-m", "yanjax.main.train"] and "--config" in trainer and "--workdir" in trainer
  workdir = tmp_path / "run"
  trainer[trainer.index("--workdir") + 1] = str(workdir)
  steps = 6
  extra = [f for f in tiny_flags(small_store, steps=steps) if not f.startswith("--config=")]  # keeps its --config
  command = [sys.executable, *command[1:separator + 1], sys.executable, *trainer[1:], *extra]
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  log_dir = re.search(r"logs in (\S+)", proc.stderr)
  try:
    logs = "".join(f"---- {p} ----\n{p.read_text(errors='replace')[-3000:]}\n"
                   for p in sorted(pathlib.Path(log_dir[1]).glob("*.log"))) if log_dir else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    assert "processes x 2 CPU devices" in proc.stderr and "mesh {'data': 4" in proc.stdout
    assert sorted(p.name for p in pathlib.Path(log_dir[1]).iterdir()) == ["process_0.log", "process_1.log"]
  finally:
    if log_dir:
      shutil.rmtree(log_dir[1], ignore_errors=True)
  steps_logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line]
  assert steps_logged == list(range(1, steps + 1))
  assert (workdir / "checkpoints" / str(steps)).exists()


# ---------------------------------------------------------------------------------------------------------
# Cloud TPU VM: rendered with a fake gcloud that plays one worker here (copies, runs the remote commands).

FAKE_GCLOUD = '''#!{python}
"""Records its arguments; `tpu-vm scp SRC NAME:DST` copies to $FAKE_HOME/DST, `tpu-vm ssh --command=C` runs C."""
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as calls:
  calls.write(json.dumps(args) + "\\n")
positional = [a for a in args if not a.startswith("--")]
if positional[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
  shutil.copy(positional[4], os.path.join(os.environ["FAKE_HOME"], positional[5].split(":", 1)[1]))
elif positional[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
  command = [a for a in args if a.startswith("--command=")][0][len("--command="):]
  env = dict(os.environ, HOME=os.environ["FAKE_HOME"])
  sys.exit(subprocess.run(["bash", "-c", command], env=env, cwd=env["HOME"]).returncode)
'''

# Stands in for uv: `uv venv DIR` makes DIR/bin/python, a stub that records its argv, cwd and env.
FAKE_UV = '''#!{python}
import json, os, sys
with open(os.environ["FAKE_CALLS"] + ".uv", "a") as calls:
  calls.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "venv":
  python = os.path.join(sys.argv[-1], "bin", "python")
  os.makedirs(os.path.dirname(python))
  with open(python, "w") as stub:
    stub.write("#!{python}\\nimport json, os, sys\\n"
               "json.dump(dict(argv=sys.argv[1:], cwd=os.getcwd(), env=dict(os.environ)), "
               "open(os.environ['FAKE_CALLS'] + '.trainer', 'w'))\\n")
  os.chmod(python, 0o755)
'''


def test_tpu_pod_script_renders_and_its_trainer_command_parses(tmp_path):
  bin_dir, home = tmp_path / "bin", tmp_path / "worker_home"
  bin_dir.mkdir()
  home.mkdir()
  for name, text in (("gcloud", FAKE_GCLOUD), ("uv", FAKE_UV)):
    (bin_dir / name).write_text(text.format(python=sys.executable))
    (bin_dir / name).chmod(0o755)
  calls = tmp_path / "calls"
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_CALLS": str(calls), "FAKE_HOME": str(home),
         "TPU_NAME": "my-v5p-64", "ZONE": "us-east5-a", "PROJECT": "my-project"}
  config, workdir = "configs/yan_1p6b.py", "gs://my-bucket/runs/yan_1p6b"
  # As launch/README.md shows it, plus trainer flags (one with quotes and parentheses, which must survive ssh).
  assert f"TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh {config} {workdir}" in README.read_text()
  extra = ["--config.train.log_every=50", "--config.data.stores=('gs://my-bucket/data/a b',)"]
  proc = subprocess.run(["launch/tpu_pod.sh", config, workdir, *extra], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr

  gcloud = [json.loads(line) for line in calls.read_text().splitlines()]
  assert [c[:4] for c in gcloud] == [["compute", "tpus", "tpu-vm", c] for c in ("scp", "ssh", "ssh")]
  for call in gcloud:  # every call goes to all workers of the named TPU, in the zone and project
    assert {"--zone=us-east5-a", "--worker=all", "--project=my-project"} <= set(call), call
  assert gcloud[0][5] == "my-v5p-64:yanjax.tar.gz" and gcloud[1][4] == gcloud[2][4] == "my-v5p-64"
  # The worker got HEAD, installed it with the TPU jax into the venv, and ran the trainer in the checkout.
  assert (home / "yanjax/yanjax/main/train.py").exists() and (home / "yanjax" / config).exists()
  uv = [json.loads(line) for line in pathlib.Path(f"{calls}.uv").read_text().splitlines()]
  assert uv == [["venv", "--python", "3.11", f"{home}/yanjax-venv"],
                ["pip", "install", "--python", f"{home}/yanjax-venv/bin/python", "-e", f"{home}/yanjax", "jax[tpu]"]]
  trainer = json.loads(pathlib.Path(f"{calls}.trainer").read_text())
  assert trainer["cwd"] == f"{home}/yanjax" and trainer["env"]["PYTHONUNBUFFERED"] == "1"
  argv = trainer_argv(["python", *trainer["argv"]])
  assert argv == ["--config", config, "--workdir", workdir, *extra]
  # No YANJAX_* cluster vars: JAX's TPU detection finds the workers (not testable off a TPU VM).
  parsed = parse_trainer_argv(argv)
  assert parsed["workdir"] == workdir and parsed["stores"] == ["gs://my-bucket/data/a b"]
  assert parsed["settings"]["coordinator_address"] is None


# ---------------------------------------------------------------------------------------------------------
# Kubernetes JobSet: the manifest's shape (JobSet v1alpha2 API), its env vars and its command line.

# Fields of the JobSet v1alpha2 API (jobset.sigs.k8s.io reference) this manifest may use.
JOBSET_SPEC_KEYS = {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend",
                    "coordinator", "managedBy", "ttlSecondsAfterFinished"}
FAILURE_POLICY_KEYS = {"maxRestarts", "restartStrategy", "rules"}
FAILURE_RULE_KEYS = {"name", "action", "onJobFailureReasons", "targetReplicatedJobs"}
FAILURE_ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"}
NETWORK_KEYS = {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"}
REPLICATED_JOB_KEYS = {"name", "groupName", "template", "replicas", "dependsOn"}
TRAINER_ENV = ("YANJAX_COORDINATOR_ADDRESS", "YANJAX_NUM_PROCESSES", "YANJAX_PROCESS_ID")


@pytest.mark.slow
def test_jobset_manifest_shape_env_and_command():
  manifest = yaml.safe_load((REPO / "launch/jobset.yaml").read_text())
  assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and manifest["kind"] == "JobSet"
  name, spec = manifest["metadata"]["name"], manifest["spec"]
  assert set(spec) <= JOBSET_SPEC_KEYS and set(spec["network"]) <= NETWORK_KEYS
  assert spec["network"]["enableDNSHostnames"] is True  # process 0 is reached by its pod's name
  policy = spec["failurePolicy"]
  assert set(policy) <= FAILURE_POLICY_KEYS and isinstance(policy["maxRestarts"], int)
  for rule in policy["rules"]:
    assert set(rule) <= FAILURE_RULE_KEYS and rule["action"] in FAILURE_ACTIONS, rule
  # Preemption (the pod failure policy's FailJob, on exit 42 or eviction) restarts without limit.
  assert {"action": "RestartJobSetAndIgnoreMaxRestarts", "onJobFailureReasons": ["PodFailurePolicy"]} in policy["rules"]

  [replicated] = spec["replicatedJobs"]
  assert set(replicated) <= REPLICATED_JOB_KEYS and replicated["replicas"] == 1
  job = replicated["template"]["spec"]  # a batch/v1 JobSpec
  assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
  assert job["backoffLimit"] == 0
  exit_rule, evicted_rule = job["podFailurePolicy"]["rules"]
  assert exit_rule["action"] == "FailJob" and exit_rule["onExitCodes"]["values"] == [PREEMPTED_EXIT_CODE]
  assert evicted_rule["onPodConditions"] == [{"type": "DisruptionTarget"}]
  pod = job["template"]["spec"]
  assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
  assert pod["terminationGracePeriodSeconds"] >= 60  # time to save after SIGTERM
  [container] = pod["containers"]
  assert container["name"] == exit_rule["onExitCodes"]["containerName"] == "trainer"
  gpus = container["resources"]["limits"]["nvidia.com/gpu"]

  # Every env var the trainer's explicit multi-process mode reads, and their values per pod.
  env = {e["name"]: e for e in container["env"]}
  assert set(TRAINER_ENV) <= set(env)
  hosts = job["parallelism"] * replicated["replicas"]
  assert env["YANJAX_NUM_PROCESSES"]["value"] == str(hosts)
  coordinator = env["YANJAX_COORDINATOR_ADDRESS"]["value"]
  port = container["ports"][0]["containerPort"]
  assert coordinator == f"{name}-{replicated['name']}-0-0.{spec['network'].get('subdomain', name)}:{port}"
  assert env["YANJAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
      "metadata.annotations['batch.kubernetes.io/job-completion-index']"

  # The command: run by the image's WORKDIR (a copy of this repo), parsed with the trainer's flags, per pod.
  command = container["command"]
  assert command[:3] == ["python", "-m", "yanjax.main.train"]
  argv = trainer_argv(command)
  config = argv[argv.index("--config") + 1]
  assert (REPO / config).exists()
  dockerfile = (REPO / "launch/Dockerfile").read_text()
  assert "COPY . ." in dockerfile and "configs" not in (REPO / "launch/Dockerfile.dockerignore").read_text()
  mounts = [m["mountPath"] for m in container["volumeMounts"]]
  for index in range(hosts):
    pod_env = {k: e["value"] for k, e in env.items() if "value" in e} | {"YANJAX_PROCESS_ID": str(index)}
    parsed = parse_trainer_argv(argv, pod_env, devices=hosts * gpus)
    assert parsed["mode"] == "explicit" and parsed["settings"] == {
        "coordinator_address": coordinator, "num_processes": hosts, "process_id": index, "local_device_count": None}
    assert any(parsed["workdir"].startswith(m + "/") for m in mounts)  # on the shared volume
    data, fsdp = parsed["mesh"][:2]
    assert parsed["global_batch"] % (data * fsdp) == 0, parsed
