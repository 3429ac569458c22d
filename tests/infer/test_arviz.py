"""Tests for :mod:`vdn_pyro.inference.arviz`: groups, dims, coords, ArviZ functions, netCDF."""

import json
import warnings

import numpy as np
import pyro
import pytest
import torch

from tests.common import assert_close
from vdn_pyro import VDN, FitResult, fit
from vdn_pyro.inference import arviz as vdn_az
from vdn_pyro.inference import load_inference_data, load_network, save_inference_data, to_inference_data

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    az = pytest.importorskip("arviz")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

ARVIZ_1 = int(az.__version__.split(".")[0]) >= 1
D = 3
WEIGHT = torch.tensor([[1.5], [-2.0], [0.5]])


def regression(n, seed=123):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen)
    return x, x @ WEIGHT + 0.1 * torch.randn(n, 1, generator=gen)


def group(idata, name):
    """A group as an :class:`xarray.Dataset` (InferenceData attribute or DataTree node)."""
    value = idata[name] if ARVIZ_1 else getattr(idata, name)
    return value.to_dataset() if hasattr(value, "to_dataset") else value


def groups(idata):
    return set(idata.children) if ARVIZ_1 else set(idata.groups())


@pytest.fixture(scope="module")
def fitted():
    """A distributional network and its deterministic twin, fitted on the same data."""
    x, y = regression(80)
    out = {}
    for deterministic in (False, True):
        pyro.set_rng_seed(0)
        net = VDN(D, 1, units=(6, 4), hidden=(16,), beta=0.2, deterministic=deterministic)
        out[deterministic] = (net, fit(net, x, y, steps=60, batch_size=40, lr=3e-2, seed=0, progress=False))
    return out, x, y


@pytest.fixture(scope="module")
def idata(fitted):
    nets, x, y = fitted
    net, result = nets[False]
    return to_inference_data(net, x[:12], y[:12], num_samples=50, chains=2, history=result, seed=0)


def test_groups_dims_and_coords(idata, fitted):
    nets, x, y = fitted
    net = nets[False][0]
    assert groups(idata) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "prior",
        "observed_data",
        "constant_data",
        "training",
    }
    post = group(idata, "posterior")
    assert post["layers.0.z"].dims == ("chain", "draw", "obs", "layers.0.unit")
    assert post["layers.1.z"].dims == ("chain", "draw", "obs", "layers.1.unit")
    assert post["layers.0.z"].shape == (2, 50, 12, 6) and post["layers.1.z"].shape == (2, 50, 12, 4)
    assert list(post["layers.0.unit"].values) == list(range(6))
    assert list(post["obs"].values) == list(range(12))
    assert post.attrs["deterministic"] == 0 and post.attrs["sites"] == "layers.0.z,layers.1.z"
    assert json.loads(post.attrs["config"])["units"] == [6, 4]
    assert group(idata, "posterior_predictive")["y"].dims == ("chain", "draw", "obs", "output")
    assert group(idata, "log_likelihood")["y"].dims == ("chain", "draw", "obs")
    assert group(idata, "prior")["layers.0.z"].dims == ("chain", "draw", "layers.0.unit")
    assert group(idata, "observed_data")["y"].dims == ("obs", "output")
    assert group(idata, "constant_data")["x"].dims == ("obs", "feature")
    assert_close(group(idata, "observed_data")["y"].values, y[:12])
    assert_close(group(idata, "constant_data")["x"].values, x[:12])
    # the posterior draws are those of each unit's amortized posterior
    loc, scale = net.posteriors(x[:12])["layers.0.z"]  # (B, H, 1)
    draws = post["layers.0.z"].values.reshape(100, 12, 6)
    assert np.abs(draws.mean(0) - loc[..., 0].numpy()).max() < 4 * scale.max().item() / 10 + 0.05
    # the standard Normal prior
    prior = group(idata, "prior")["layers.0.z"].values
    assert abs(prior.mean()) < 0.3 and abs(prior.std() - 1) < 0.2


def test_training_group_holds_history_with_per_unit_kl_and_beta(idata, fitted):
    result = fitted[0][False][1]
    training = group(idata, "training")
    assert list(training["step"].values) == result.logged_steps
    assert training["layers.0.z.kl"].dims == ("step", "layers.0.unit")
    assert_close(training["layers.0.z.kl"].values, result.unit_kl["layers.0.z"])
    assert_close(training["layers.1.z.beta"].values, result.unit_beta["layers.1.z"])
    assert_close(training["loss"].values, [row["loss"] for row in result.history])
    assert np.isnan(training["val_loss"].values).all()  # fitted without validation data
    assert training.attrs["steps"] == 60 and training.attrs["stop_reason"] == "completed"


def test_log_likelihood_is_pointwise_gaussian(fitted):
    nets, x, y = fitted
    net = nets[False][0]
    idata = to_inference_data(net, x[:5], y[:5], num_samples=4, seed=1)
    post, ll = group(idata, "posterior"), group(idata, "log_likelihood")["y"].values  # (1, 4, 5)
    # recompute log p(y | z) from the sampled last-layer latents
    z = torch.as_tensor(post["layers.1.z"].values[0])  # (4, 5, H)
    fn = net.output_dist(x[:5], z)
    expected = fn.log_prob(y[:5].unsqueeze(1)).squeeze(-1)  # (4, 5)
    assert_close(ll[0], expected, atol=1e-5, rtol=1e-5)


def test_summary_has_one_row_per_unit_latent_with_mean_sd_hdi(idata):
    if ARVIZ_1:  # arviz >= 1 defaults to an 89% ETI
        options, low, high = dict(ci_kind="hdi", ci_prob=0.94), "hdi94_lb", "hdi94_ub"
    else:
        options, low, high = {}, "hdi_3%", "hdi_97%"
    summary = az.summary(idata, var_names=["layers.0.z"], coords={"obs": [0]}, **options)
    assert list(summary.index) == [f"layers.0.z[0, {u}]" for u in range(6)]
    for column in ("mean", "sd", low, high, "r_hat"):
        assert column in summary.columns
    summary = summary.astype(float)
    assert (summary["sd"] > 0).all() and (summary[low] < summary[high]).all()
    full = az.summary(idata, var_names=["layers.1.z"], kind="stats", **options)
    assert len(full) == 12 * 4  # one row per (obs, unit)


def test_forest_and_hdi_plots_run(idata, fitted):
    import matplotlib.pyplot as plt

    x = fitted[1][:12, 0].numpy()
    if ARVIZ_1:  # arviz-plots has no plot_hdi: draw the band from az.hdi
        options = dict(coords={"obs": [0]}, combined=True, backend="matplotlib")
        az.plot_forest(idata, var_names=["layers.0.z"], **options)
        band = az.hdi(idata, group="posterior_predictive", prob=0.9)["y"].sel(output=0).values  # (B, 2)
        order = np.argsort(x)
        assert plt.fill_between(x[order], band[order, 0], band[order, 1])
    else:
        axes = az.plot_forest(idata, var_names=["layers.0.z"], coords={"obs": [0]}, combined=True)
        labels = [t.get_text() for t in axes[0].get_yticklabels()]
        assert len(labels) == 6  # one line per unit
        ax = az.plot_hdi(x, group(idata, "posterior_predictive")["y"].sel(output=0), hdi_prob=0.9)
        assert ax.collections  # the band
    plt.close("all")


def test_loo_and_compare_with_the_deterministic_twin(idata, fitted):
    nets, x, y = fitted
    twin = nets[True][0]
    twin_data = to_inference_data(twin, x[:12], y[:12], num_samples=50, chains=2, seed=0)
    assert "prior" not in groups(twin_data)
    post = group(twin_data, "posterior")
    assert post.attrs["deterministic"] == 1
    z = post["layers.0.z"].values  # the twin's point values, repeated over draws
    assert (z == z[:1, :1]).all()
    loc = twin.posteriors(x[:12])["layers.0.z"][0][..., 0].numpy()
    assert_close(z[0, 0], loc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pareto k warnings on a tiny data set
        elpd, _, pointwise = loo_values(az.loo(idata, pointwise=True))
        assert pointwise.shape == (12,) and np.isfinite(elpd)
        twin_elpd, twin_p, _ = loo_values(az.loo(twin_data, pointwise=True))
        table = az.compare({"vdn": idata, "deterministic": twin_data})
    # the twin's draws are identical: its LOO is its in-sample log-likelihood, with no penalty
    in_sample = group(twin_data, "log_likelihood")["y"].values.mean((0, 1)).sum()
    assert abs(twin_elpd - in_sample) < 1e-6 and abs(twin_p) < 1e-6
    assert set(table.index) == {"vdn", "deterministic"}
    assert np.isfinite(table["elpd" if ARVIZ_1 else "elpd_loo"].astype(float)).all()


def loo_values(result):
    """``(elpd, p_loo, pointwise elpd)`` from either arviz's ELPDData."""
    if ARVIZ_1:
        return float(result.elpd), float(result.p), np.asarray(result.elpd_i)
    return float(result["elpd_loo"]), float(result["p_loo"]), np.asarray(result["loo_i"])


def test_netcdf_round_trip(idata, tmp_path):
    path = save_inference_data(idata, tmp_path / "idata.nc")
    loaded = load_inference_data(path)
    assert groups(loaded) == groups(idata)
    for name in groups(idata):
        a, b = group(idata, name), group(loaded, name)
        assert set(a.data_vars) == set(b.data_vars), name
        for var in a.data_vars:
            assert a[var].dims == b[var].dims, (name, var)
            np.testing.assert_array_equal(a[var].values, b[var].values)
    assert group(loaded, "posterior").attrs["sites"] == "layers.0.z,layers.1.z"
    assert group(loaded, "training").attrs["stop_reason"] == "completed"
    (tmp_path / "idata.nc").unlink()  # the loaded data no longer hold the file open


def test_export_a_saved_run_from_its_directory(tmp_path):
    """What a command-line `evaluate RUN_DIR` does: rebuild the network and history from disk."""
    x, y = regression(30)
    pyro.set_rng_seed(0)
    net = VDN(D, 1, units=(5,), hidden=(8,))
    fit(net, x, y, steps=8, batch_size=10, log_every=4, progress=False, checkpoint_dir=tmp_path)
    rebuilt = load_network(tmp_path)
    history = FitResult.from_checkpoint(tmp_path, network=rebuilt)
    idata = to_inference_data(rebuilt, x[:4], y[:4], num_samples=5, history=history, seed=0)
    assert list(group(idata, "training")["step"].values) == [4, 8]
    assert group(idata, "training").attrs["stop_reason"] == "completed"
    reference = to_inference_data(net, x[:4], y[:4], num_samples=5, seed=0)
    np.testing.assert_array_equal(
        group(idata, "posterior")["layers.0.z"].values, group(reference, "posterior")["layers.0.z"].values
    )


def test_temporal_network_with_ar_prior_and_latent_dims():
    pyro.set_rng_seed(0)
    net = VDN(2, 1, units=(3,), hidden=(8,), latent_dim=2, prior="ar")
    x, y = torch.randn(4, 5, 2), torch.randn(4, 5, 1)  # (B, T, D), (B, T, out)
    idata = to_inference_data(net, x, y, num_samples=6, chains=1, seed=0)
    post = group(idata, "posterior")["layers.0.z"]
    assert post.dims == ("chain", "draw", "obs", "layers.0.unit", "latent", "time")
    assert post.shape == (1, 6, 4, 3, 2, 5)
    assert group(idata, "prior")["layers.0.z"].dims == ("chain", "draw", "layers.0.unit", "latent", "time")
    assert group(idata, "posterior_predictive")["y"].dims == ("chain", "draw", "obs", "time", "output")
    assert group(idata, "log_likelihood")["y"].shape == (1, 6, 4)
    assert group(idata, "constant_data")["x"].dims == ("obs", "time", "feature")


def test_categorical_targets_and_custom_coords():
    pyro.set_rng_seed(0)
    net = VDN(D, 3, units=(4,), hidden=(8,), likelihood="categorical")
    x, labels = torch.randn(6, D), torch.tensor([0, 1, 2, 0, 1, 2])
    names = [f"row{i}" for i in range(6)]
    idata = to_inference_data(net, x, labels, num_samples=5, coords={"obs": names}, batch_size=4)
    pred = group(idata, "posterior_predictive")["y"]
    assert pred.dims == ("chain", "draw", "obs") and list(pred["obs"].values) == names
    assert set(np.unique(pred.values)) <= {0, 1, 2}


def test_without_targets_there_is_no_likelihood_group():
    net = VDN(D, 1, units=(4,), hidden=(8,))
    idata = to_inference_data(net, torch.randn(3, D), num_samples=5)
    assert groups(idata) == {"posterior", "posterior_predictive", "prior", "constant_data"}


def test_seed_fixes_the_draws_and_leaves_the_global_state_alone(fitted):
    nets, x, _ = fitted
    net = nets[False][0]
    before = torch.get_rng_state()
    a = to_inference_data(net, x[:3], num_samples=5, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = to_inference_data(net, x[:3], num_samples=5, seed=7)
    c = to_inference_data(net, x[:3], num_samples=5, seed=8)
    za, zb, zc = (group(d, "posterior")["layers.0.z"].values for d in (a, b, c))
    assert (za == zb).all() and not (za == zc).all()


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(num_samples=0), ValueError, r"Expected num_samples to be an int >= 1, but got 0"),
        (dict(chains=1.5), ValueError, r"Expected chains to be an int >= 1, but got 1.5"),
        (dict(network=torch.nn.Linear(3, 1)), TypeError, r"contains Neurons layers .* got Linear"),
        (dict(x=torch.randn(4, 5)), ValueError, r"Expected x of shape \(B, 3\) or \(B, T, 3\)"),
    ],
    ids=["num-samples", "chains", "no-neurons", "x-shape"],
)
def test_bad_arguments_are_refused(options, error, match):
    options = {"network": VDN(D, 1, units=(4,), hidden=(8,)), "x": torch.randn(4, D), **options}
    with pytest.raises(error, match=match):
        to_inference_data(**options)


@pytest.mark.skipif(not ARVIZ_1, reason=f"arviz >= 1.0 needs Python >= 3.12; installed: {az.__version__}")
def test_arviz_1_returns_a_datatree(idata):
    import xarray as xr

    assert vdn_az.arviz_major_version() >= 1
    assert isinstance(idata, xr.DataTree)
    assert az.summary(idata, var_names=["layers.0.z"], coords={"obs": [0]}).shape[0] == 6
    az.loo(idata)


@pytest.mark.skipif(ARVIZ_1, reason="checks the arviz < 1 container")
def test_arviz_0_returns_inference_data(idata):
    assert vdn_az.arviz_major_version() == 0
    assert isinstance(idata, az.InferenceData)
