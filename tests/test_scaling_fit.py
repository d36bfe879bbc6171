"""Scaling-law fits recover known laws from noisy synthetic sweeps; the CLI writes fit.json and three PNGs.

The tolerances come from a Monte Carlo over seeds of the same designs (noted per test): each is 3.4 to 5
standard deviations of the estimator, so a correct fit fails at a random seed well under 1% of the time,
while a wrong formula or a fit stopped early misses by far more.
"""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image

from yanjax.main import fit as fit_cli
from yanjax.scaling import fit
from yanjax.scaling.laws import Law, Runs

# Hoffmann et al. (2022) as published, and Besiroglu et al.'s (2024) refit, as two distinct families.
CHINCHILLA = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
EPOCH = Law(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
REPO = pathlib.Path(__file__).resolve().parents[1]


def grid_runs(law: Law, seed: int, noise: float = 0.01, k: int = 10) -> Runs:
  """A k x k grid, N in 1e6..1e9 and D in 1e8..1e11, with multiplicative log-normal noise on the loss."""
  rng = np.random.default_rng(seed)
  n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e6, 1e9, k), np.geomspace(1e8, 1e11, k)))
  loss = law.loss(n, d) * np.exp(noise * rng.standard_normal(n.size))
  return Runs(n, d, 6 * n * d, loss, np.full(n.size, np.nan))


def isoflop_records(law: Law, family: str, seed: int, noise: float = 0.005) -> list[dict]:
  """5 budgets 1e17..1e21, 9 sizes each spanning 64x around 2 N*(C) (a sweep centred on a rough guess)."""
  rng = np.random.default_rng(seed)
  records = []
  for c in np.geomspace(1e17, 1e21, 5):
    for n in 2 * law.n_opt(c) * np.geomspace(1 / 8, 8, 9):
      d = c / (6 * n)
      loss = law.loss(n, d) * math.exp(noise * rng.standard_normal())
      records.append({"family": family, "params": float(n), "tokens": float(d), "flops": float(6 * n * d),
                      "val_loss": float(loss), "flop_budget": float(c)})
  return records


@pytest.fixture(scope="module")
def noisy_grid():
  runs = grid_runs(CHINCHILLA, seed=0)
  return runs, fit.fit_law(runs, fit.init_grid(coarse=True))


def test_approach3_recovers_known_law(noisy_grid):
  # Monte Carlo, 24 seeds of this design (100 points, 1% noise), standard deviations of the estimates:
  # alpha 0.006, beta 0.009, a 0.009, E 0.032, ln A 0.079, ln B 0.153. A and B trade off against the
  # exponents over ln N, ln D ~ 14..25, hence their wide tolerances.
  _, law = noisy_grid
  got, true = law.summary(), CHINCHILLA.summary()
  for key in ("E", "A", "B", "alpha", "beta", "a", "b", "G"):
    print(f"{key:>5}: recovered {got[key]:10.4f}   true {true[key]:10.4f}")
  assert abs(law.alpha - CHINCHILLA.alpha) < 0.03
  assert abs(law.beta - CHINCHILLA.beta) < 0.03
  assert abs(law.a - CHINCHILLA.a) < 0.03  # N*(C) exponent
  assert abs(law.E - CHINCHILLA.E) < 0.12
  assert abs(math.log(law.A / CHINCHILLA.A)) < 0.3
  assert abs(math.log(law.B / CHINCHILLA.B)) < 0.6


def test_bootstrap_ci_covers_truth(noisy_grid):
  # Level 0.99: at 0.95 each interval misses the truth 5% of the time, and five at once ~20% (40-seed Monte
  # Carlo: per-parameter coverage 0.90..1.00 at 0.95). The width bounds, ~3x the widths seen, make the test
  # fail for an interval too wide to mean anything.
  runs, law = noisy_grid
  ci, kept = fit.bootstrap(runs, lambda r: fit.fit_law(r, law.theta).summary(), n=50, level=0.99, seed=0)
  true = CHINCHILLA.summary()
  for key in fit.LAW_NAMES + ("a",):
    print(f"{key:>5}: true {true[key]:9.4f}   99% CI [{ci[key][0]:9.4f}, {ci[key][1]:9.4f}]")
  assert kept == 50
  for key in fit.LAW_NAMES + ("a",):
    assert ci[key][0] <= true[key] <= ci[key][1], key
  for key, width in (("alpha", 0.1), ("beta", 0.1), ("a", 0.1), ("E", 0.5)):
    assert ci[key][1] - ci[key][0] < width, key


def test_frontier_minimises_law_at_fixed_compute():
  # Brute force over N on the line C = 6 N D checks G and the exponents of N*(C), D*(C).
  law = EPOCH
  for c in (1e18, 1e21, 1e24):
    n = np.geomspace(1e5, 1e13, 400_001)
    n_best = n[np.argmin(law.loss(n, c / (6 * n)))]
    print(f"C={c:.0e}: N* formula {law.n_opt(c):.5g}, brute force {n_best:.5g}")
    assert abs(math.log(law.n_opt(c) / n_best)) < 1e-4
    assert math.isclose(6 * law.n_opt(c) * law.d_opt(c), c, rel_tol=1e-12)
    assert math.isclose(law.loss_opt(c), law.loss(n_best, c / (6 * n_best)), rel_tol=1e-9)


def test_approach2_recovers_n_opt_exponent():
  # Monte Carlo, 200 seeds of this design (0.5% noise): standard deviation of a_N 0.008, bias < 0.001.
  runs = Runs.from_records(isoflop_records(CHINCHILLA, "yan", seed=0))
  iso = fit.fit_isoflop(runs)
  print(f"a_N: recovered {iso.a_n:.4f}   true {CHINCHILLA.a:.4f}")
  print(f"a_D: recovered {iso.a_d:.4f}   true {CHINCHILLA.b:.4f}")
  assert len(iso.budgets) == 5 and not iso.skipped
  assert abs(iso.a_n - CHINCHILLA.a) < 0.03
  assert abs(iso.a_n + iso.a_d - 1.0) < 1e-9  # D_opt = C / (6 N_opt)


def test_load_results_jsonl_and_csv_agree(tmp_path):
  records = isoflop_records(CHINCHILLA, "yan", seed=1)[:4] + isoflop_records(EPOCH, "attention", seed=2)[:3]
  records[0]["flop_budget"] = None  # a run outside the IsoFLOP sweep
  jsonl = tmp_path / "r.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
  csv_path = tmp_path / "r.csv"
  keys = list(records[0])
  csv_path.write_text(",".join(keys) + "\n" + "".join(
      ",".join("" if r[k] is None else str(r[k]) for k in keys) + "\n" for r in records))
  a, b = fit.load_results(jsonl), fit.load_results(csv_path)
  assert list(a) == list(b) == ["yan", "attention"]
  assert len(a["yan"]) == 4 and len(a["attention"]) == 3
  for family in a:
    for field in ("params", "tokens", "flops", "loss", "budget"):
      np.testing.assert_allclose(getattr(a[family], field), getattr(b[family], field), rtol=1e-12)
  assert np.isnan(a["yan"].budget[0])
  jsonl.write_text(json.dumps({"family": "yan", "params": 1.0, "tokens": 2.0, "flops": 12.0,
                               "val_loss": float("nan")}) + "\n")
  with pytest.raises(ValueError, match="val_loss missing, non-positive or not finite"):
    fit.load_results(jsonl)


@pytest.mark.slow
def test_cli_writes_fit_json_and_three_pngs(tmp_path):
  results = tmp_path / "results.jsonl"
  records = isoflop_records(CHINCHILLA, "yan", seed=3) + isoflop_records(EPOCH, "attention", seed=4)
  results.write_text("".join(json.dumps(r) + "\n" for r in records))
  out = tmp_path / "fits"
  cmd = [sys.executable, "-m", "yanjax.main.fit", "--results", str(results), "--out", str(out),
         "--grid", "coarse", "--bootstrap", "20"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  print(proc.stdout, proc.stderr)
  assert proc.returncode == 0
  assert "Warning" not in proc.stderr

  # Tolerance 0.05: about 6 standard deviations of either exponent on this design (bootstrap widths ~0.03).
  fits = json.loads((out / "fit.json").read_text())
  assert list(fits) == ["yan", "attention"]
  for family, law in (("yan", CHINCHILLA), ("attention", EPOCH)):
    a3, a2 = fits[family]["approach3"], fits[family]["approach2"]
    print(f"{family}: a (approach 3) {a3['params']['a']:.4f}, a_N (approach 2) {a2['params']['a_N']:.4f}, "
          f"true {law.a:.4f}")
    assert fits[family]["runs"] == 45
    assert abs(a3["params"]["a"] - law.a) < 0.05 and abs(a2["params"]["a_N"] - law.a) < 0.05
    for key in fit.LAW_NAMES + ("a", "b"):
      lo, hi = a3["ci"][key]
      assert lo <= a3["params"][key] <= hi, (family, key)
    assert len(a2["budgets"]) == 5
  assert proc.stdout.count("N*(C) ~ C^") == 2 and proc.stdout.count("approach 2: N_opt ~ C^") == 2

  for name in ("loss_vs_flops.png", "isoflop.png", "frontier.png"):
    pixels = image.imread(out / name)
    print(name, pixels.shape)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


# ---------------------------------------------------------------------------------------------------------
# Refusals: results that cannot support a fit are refused with the count, and nothing is written.


def test_cli_refuses_a_family_with_fewer_points_than_parameters(tmp_path):
  results = tmp_path / "results.jsonl"
  records = isoflop_records(CHINCHILLA, "yan", seed=3) + isoflop_records(EPOCH, "attention", seed=4)[:4]
  results.write_text("".join(json.dumps(r) + "\n" for r in records))
  out = tmp_path / "fits"
  out.mkdir()
  (out / "fit.json").write_text('{"earlier": true}\n')
  with pytest.raises(fit.FitError, match=r"family 'attention': approach 3 fits 5 parameters .* got 4; nothing "
                                         r"written"):
    fit_cli.main(["--results", str(results), "--out", str(out), "--grid", "coarse", "--bootstrap", "5"])
  assert [p.name for p in out.iterdir()] == ["fit.json"]
  assert (out / "fit.json").read_text() == '{"earlier": true}\n'
  results.write_text("")
  with pytest.raises(fit.FitError, match="no results to fit"):
    fit_cli.main(["--results", str(results), "--out", str(out)])
  with pytest.raises(fit.FitError, match="intervals need at least 2 resamples"):
    fit.fit_families(fit.group_by_family(records[:45]), "coarse", n_boot=1)


def test_approach2_names_each_budget_short_of_sizes():
  records = [r for r in isoflop_records(CHINCHILLA, "yan", seed=0) if r["flop_budget"] < 1e19]  # 2 budgets
  runs = Runs.from_records(records[::4])  # 3 sizes on one budget, 2 on the other
  with pytest.raises(ValueError, match=r"got 1 \(C=1e\+18: 2 sizes\)"):
    fit.fit_isoflop(runs)


def test_intervals_that_all_have_zero_width_are_refused():
  """A bootstrap whose resamples all give the same fit says nothing of its uncertainty: refused. One parameter
  pinned at its bound (E on a small grid) leaves the others' intervals meaningful: kept."""
  flat = {name: (1.0, 1.0) for name in fit.LAW_NAMES}
  with pytest.raises(ValueError, match="intervals of zero width"):
    fit.check_widths(flat, fit.LAW_NAMES)
  one_pinned = {**{name: (1.0, 2.0) for name in fit.LAW_NAMES}, fit.LAW_NAMES[0]: (0.0, 0.0)}
  fit.check_widths(one_pinned, fit.LAW_NAMES)


def test_a_law_without_irreducible_loss_is_fitted_with_e_at_its_floor():
  """With E = 0 (as in a short CPU sweep, where no floor shows), ln E would run to -inf, exp underflow to 0 and
  every bootstrap refit fail: E stops at E_FLOOR, and the fit and its intervals are made."""
  no_floor = Law(E=0.0, A=CHINCHILLA.A, B=CHINCHILLA.B, alpha=CHINCHILLA.alpha, beta=CHINCHILLA.beta)
  runs = grid_runs(no_floor, seed=0, k=4)
  law = fit.fit_law(runs, fit.init_grid(coarse=True))
  assert law.E == pytest.approx(fit.E_FLOOR)
  assert law.alpha == pytest.approx(no_floor.alpha, abs=0.05) and law.beta == pytest.approx(no_floor.beta, abs=0.05)
  family = fit.fit_family(runs, "coarse", n_boot=20)
  assert family.settings["kept_approach3"] >= 2 and family.law_ci["E"][0] == pytest.approx(fit.E_FLOOR)


def test_a_diverging_fit_is_a_value_error_not_an_overflow():
  runs = grid_runs(CHINCHILLA, seed=0, k=3)
  with pytest.raises(ValueError, match="the fit diverged"):
    fit.fit_law(runs, np.array([[800.0, 5.0, 0.5, 0.3, 0.3]]))  # ln A = 800: exp overflows at any fit near it


def test_an_isoflop_minimum_beyond_the_sizes_is_not_extrapolated():
  """A profile whose parabola bottoms out below the smallest size says only that N* is smaller: that budget is
  left out, named with where its minimum fell."""
  records = [r for r in isoflop_records(CHINCHILLA, "yan", seed=0)]
  sizes = sorted({r["params"] for r in records if r["flop_budget"] == 1e17})
  shifted = [r for r in records if not (r["flop_budget"] == 1e17 and r["params"] <= sizes[4])]
  runs = Runs.from_records(shifted)  # at C=1e17 only the 4 sizes above the optimum remain
  iso = fit.fit_isoflop(runs)
  assert 1e17 in iso.skipped and len(iso.budgets) == 4
  with pytest.raises(ValueError, match=r"C=1e\+17: minimum at N=.*, outside the sizes"):
    fit.fit_isoflop(Runs.from_records([r for r in shifted if r["flop_budget"] <= 1e18]))
