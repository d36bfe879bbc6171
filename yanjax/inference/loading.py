"""A trained model for inference: the newest readable checkpoint restored onto a device mesh.

`load_inference_model` (used by `yanjax.inference.generate` and `yanjax.export.writer`) restores only the parameters,
each straight into its NamedSharding (no host copy of the model, no single device that must hold it all).
The mesh is, in order of preference:
  1. `mesh_spec`, the `--mesh data=1,fsdp=4` flag (axes not named are 1; one axis may be -1: the rest);
  2. the mesh the run trained with (`meta["config"]["mesh"]`, -1 filled with the devices present);
  3. when the saved mesh does not fit the devices present (a run trained on 8 devices, loaded on 4): FSDP
     over every device, with a warning.
A mesh of fewer devices than present runs on the first ones. Parameters are placed by the run's
logical-axis rules (`meta["config"]["rules"]`), as in training. The restored parameters are checked against
the checksums saved with them (yanjax.training.checkpointing); a checkpoint that fails the check is skipped like an
unreadable one, with a warning, and the one before it is used. The work directory may be local or a bucket
URL (gs://, s3://).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from yanjax.core import storage
from yanjax.core.config import ConfigError
from yanjax.data import tokenizer
from yanjax.model.config import ModelConfig
from yanjax.model.lm import LanguageModel
from yanjax.training import sharding
from yanjax.training.checkpointing import Checkpointer, verify_checksums
from yanjax.training.run_config import DEFAULTS, MESH_AXES

FSDP_ALL = {"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1, "expert": 1}


def parse_mesh(text: str) -> dict[str, int]:
  """`"data=1,fsdp=4"` -> {axis: size} over MESH_AXES (axes not named: 1; at most one -1)."""
  sizes = {axis: 1 for axis in MESH_AXES}
  for item in filter(None, (part.strip() for part in text.split(","))):
    axis, _, value = item.partition("=")
    axis = axis.strip()
    if axis not in MESH_AXES:
      raise ConfigError(f"--mesh {text!r}: unknown axis {axis!r}; axes are {MESH_AXES}")
    try:
      sizes[axis] = int(value)
    except ValueError:
      raise ConfigError(f"--mesh {text!r}: {axis}={value!r} must be an integer (or -1)") from None
    if sizes[axis] < 1 and sizes[axis] != -1:
      raise ConfigError(f"--mesh {text!r}: {axis}={sizes[axis]} must be positive or -1 (the remaining devices)")
  if sum(size == -1 for size in sizes.values()) > 1:
    raise ConfigError(f"--mesh {text!r}: at most one axis may be -1")
  return sizes


def _fit(mesh_cfg: dict[str, int], devices: Sequence[jax.Device]) -> Mesh:
  """The mesh of `mesh_cfg` on all of `devices` (-1 filled), or on the first prod(sizes) of them."""
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  if -1 not in sizes and math.prod(sizes) < len(devices):
    devices = devices[:math.prod(sizes)]
  return sharding.make_mesh(mesh_cfg, devices)


def inference_mesh(saved: dict[str, int] | None, mesh_spec: str | None = None,
                   devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh to restore onto: `mesh_spec` if given (ConfigError if it does not fit), else the saved
  training mesh, else (missing, or needing more devices than present) FSDP over every device."""
  devices = list(jax.devices() if devices is None else devices)
  if mesh_spec:
    return _fit(parse_mesh(mesh_spec), devices)
  if saved:
    try:
      return _fit({a: int(saved.get(a, 1)) for a in MESH_AXES}, devices)
    except ConfigError as error:
      logging.warning("the run's mesh %s does not fit the %d devices present (%s); restoring with FSDP over "
                      "all %d devices instead (--mesh chooses another)", dict(saved), len(devices), error,
                      len(devices))
  return sharding.make_mesh(FSDP_ALL, devices)


def _rules(run_config: dict[str, Any]) -> dict[str, tuple[str, ...]]:
  return {name: tuple(axes) for name, axes in run_config.get("rules") or DEFAULTS["rules"]}


def load_inference_model(workdir: str | os.PathLike, mesh_spec: str | None = None
                         ) -> tuple[LanguageModel, ModelConfig, epath.Path | None]:
  """(model with the newest readable checkpoint's parameters, its ModelConfig, the run's tokenizer or None).

  Args:
    workdir: the training run's work directory (local path, gs:// or s3:// URL).
    mesh_spec: e.g. "fsdp=4" or "data=1,fsdp=-1,tensor=2"; None: the run's own mesh (see the module doc).
  Returns:
    The model (parameters as NamedSharding-placed jax.Arrays), its config, and the run's tokenizer file
    (`workdir/tokenizer.model` or `workdir/tokenizer.json`) as an epath when the run has one.
  Raises:
    FileNotFoundError when there is no (readable) checkpoint; ConfigError for a bad `mesh_spec` or an
    unreachable store; TokenizerMismatchError when the workdir holds both tokenizer files.
  """
  root = storage.as_path(workdir)
  if not storage.check_readable(root / "checkpoints", "workdir",
                                "give the --workdir of a training run (local path, gs:// or s3:// URL)"):
    raise FileNotFoundError(f"no checkpoint under {root / 'checkpoints'}; train first with "
                            f"python -m yanjax.main.train --workdir {workdir}")
  tokenizer_file = tokenizer.find_file(root)  # before the restore: refusing takes a moment
  checkpointer = Checkpointer(os.fspath(workdir), async_save=False)
  try:
    steps = checkpointer.steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint under {root / 'checkpoints'}; train first with "
                              f"python -m yanjax.main.train --workdir {workdir}")
    for step in reversed(steps):
      try:
        model, cfg = _restore(checkpointer, step, mesh_spec)
      except ConfigError:
        raise
      except Exception as error:  # pylint: disable=broad-except  # any unreadable checkpoint: try older
        logging.warning("checkpoint at step %d is unreadable (%s: %s); trying the previous one", step,
                        type(error).__name__, (str(error).splitlines() or [""])[0][:300])
        continue
      return model, cfg, tokenizer_file
  finally:
    checkpointer.close()
  raise FileNotFoundError(f"no readable checkpoint under {root / 'checkpoints'}")


def _restore(checkpointer: Checkpointer, step: int, mesh_spec: str | None) -> tuple[LanguageModel, ModelConfig]:
  """The parameters of checkpoint `step`, each restored straight into its NamedSharding on the mesh.

  Raises ValueError when they differ from the checksums saved with them (checkpoints from before checksums
  were recorded are not checked).
  """
  meta = checkpointer.read_meta(step)
  run_config = meta["config"]
  cfg = ModelConfig.saved(run_config["model"])
  mesh = inference_mesh(run_config.get("mesh"), mesh_spec)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))))
  shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, _rules(run_config), mesh))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(abstract), shardings)
  item = {"params": target}
  restored = checkpointer.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  params = restored["state"]["params"]
  saved = meta.get("checksums")
  if saved is not None:  # the train state's; keys of the params are those of {"params": params}
    verify_checksums({"params": params}, {k: v for k, v in saved.items() if k.startswith("['params']")})
  logging.info("restored step %d onto mesh %s", step, dict(mesh.shape))
  return nnx.merge(graphdef, params), cfg
