"""Multi-host start-up: joins this process to its JAX cluster, from flags, env vars or the scheduler.

Every process of a run calls `initialize_from_flags()` before any other JAX call. The first match
decides the mode:

  explicit  --coordinator_address (host:port), --num_processes and --process_id, each also readable
            from YANJAX_COORDINATOR_ADDRESS, YANJAX_NUM_PROCESSES, YANJAX_PROCESS_ID (flags win):
            launch/local.py, launch/jobset.yaml.
  slurm     a Slurm job step with more than one task: the variables JAX's own Slurm detection reads
            (jax/_src/clusters/slurm_cluster.py); JAX takes the coordinator from the node list.
            JAX shows each process only GPU number SLURM_LOCALID (one task per GPU) unless
            JAX_LOCAL_DEVICE_IDS lists them; launch/slurm.sbatch (one task per node) sets it.
  tpu_pod   a Cloud TPU VM, the check JAX's TPU cluster detection starts with; JAX finds the slice's
            workers itself (GCE metadata, or TPU_WORKER_HOSTNAMES and MEGASCALE_* on GKE). A one-host
            slice gives process_count 1.
  single    anything else: one process, no distributed runtime.

In the multi-process modes an uncaught exception ends the process at once (status 1); otherwise JAX's
exit handler would first wait up to 5 minutes at its shutdown barrier for processes that are still
running, hiding the failure from the launcher or scheduler for as long.

--local_device_count / YANJAX_LOCAL_DEVICE_COUNT makes the CPU backend expose that many devices, so
one machine can stand in for several hosts. JAX fixes this when its backends start, hence the call
order.
"""

import os
import sys
from collections.abc import Mapping
from typing import NamedTuple

import jax
from absl import flags, logging
from jax._src import cloud_tpu_init

_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator service (env YANJAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes in the run (env YANJAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 .. num_processes - 1 (env YANJAX_PROCESS_ID).")
_LOCAL_DEVICE_COUNT = flags.DEFINE_integer(
    "local_device_count", None,
    "CPU devices this process exposes, to simulate hosts on CPU (env YANJAX_LOCAL_DEVICE_COUNT).")

# All required by JAX's Slurm detection (jax/_src/clusters/slurm_cluster.py).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


class Settings(NamedTuple):
  """What the flags and YANJAX_* env vars ask for; None where neither is given."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  local_device_count: int | None


class Topology(NamedTuple):
  """What `initialize_from_flags` set up."""
  mode: str  # "explicit" | "slurm" | "tpu_pod" | "single"
  process_index: int
  process_count: int


_topology: Topology | None = None


def _flag_or_env(flag: flags.FlagHolder, environ: Mapping[str, str], parse=str):
  """The flag's value, else its YANJAX_<NAME> env var (unset or empty: None)."""
  if flag.value is not None:
    return flag.value
  name = "YANJAX_" + flag.name.upper()
  value = environ.get(name)
  if not value:
    return None
  try:
    return parse(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer") from None


def read_settings(environ: Mapping[str, str] = os.environ) -> Settings:
  """Reads flags (which win) and env vars; raises ValueError on an incomplete or impossible set."""
  settings = Settings(
      coordinator_address=_flag_or_env(_COORDINATOR_ADDRESS, environ),
      num_processes=_flag_or_env(_NUM_PROCESSES, environ, int),
      process_id=_flag_or_env(_PROCESS_ID, environ, int),
      local_device_count=_flag_or_env(_LOCAL_DEVICE_COUNT, environ, int))
  explicit = settings[:3]
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    given = ", ".join(f"{k}={v!r}" for k, v in zip(Settings._fields, explicit))
    raise ValueError(
        "an explicit multi-process run needs all of --coordinator_address, --num_processes and "
        f"--process_id (or their YANJAX_* env vars); got {given}")
  if settings.coordinator_address is not None:
    host, _, port = settings.coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(
          f"coordinator_address={settings.coordinator_address!r} must be host:port")
    if settings.num_processes < 1:
      raise ValueError(f"num_processes={settings.num_processes} must be >= 1")
    if not 0 <= settings.process_id < settings.num_processes:
      raise ValueError(
          f"process_id={settings.process_id} must be in [0, num_processes={settings.num_processes})")
  if settings.local_device_count is not None and settings.local_device_count < 1:
    raise ValueError(f"local_device_count={settings.local_device_count} must be >= 1")
  return settings


def detect_mode(settings: Settings, environ: Mapping[str, str] = os.environ) -> str:
  """Which cluster this process belongs to: see the module docstring."""
  if settings.coordinator_address is not None:
    return "explicit"
  if all(v in environ for v in _SLURM_VARS) and int(environ["SLURM_NTASKS"]) > 1:
    return "slurm"
  if cloud_tpu_init.running_in_cloud_tpu_vm:  # set by `import jax`: libtpu and TPU chips present
    return "tpu_pod"
  return "single"


def _join(mode: str, settings: Settings) -> None:
  """Starts JAX's distributed runtime for a multi-process mode."""
  # Cross-process collectives of the CPU backend (CPU-simulated hosts, host-side arrays);
  # accelerator collectives do not use it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if mode == "explicit":
    # Everything is given: skip JAX's cluster detection, which would still restrict the visible
    # GPUs under Slurm or Open MPI, or query the API server on Kubernetes.
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        cluster_detection_method="deactivate")
  elif mode == "slurm":
    jax.distributed.initialize(cluster_detection_method="slurm")
  else:  # tpu_pod
    jax.distributed.initialize()
  _exit_at_once_on_uncaught_exception()


def _exit_at_once_on_uncaught_exception() -> None:
  """After the usual traceback, exits with status 1 without running exit handlers."""
  report = sys.excepthook

  def excepthook(*exc_info):
    report(*exc_info)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)

  sys.excepthook = excepthook


def initialize_from_flags() -> Topology:
  """Joins this process to its cluster; later calls return the first call's result.

  Call it first thing, before any other JAX call: it sets options JAX reads when its backends start,
  then starts them (to read the process index), so set any other such option (jax_platforms, ...)
  before it.
  """
  global _topology
  if _topology is None:
    settings = read_settings()
    mode = detect_mode(settings)
    if settings.local_device_count is not None:
      jax.config.update("jax_num_cpu_devices", settings.local_device_count)
    if mode != "single":
      _join(mode, settings)
    _topology = Topology(mode, jax.process_index(), jax.process_count())
    logging.info("distributed: %s", _topology)
  return _topology
