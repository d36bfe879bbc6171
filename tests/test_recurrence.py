"""The recurrence forms agree with the float32 reference on outputs, final states and gradients, with fixed
per-channel rates (log_a [C], MCSD) and per-token rates (log_a [b, t, C], MCSD with data-dependent decay). The fused
Pallas kernel ("pallas") runs here in Pallas's interpret mode, and is lowered for a GPU (Triton) without one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yanjax.model import recurrence_kernel
from yanjax.model.recurrence import linear_recurrence, resolve_form
from yanjax.training import sharding
from yanjax.training.run_config import DEFAULTS

# Max abs error allowed against the float32 reference, by input dtype, relative to the output scale.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-5}  # inputs are cast to float32 first, so both are tight
GRAD_TOLERANCE = 1e-4


RATES = ["fixed", "per_token"]


def _inputs(dtype, rates="fixed", b=2, t=45, c=3, d=4, seed=0):
  """(x [b, t, C, Dc], log_a [C] or [b, t, C], reset [b, t], h0 [b, C, Dc]); per-token rates are the fixed ones
  times a random multiplier in ~(0.1, 8), as a data-dependent gate gives (down to a ~ 0.004 per step)."""
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(k[0], (b, t, c, d)).astype(dtype)
  log_a = jnp.log(jnp.array([0.5, 0.97, 1 - 2.0 ** -14], jnp.float32))  # short to the paper's longest memory
  if rates == "per_token":
    log_a = (log_a * jnp.exp(jax.random.normal(k[3], (b, t, c)))).astype(dtype)
  reset = (jax.random.uniform(k[1], (b, t)) < 0.08).at[:, 0].set(False)
  h0 = jax.random.normal(k[2], (b, c, d))
  return x, log_a, reset, h0


def _relative_max_error(a, b):
  scale = float(jnp.max(jnp.abs(b))) or 1.0
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) / scale


@pytest.mark.parametrize("rates", RATES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("form,chunk", [("associative", 0), ("chunked", 8), ("chunked", 16), ("chunked", 64),
                                        ("pallas", 16)])
def test_forms_match_reference_outputs_and_final_state(form, chunk, dtype, rates):
  x, log_a, reset, h0 = _inputs(dtype, rates)
  ref_h, ref_last = linear_recurrence(x, log_a, reset, h0, form="reference")
  h, last = linear_recurrence(x, log_a, reset, h0, form=form, chunk_size=chunk or 64)
  assert h.dtype == jnp.float32 and last.dtype == jnp.float32
  err_h, err_last = _relative_max_error(h, ref_h), _relative_max_error(last, ref_last)
  print(f"{form} chunk={chunk} {jnp.dtype(dtype).name} {rates}: max rel err h={err_h:.2e} final={err_last:.2e}")
  assert err_h < TOLERANCE[dtype] and err_last < TOLERANCE[dtype]


@pytest.mark.parametrize("rates", RATES)
@pytest.mark.parametrize("form", ["associative", "chunked", "pallas"])
def test_forms_match_reference_gradients(form, rates):
  x, log_a, reset, h0 = _inputs(jnp.float32, rates)
  probe = jax.random.normal(jax.random.PRNGKey(9), x.shape)

  def loss(x, log_a, h0, form):
    h, last = linear_recurrence(x, log_a, reset, h0, form=form, chunk_size=16)
    return jnp.sum(h * probe) + jnp.sum(jnp.sin(last))

  ref = jax.grad(loss, argnums=(0, 1, 2))(x, log_a, h0, "reference")
  got = jax.grad(loss, argnums=(0, 1, 2))(x, log_a, h0, form)
  for name, g, r in zip(("x", "log_a", "h0"), got, ref):
    err = _relative_max_error(g, r)
    print(f"{form} {rates} grad {name}: max rel err {err:.2e}")
    assert err < GRAD_TOLERANCE


@pytest.mark.parametrize("rates", RATES)
def test_reset_cuts_the_state(rates):
  """After a reset the output does not depend on anything before it (no leak across packed documents)."""
  x, log_a, reset, h0 = _inputs(jnp.float32, rates)
  reset = jnp.zeros_like(reset).at[:, 20].set(True)
  for form in ("reference", "associative", "chunked", "pallas"):
    h1, _ = linear_recurrence(x, log_a, reset, h0, form=form, chunk_size=8)
    h2, _ = linear_recurrence(x.at[:, :20].set(7.0), log_a, reset, h0 * 3, form=form, chunk_size=8)
    assert np.array_equal(np.asarray(h1[:, 20:]), np.asarray(h2[:, 20:])), form
    assert not np.allclose(h1[:, :20], h2[:, :20])


@pytest.mark.parametrize("rates", RATES)
def test_split_sequence_continues_from_final_state(rates):
  x, log_a, reset, h0 = _inputs(jnp.float32, rates)
  first_a, second_a = (log_a, log_a) if rates == "fixed" else (log_a[:, :17], log_a[:, 17:])
  run = jax.jit(linear_recurrence, static_argnames=("form", "chunk_size"))
  for form in ("reference", "associative", "chunked", "pallas"):
    full, _ = run(x, log_a, reset, h0, form=form, chunk_size=8)
    first, state = run(x[:, :17], first_a, reset[:, :17], h0, form=form, chunk_size=8)
    second, _ = run(x[:, 17:], second_a, reset[:, 17:], state, form=form, chunk_size=8)
    err = float(jnp.max(jnp.abs(jnp.concatenate([first, second], 1) - full)))
    print(f"{form} {rates}: split vs one pass {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("rates", RATES)
def test_matches_explicit_sum(rates):
  """h_t = sum_{s<=t, same document} (prod_{s<k<=t} a_k) x_s + (prod_{k<=t} a_k) h0 (before any reset), in
  float64 NumPy; with fixed rates the products are a^(t-s) and a^(t+1)."""
  x, log_a, reset, h0 = _inputs(jnp.float32, rates, b=1, t=20)
  a = np.exp(np.broadcast_to(np.asarray(log_a, np.float64), (1, 20, 3))[0])  # [t, C]
  xs, r, h0n = np.asarray(x[0], np.float64), np.asarray(reset[0]), np.asarray(h0[0], np.float64)
  expected = np.zeros_like(xs)
  for t in range(20):
    start = max([s for s in range(t + 1) if r[s]], default=-1)
    for s in range(max(start, 0), t + 1):
      expected[t] += np.prod(a[s + 1:t + 1], axis=0)[:, None] * xs[s]
    if start < 0:
      expected[t] += np.prod(a[:t + 1], axis=0)[:, None] * h0n
  for form in ("reference", "associative", "chunked", "pallas"):
    h, _ = linear_recurrence(x, log_a, reset, h0, form=form, chunk_size=8)
    np.testing.assert_allclose(np.asarray(h[0]), expected, rtol=1e-4, atol=1e-4)


def test_unknown_form_is_rejected():
  with pytest.raises(ValueError, match="unknown recurrence form"):
    resolve_form("fft")


def test_pallas_kernel_lowers_to_triton_for_a_gpu(monkeypatch):
  """Without a GPU: the forward and backward lower to two Triton kernels (catches block shapes Triton refuses and
  operations its lowering lacks; compiling the Triton IR to PTX is left to a GPU, benchmarks/accelerator.sh)."""
  monkeypatch.setattr(recurrence_kernel, "on_gpu", lambda: True)
  b, t, c, d = 2, 200, 3, 48  # t and Dc not powers of two: padded to the chunk and the feature block

  def grads(x, log_a, reset, h0):
    def loss(x, log_a, h0):
      h, last = linear_recurrence(x, log_a, reset, h0, form="pallas", chunk_size=64)
      return jnp.sum(h) + jnp.sum(last)
    return jax.grad(loss, argnums=(0, 1, 2))(x, log_a, h0)

  shapes = [jax.ShapeDtypeStruct(s, dtype) for s, dtype in
            [((b, t, c, d), jnp.bfloat16), ((b, t, c), jnp.float32), ((b, t), jnp.bool_), ((b, c, d), jnp.float32)]]
  text = jax.jit(grads).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 2 and "mcsd_linear_recurrence" in text
  one_token = [jax.ShapeDtypeStruct((b, 1) + s.shape[2:], s.dtype) for s in shapes[:3]] + shapes[3:]  # decoding
  step = jax.jit(lambda x, log_a, reset, h0: linear_recurrence(x, log_a, reset, h0, form="pallas"))
  assert "xla.gpu.triton" in step.trace(*one_token).lower(lowering_platforms=("cuda",)).as_text()


def test_pallas_sharded_runs_each_devices_rows_and_channels():
  """On a 2 x 2 mesh (rows over data, channels over tensor) the kernel runs on each device's block: outputs and
  gradients equal one device's, and no device gathers the sequence (on a GPU XLA could not partition the kernel's
  custom call: it would run on whole arrays)."""
  x, _, reset, h0 = _inputs(jnp.float32, b=4, t=45, c=4, d=4)  # 4 channels: they split over tensor
  log_a = -jnp.exp(jax.random.normal(jax.random.PRNGKey(5), (4, 45, 4)))
  rules = {name: tuple(axes) for name, axes in DEFAULTS["rules"]}
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "expert": 1}, jax.devices()[:4])

  def loss(x, log_a, h0):
    h, last = linear_recurrence(x, log_a, reset, h0, form="pallas", chunk_size=16)
    return jnp.sum(h * x) + jnp.sum(jnp.sin(last))

  grads = jax.value_and_grad(loss, argnums=(0, 1, 2))
  want = jax.jit(grads)(x, log_a, h0)
  placed = [jax.device_put(a, jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(axes, a.shape, rules, mesh)))
            for a, axes in [(x, ("batch", None, "channels", None)), (log_a, ("batch", None, "channels")),
                            (h0, ("batch", "channels", None))]]
  sharded = jax.jit(sharding.with_activation_rules(grads, mesh, rules))
  got = sharded(*placed)
  for name, g, w in zip(("loss", "x", "log_a", "h0"), jax.tree.leaves(got), jax.tree.leaves(want)):
    err = _relative_max_error(g, w)
    print(f"sharded pallas {name}: max rel err {err:.2e}")
    assert err < 1e-5
  lowered = sharded.lower(*placed)
  manual = [line for line in lowered.as_text().splitlines() if "sdy.manual_computation" in line]
  assert manual and '[{"data"}, {}, {"tensor"}, {}]' in manual[0]  # per device (shard_map): rows and channels split
  assert "all-gather" not in lowered.compile().as_text()
