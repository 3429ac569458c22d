r"""ArviZ export: a fitted :class:`~vdn_pyro.VDN` as ``InferenceData`` (the only module importing
arviz).

:func:`to_inference_data` draws S = ``chains * num_samples`` samples of every neuron site from the
guide, vectorised under a ``pyro.plate`` over draws at dim -3, replays the model on them, and
returns these groups (dims in brackets; ``chain`` and ``draw`` lead every sampled variable):

- ``posterior``: one variable per site, e.g. ``"layers.0.z"`` with dims
  ``(obs, <layer>.unit[, latent][, time])``. The amortized posterior is per observation, so each
  unit has one latent per row of ``x``. The unit dim is named per layer (``"layers.0.unit"``,
  see :func:`unit_dim`) because layers may differ in width; ``latent`` appears only when k > 1.
  For the deterministic twin each site holds its point value z = loc, repeated over draws.
- ``posterior_predictive``: ``"y"`` with dims ``(obs[, time][, output])`` (no ``output`` for
  class labels);
- ``log_likelihood``: ``"y"`` with dims ``(obs,)``: the pointwise :math:`\log p(y_n \mid z_n)`
  (float64), so that :func:`arviz.loo` and :func:`arviz.compare` work (only when ``y`` is given).
  The deterministic twin's draws are all equal, which PSIS cannot smooth (arviz >= 1 raises "All
  tail values are the same"); its log-likelihood gets a zero-mean ramp of :data:`TWIN_JITTER`
  nats over the draws, so that LOO runs and gives the in-sample ``elpd`` with ``p_loo`` about 0;
- ``prior``: per site, S draws from each unit's prior, dims ``(<layer>.unit[, latent][, time])``
  (absent for the deterministic twin, whose model has no latent sites);
- ``observed_data``: ``"y"`` (when given); ``constant_data``: ``"x"`` with dims
  ``(obs[, time], feature)``;
- ``training`` (when ``history`` is given): the fit history over dim ``step``: ``loss``,
  ``loss_per_obs``, ``val_loss`` (NaN where not validated), ``epoch``, and per site
  ``"<site>.kl"`` and ``"<site>.beta"`` with dims ``(step, <layer>.unit)``; its attrs hold the
  best validation loss and step, the number of steps and the wall time.

With arviz < 1 the result is an :class:`arviz.InferenceData`; with arviz >= 1 (Python >= 3.12)
it is an :class:`xarray.DataTree` with the same groups. :func:`_from_dict` is the one place that
tells the two apart; :func:`save_inference_data` / :func:`load_inference_data` round-trip either
through netCDF.

``az.summary(idata, var_names=["layers.0.z"])`` has one row per (obs, unit) latent with mean, sd
and an interval (HDI 94% under arviz < 1; pass ``ci_kind="hdi", ci_prob=0.94`` under arviz >= 1,
whose default is an 89% ETI); select observations with ``coords={"obs": [0]}`` for one row per
unit, as in ``az.plot_forest(idata, var_names=["layers.0.z"], coords={"obs": [0]}, combined=True)``.
A forecast band is ``az.plot_hdi(t, posterior_predictive["y"])`` under arviz < 1; arviz >= 1 has
no ``plot_hdi``: take ``az.hdi(idata, group="posterior_predictive")`` and ``fill_between`` it.
"""

import dataclasses
import json
import numbers
import warnings

import numpy as np
import pyro
import torch
from pyro import poutine

__all__ = [
    "TWIN_JITTER",
    "arviz_major_version",
    "load_inference_data",
    "save_inference_data",
    "to_inference_data",
    "unit_dim",
]

DRAWS_PLATE = "draws"
#: Half-width (nats) of the zero-mean ramp over draws added to the deterministic twin's
#: log-likelihood, whose draws are otherwise identical (see the module docstring).
TWIN_JITTER = 1e-9


def _arviz():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # arviz 0.2x announces its 1.0 refactor
            import arviz
    except ImportError as e:
        raise ImportError("vdn_pyro's ArviZ export needs arviz: pip install arviz") from e
    return arviz


def arviz_major_version():
    """The installed arviz major version (0 for the 0.x series)."""
    return int(_arviz().__version__.split(".")[0])


def unit_dim(site):
    """The name of the unit dim of a site: ``"layers.0.z" -> "layers.0.unit"``."""
    return (site[: -len(".z")] if site.endswith(".z") else site) + ".unit"


# ----------------------------------------------------------------------------- the version switch
def _from_dict(groups, dims, coords, attrs=None, extra=None):
    """Build the arviz container: the only function that depends on the arviz version.

    :param dict groups: group name -> {variable -> array}; sampled groups have leading
        ``(chain, draw)`` axes, ``observed_data``/``constant_data`` do not.
    :param dict dims: group name -> {variable -> list of dim names, without chain/draw}. Dims
        are per group because a variable may have other dims in another group (the prior of a
        site has no ``obs`` dim).
    :param dict coords: dim name -> coordinate values.
    :param dict attrs: group name -> attrs dict (netCDF-safe values).
    :param dict extra: group name -> :class:`xarray.Dataset` added as is.
    :returns: :class:`arviz.InferenceData` (arviz < 1) or :class:`xarray.DataTree` (arviz >= 1).
    """
    az = _arviz()
    attrs, extra = attrs or {}, extra or {}
    groups = {name: data for name, data in groups.items() if data}
    if arviz_major_version() >= 1:
        import xarray as xr

        # arviz >= 1: from_dict takes nested {group: {var: array}} and returns a DataTree;
        # groups whose name contains "data" get no sample dims, log_likelihood skips event dims.
        datasets = {}
        for name, data in groups.items():
            group_attrs = {name: attrs[name]} if name in attrs else None
            tree = az.from_dict({name: data}, dims=dims.get(name), coords=coords, attrs=group_attrs)
            datasets[name] = tree[name].to_dataset()
        datasets.update(extra)
        return xr.DataTree.from_dict(datasets)
    # arviz < 1: one keyword per group, returning InferenceData
    idata = None
    for name, data in groups.items():
        part = az.from_dict(**{name: data}, dims=dims.get(name), coords=coords)
        if name in attrs:
            getattr(part, name).attrs.update(attrs[name])
        if idata is None:
            idata = part
        else:
            idata.extend(part)
    if extra:
        idata.add_groups(extra)
    return idata


def save_inference_data(idata, path):
    """Write the result of :func:`to_inference_data` to a netCDF file (any arviz version).

    :returns: the path as a string.
    """
    path = str(path)
    if hasattr(idata, "to_netcdf"):
        idata.to_netcdf(path)
    else:
        raise TypeError(f"Expected InferenceData or DataTree, got {type(idata).__name__}.")
    return path


def load_inference_data(path):
    """Read a file written by :func:`save_inference_data` fully into memory (the file is closed).

    :returns: :class:`arviz.InferenceData` (arviz < 1) or :class:`xarray.DataTree` (arviz >= 1).
    """
    az = _arviz()
    if arviz_major_version() >= 1:
        import xarray as xr

        if hasattr(xr, "load_datatree"):
            return xr.load_datatree(str(path))
        with xr.open_datatree(str(path)) as tree:
            return tree.load()
    with az.rc_context({"data.load": "eager"}):
        return az.from_netcdf(str(path))


# ----------------------------------------------------------------------------- sampling
def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Expected {name} to be an int >= 1, but got {value!r}.")


@torch.no_grad()
def _draw(network, x, y, num_draws):
    """One vectorised pass: site samples, predictive samples and pointwise log-likelihoods.

    :param x: ``(B, D)`` or ``(B, T, D)``. :param y: targets or ``None``.
    :returns: dict of arrays with a leading draw axis: each site ``(S, B, H, k[, T])``,
        ``"y"`` ``(S, B, ...)`` and, with ``y``, ``"log_lik"`` ``(S, B)``.
    """
    lead = (num_draws,) + tuple(x.shape[:-1])  # (S, B[, T])
    tail = () if network.likelihood.categorical else (network.config.out_features,)
    out = {}
    with pyro.plate(DRAWS_PLATE, num_draws, dim=-3):
        guide_trace = poutine.trace(network.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(network.model, trace=guide_trace)).get_trace(x)
    batch = x.shape[0]
    if network.deterministic:
        for site, (loc, _) in network.posteriors(x).items():
            out[site] = loc.expand((num_draws,) + loc.shape)  # (S, B, H, k[, T])
    else:
        for layer in network.layers:
            node = guide_trace.nodes[layer.site]
            shape = (num_draws, batch, layer.units) + tuple(node["fn"].event_shape)
            out[layer.site] = node["value"].reshape(shape)  # (S, B, H, k[, T])
    obs = model_trace.nodes["obs"]
    out["y"] = obs["value"].reshape(lead + tail)  # (S, B, [T,] [out])
    if y is not None:
        log_lik = obs["fn"].log_prob(y.unsqueeze(1))  # (S, B, 1)
        out["log_lik"] = log_lik.reshape(num_draws, batch)  # (S, B)
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


def _as_input(value, device):
    value = torch.as_tensor(value)
    if value.dtype == torch.float64 and torch.get_default_dtype() == torch.float32:
        value = value.float()
    return value.to(device)


@torch.no_grad()
def _prior_draws(network, num_draws, steps):
    """Per site ``(S, H, k[, T])`` draws from each unit's prior."""
    out = {}
    for layer in network.layers:
        fn = layer.prior((), steps)  # batch (H,), event (k,) or (k, T)
        out[layer.site] = fn.sample((num_draws,)).cpu().numpy()  # (S, H, k[, T])
    return out


def _to_jsonable(value):
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, str, numbers.Number)):
        return value
    return repr(value)


def _history_dataset(history):
    """The ``training`` group from a :class:`~vdn_pyro.inference.FitResult`."""
    import xarray as xr

    steps = np.asarray(history.logged_steps, dtype=np.int64)
    rows = history.history
    data = {
        "loss": ("step", np.array([r["loss"] for r in rows], dtype=np.float64)),
        "loss_per_obs": ("step", np.array([r["loss_per_obs"] for r in rows], dtype=np.float64)),
        "val_loss": ("step", np.array([r.get("val_loss", np.nan) for r in rows], dtype=np.float64)),
        "epoch": ("step", np.array([r["epoch"] for r in rows], dtype=np.int64)),
    }
    coords = {"step": steps}
    for site, values in history.unit_kl.items():
        values = np.asarray(values)  # (n_logged, H)
        data[f"{site}.kl"] = (("step", unit_dim(site)), values)
        coords[unit_dim(site)] = np.arange(values.shape[1])
    for site, values in history.unit_beta.items():
        values = np.asarray(values)  # (n_logged, H)
        data[f"{site}.beta"] = (("step", unit_dim(site)), values)
        coords[unit_dim(site)] = np.arange(values.shape[1])
    attrs = {
        "best_val_loss": float(history.best_val_loss),
        "best_step": int(history.best_step),
        "steps": int(history.steps),
        "seconds": float(history.seconds),
        "interrupted": int(getattr(history, "interrupted", False)),
        "stop_reason": str(getattr(history, "stop_reason", "completed")),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def to_inference_data(
    network, x, y=None, num_samples=200, chains=1, history=None, seed=None, *, coords=None, batch_size=None
):
    r"""Posterior, predictive, pointwise log-likelihood, prior, data and training history of a
    fitted :class:`~vdn_pyro.VDN`, as ArviZ data (see the module docstring for the groups).

    :param network: a :class:`~vdn_pyro.VDN` (distributional or ``deterministic=True``).
    :param torch.Tensor x: inputs ``(B, D)`` or ``(B, T, D)``: the observations to describe.
    :param y: targets matching ``x`` (see :class:`~vdn_pyro.VDN`), or ``None`` (then there is no
        ``log_likelihood`` or ``observed_data`` group).
    :param int num_samples: draws per chain.
    :param int chains: independent chains; S = ``chains * num_samples`` draws in all.
    :param history: a :class:`~vdn_pyro.inference.FitResult` for the ``training`` group.
    :param int seed: seed for the draws (the global random state is left as it was).
    :param dict coords: coordinate values overriding the defaults (integer ranges), e.g.
        ``{"obs": timestamps}``.
    :param int batch_size: draw for this many observations at a time (default: all at once;
        memory grows as S x B x sum of H x k x T).
    :returns: :class:`arviz.InferenceData` (arviz < 1) or :class:`xarray.DataTree` (arviz >= 1).

    >>> idata = to_inference_data(net, x_test, y_test, num_samples=100, chains=2)  # doctest: +SKIP
    >>> az.loo(idata)  # doctest: +SKIP
    """
    for name in ("layers", "likelihood", "model", "guide"):
        if not hasattr(network, name):
            raise TypeError(
                f"Expected a VDN (with .{name}), but got {type(network).__name__}. Build networks "
                "with vdn_pyro.VDN, or export custom models with arviz.from_pyro."
            )
    _check_count("num_samples", num_samples)
    _check_count("chains", chains)
    if batch_size is not None:
        _check_count("batch_size", batch_size)
    device = next(iter(network.parameters())).device
    x, y = _as_input(x, device), None if y is None else _as_input(y, device)
    network.check_inputs(x, y)
    temporal, num_draws, batch = x.dim() == 3, chains * num_samples, x.shape[0]
    latent_k = network.config.latent_dim

    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        chunk = batch_size or batch
        parts = []
        for start in range(0, batch, chunk):
            yb = None if y is None else y[start : start + chunk]
            parts.append(_draw(network, x[start : start + chunk], yb, num_draws))
        draws = {key: np.concatenate([p[key] for p in parts], axis=1) for key in parts[0]}
        steps = x.shape[1] if temporal else None
        priors = {} if network.deterministic else _prior_draws(network, num_draws, steps)

    def split(a):  # (S, ...) -> (chain, draw, ...)
        return a.reshape((chains, num_samples) + a.shape[1:])

    def latent(a, lead):  # drop the k axis (right after the unit axis) when k == 1
        return a.squeeze(lead + 1) if latent_k == 1 else a

    time_dims = ["time"] if temporal else []
    latent_dims = ["latent"] if latent_k > 1 else []
    site_dims, all_coords = {}, {"obs": np.arange(batch)}
    posterior, prior = {}, {}
    for layer in network.layers:
        site, units = layer.site, layer.units
        all_coords[unit_dim(site)] = np.arange(units)
        site_dims[site] = ["obs", unit_dim(site)] + latent_dims + time_dims
        posterior[site] = split(latent(draws[site], 2))  # (C, D, B, H[, k][, T])
        if site in priors:
            prior[site] = split(latent(priors[site], 1))  # (C, D, H[, k][, T])
    if temporal:
        all_coords["time"] = np.arange(x.shape[1])
    if latent_k > 1:
        all_coords["latent"] = np.arange(latent_k)
    y_dims = ["obs"] + time_dims + ([] if network.likelihood.categorical else ["output"])
    if not network.likelihood.categorical:
        all_coords["output"] = np.arange(network.config.out_features)
    all_coords["feature"] = np.arange(x.shape[-1])
    all_coords.update(coords or {})

    groups = {
        "posterior": posterior,
        "posterior_predictive": {"y": split(draws["y"])},  # (C, D, B, [T,] [out])
        "prior": prior,
        "constant_data": {"x": x.cpu().numpy()},  # (B, [T,] D)
    }
    dims = {
        "posterior": site_dims,
        "posterior_predictive": {"y": y_dims},
        "prior": {site: d[1:] for site, d in site_dims.items()},  # no obs dim
        "constant_data": {"x": ["obs"] + time_dims + ["feature"]},
    }
    if y is not None:
        log_lik = draws["log_lik"].astype(np.float64)  # (S, B)
        if network.deterministic:  # identical draws: PSIS needs them to differ (see module doc)
            log_lik = log_lik + TWIN_JITTER * np.linspace(-1.0, 1.0, num_draws)[:, None]
        groups["log_likelihood"] = {"y": split(log_lik)}  # (C, D, B)
        groups["observed_data"] = {"y": y.cpu().numpy()}  # (B, [T,] [out])
        dims["log_likelihood"], dims["observed_data"] = {"y": ["obs"]}, {"y": y_dims}
    info = {
        "inference_library": "vdn_pyro",
        "deterministic": int(network.deterministic),
        "sites": ",".join(layer.site for layer in network.layers),
        "num_samples": int(num_samples),
        "chains": int(chains),
    }
    config = getattr(network, "config", None)
    if config is not None and dataclasses.is_dataclass(config):
        fields = {f.name: _to_jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}
        info["config"] = json.dumps(fields)
    extra = {"training": _history_dataset(history)} if history is not None else {}
    return _from_dict(groups, dims=dims, coords=all_coords, attrs={"posterior": info}, extra=extra)
