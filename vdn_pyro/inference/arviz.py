r"""ArviZ export: a fitted network of :class:`~vdn_pyro.models.Neurons` layers as
``InferenceData`` (the only module importing arviz).

The network is any module that contains ``Neurons`` layers (a user's
:class:`~pyro.nn.PyroModule`, :class:`~vdn_pyro.VDN`, :class:`~vdn_pyro.models.Forecaster`,
:class:`~vdn_pyro.models.RecurrentVDN`); the layers are found by walking its module tree.
:func:`to_inference_data` draws S = ``chains * num_samples`` samples of every neuron site from the
guide, vectorised under a ``pyro.plate`` over draws left of the model's own plates (dim -3 for
a model with a data plate and the units' plate), replays the model on them, and returns these
groups (dims in brackets; ``chain`` and ``draw`` lead every sampled variable):

- ``posterior``: one variable per layer, e.g. ``"layers.0.z"`` with dims
  ``(obs, <layer>.unit[, latent][, time])``. The amortized posterior is per observation, so each
  unit has one latent per row of ``x``. The unit dim is named per layer (``"layers.0.unit"``,
  see :func:`unit_dim`) because layers may differ in width; ``latent`` appears only when k > 1.
  A layer called once per step (sites ``"<site>.<t>"``) has its steps on the ``time`` dim. A
  deterministic layer (all of them in the twin) holds its point value z = loc, repeated over
  draws.
- ``posterior_predictive``: the model's observation sites (its sample sites that are neither
  neuron sites nor latent in the guide, whatever their names), sampled given each draw: one
  variable ``"y"`` when there is one such site (else one per site name), with dims
  ``(obs[, time][, output])``: ``obs`` is the data plate (other plates keep their names), then
  the event dims (``time`` where its size is the layers' T; no ``output`` for class labels);
- ``log_likelihood``: the same variable with dims ``(obs,)``: the pointwise
  :math:`\log p(y_n \mid z_n)` (float64), so that :func:`arviz.loo` and :func:`arviz.compare`
  work. It is there when ``y`` is given (the sites that ``model(*x, y)`` observes) or when the
  data come inside ``x`` (sites observed by the inputs themselves). The deterministic twin's
  draws are all equal, which PSIS cannot smooth (arviz >= 1 raises "All tail values are the
  same"); its log-likelihood gets a zero-mean ramp of :data:`TWIN_JITTER` nats over the draws,
  so that LOO runs and gives the in-sample ``elpd`` with ``p_loo`` about 0;
- ``prior``: per layer called once, S draws from each unit's prior, dims
  ``(<layer>.unit[, latent][, time])`` (absent for deterministic layers, and for layers called
  once per step, whose priors are conditional);
- ``observed_data``: the observed values, as in ``log_likelihood``; ``constant_data``: each
  tensor input (``"x"``, then ``"x1"``, ...) with dims ``(obs[, time], feature)``;
- ``training`` (when ``history`` is given): the fit history over dim ``step``: ``loss``,
  ``loss_per_obs``, ``val_loss`` (NaN where not validated), ``epoch``, and per layer
  ``"<site>.kl"`` and ``"<site>.beta"`` with dims ``(step, <layer>.unit)`` (the mean over steps
  for a layer called once per step); each ``"<site>.kl"`` is in the library's one KL unit, nats
  per time step for a temporal unit and nats per observation otherwise, as its ``units`` attr
  says (and the group's ``kl_units`` attr); the group's attrs also hold the best validation loss
  and step, the number of steps and the wall time.

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
from pyro.poutine.util import site_is_subsample

from vdn_pyro.guides.builder import NeuronGuide
from vdn_pyro.models.neurons import find_neurons, neuron_sites
from vdn_pyro.primitives import DATA_PLATE, NEURONS_INFER_KEY, capture_posteriors, module_params
from vdn_pyro.unit_status import KL_UNITS

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


def _as_args(x):
    if torch.is_tensor(x):
        return (x,)
    if isinstance(x, tuple) and x:
        return x
    raise TypeError(
        "to_inference_data: expected x to be a tensor (the model is called as model(x)) or a "
        f"non-empty tuple of the model's positional arguments (model(*x)), but got {type(x).__name__}."
    )


def _as_input(value, device):
    value = torch.as_tensor(value)
    if value.dtype == torch.float64 and torch.get_default_dtype() == torch.float32:
        value = value.float()
    return value.to(device)


def _sample_sites(trace):
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def _is_neuron_site(site):
    return bool((site.get("infer") or {}).get(NEURONS_INFER_KEY, False))


def _max_plate_nesting(sites):
    dims = [
        -frame.dim
        for site in sites.values()
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


def _batch_plates(site):
    """The plate name of each batch dim of a site (``None`` where there is none)."""
    num_batch = len(site["fn"].batch_shape)
    plates = {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None}
    return [plates.get(i - num_batch) for i in range(num_batch)]


def _by_step(names, layer):
    """A layer's site names in call order: ``"<site>"``, or ``"<site>.0", "<site>.1", ...``."""
    return sorted(names, key=lambda name: -1 if name == layer.site else int(name.rpartition(".")[2]))


def _event_shape(loc, layer):
    """``(k,)`` or ``(k, T)``: the trailing dims of a posterior loc ``(..., B, H, k[, T])``."""
    if loc.shape[-2] == layer.units and loc.shape[-1] == layer.latent_dim:
        return tuple(loc.shape[-1:])
    return tuple(loc.shape[-2:])


@dataclasses.dataclass
class _Observation:
    """One observation site of the model, from one pass under the draws plate.

    :ivar list plates: plate name of each batch dim kept after the draws (``""``: no plate).
    :ivar pred: ``(S, *batch, *event)`` posterior-predictive draws.
    :ivar log_lik: ``(S, B)`` pointwise log-likelihood (B = 1 without a data plate), or ``None``.
    :ivar observed: ``(*batch, *event)`` the observed value, or ``None``.
    """

    plates: list
    pred: torch.Tensor
    log_lik: object = None
    observed: object = None


def _observation(site, observed, draws_dim, num_draws):
    """Predictive draws, pointwise log-likelihood and observed value of one site."""
    fn = site["fn"]
    num_batch, plates = len(fn.batch_shape), _batch_plates(site)
    if site["is_observed"]:  # the data came with the inputs: draw their replicate
        value, observed = fn.sample(), site["value"]
    else:
        value = site["value"]
    value = value.expand(tuple(fn.batch_shape) + tuple(fn.event_shape))  # (*batch, *event)
    draws_axis = num_batch + draws_dim
    keep = [i for i in range(num_batch) if i == draws_axis or plates[i] is not None or value.shape[i] != 1]
    pred = value
    for i in reversed([i for i in range(num_batch) if i not in keep]):
        pred = pred.squeeze(i)  # drop a size-1 dim that is no plate
    pred = pred.movedim(keep.index(draws_axis), 0)  # (S, *kept batch, *event)
    out = _Observation([plates[i] or "" for i in keep if i != draws_axis], pred)
    if observed is None:
        return out
    log_lik = fn.log_prob(observed)  # batch
    log_lik = log_lik.reshape((1,) * (num_batch - log_lik.dim()) + tuple(log_lik.shape)).expand(
        fn.batch_shape
    )
    reduce = tuple(i for i in range(num_batch) if i != draws_axis and plates[i] != DATA_PLATE)
    if reduce:
        log_lik = log_lik.sum(reduce, keepdim=True)  # per draw and observation
    out.log_lik = log_lik.reshape(num_draws, -1)  # (S, B) or (S, 1)
    observed = observed.expand(tuple(fn.batch_shape)[draws_axis + 1 :] + tuple(fn.event_shape))
    if observed.numel() * num_draws == pred.numel():
        out.observed = observed.reshape(pred.shape[1:])  # (*kept batch, *event), like one draw
    return out


@torch.no_grad()
def _draw(model, guide, layers, args, y, num_draws):
    """One vectorised pass: each neuron layer's samples, and the predictive draws and pointwise
    log-likelihoods of the model's observation sites.

    The model is probed once for its plate nesting (the draws plate goes left of it) and, with
    ``y``, traced as ``model(*args, y)`` to find the sites that ``y`` observes. Then the guide
    and the model (replaying the guide) run as ``guide(*args)`` and ``model(*args)`` under a
    plate of S draws. Observation sites are the model's sample sites that are neither neuron
    sites nor latent in the guide.

    :returns: ``(posterior, observations, stepped)``: ``{layer site: (S, B, H, k[, T])}``
        (tensors), ``{site: _Observation}`` and the set of layers called once per step.
    """
    with poutine.block():
        probe = _sample_sites(poutine.trace(model).get_trace(*args))
        observed = {}
        if y is not None:
            for name, site in _sample_sites(poutine.trace(model).get_trace(*args, y)).items():
                if site["is_observed"] and not (name in probe and probe[name]["is_observed"]):
                    observed[name] = site["value"]
            if not observed:
                raise ValueError(
                    "Expected model(*x, y) to observe a sample site with y, but no site became "
                    "observed. Pass y as the model's next positional argument after x (as in "
                    "forward(x, y=None)), or put the targets into x as a tuple and leave y=None."
                )
        draws_dim = -(_max_plate_nesting(probe) + 1)
        with pyro.plate(DRAWS_PLATE, num_draws, dim=draws_dim):
            guide_trace = poutine.trace(guide).get_trace(*args)
            with capture_posteriors() as record:
                replayed = poutine.replay(model, trace=guide_trace)
                model_sites = _sample_sites(poutine.trace(replayed).get_trace(*args))
    guide_sites = _sample_sites(guide_trace)
    batch = next(a for a in args if torch.is_tensor(a)).shape[0]
    posterior, stepped = {}, set()
    for layer in layers:
        values = []
        sampled = _by_step([name for name in guide_sites if layer.owns(name)], layer)
        if len(sampled) > 1 or (sampled and sampled[0] != layer.site):
            stepped.add(layer.site)
        for name in sampled:
            event = tuple(guide_sites[name]["fn"].event_shape)
            values.append(guide_sites[name]["value"].reshape((num_draws, batch, layer.units) + event))
        if not sampled:  # a deterministic layer: its loc, the same for every draw
            for name in _by_step([name for name in record if layer.owns(name)], layer):
                loc = record[name][0]  # (..., B, H, k[, T])
                loc = loc.reshape((-1, batch, layer.units) + _event_shape(loc, layer))  # (S or 1, B, H, ..)
                values.append(loc.expand((num_draws,) + tuple(loc.shape[1:])))
        if values:
            posterior[layer.site] = (
                values[0] if len(values) == 1 else torch.stack(values, -1)
            )  # (S, B, H, k[, T])
    observations = {
        name: _observation(site, observed.get(name), draws_dim, num_draws)
        for name, site in model_sites.items()
        if name not in guide_sites and not _is_neuron_site(site)
    }
    return posterior, observations, stepped


@torch.no_grad()
def _prior_draws(layers, num_draws, steps):
    """Per layer called once, ``(S, H, k[, T])`` draws from each unit's prior (``steps[site]``:
    the layer's T, or ``None``). Layers called once per step have conditional priors: none."""
    out = {}
    for layer in layers:
        if layer.site in steps:
            fn = layer.prior_dist((), steps[layer.site])  # batch (H,), event (k,) or (k, T)
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


def _history_dataset(history, layers):
    """The ``training`` group from a :class:`~vdn_pyro.inference.FitResult`; the per-step sites
    of a layer called once per step are averaged into the layer's site."""
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
    for kind, per_site in (("kl", history.unit_kl), ("beta", history.unit_beta)):
        gathered = {}
        for site, values in per_site.items():
            values = np.asarray(values)  # (n_logged, H)
            owner = next((layer.site for layer in layers if layer.owns(site)), site)
            if values.ndim == 2 and values.shape[0] == len(steps):
                gathered.setdefault(owner, []).append(values)
        for site, parts in gathered.items():
            values = np.mean(parts, axis=0)  # (n_logged, H)
            attrs = {"units": KL_UNITS} if kind == "kl" else {}
            data[f"{site}.{kind}"] = (("step", unit_dim(site)), values, attrs)
            coords[unit_dim(site)] = np.arange(values.shape[1])
    attrs = {
        "best_val_loss": float(history.best_val_loss),
        "best_step": int(history.best_step),
        "steps": int(history.steps),
        "seconds": float(history.seconds),
        "interrupted": int(getattr(history, "interrupted", False)),
        "stop_reason": str(getattr(history, "stop_reason", "completed")),
        "kl_units": KL_UNITS,
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _shared_dim(base, sizes):
    """``{site: dim name}``: ``base`` when every site has the same size, else ``"<layer>.<base>"``."""
    shared = len(set(sizes.values())) <= 1
    return {site: base if shared else unit_dim(site)[: -len("unit")] + base for site in sizes}


def _trailing_dims(shape, time_len, last):
    """Names of trailing dims: ``time`` for a first dim of the layers' length T, then ``last``
    for one more dim, or ``last_0, last_1, ...`` for several."""
    names, rest = [], list(shape)
    if rest and rest[0] == time_len:
        names.append("time")
        rest = rest[1:]
    return names + ([last] if len(rest) == 1 else [f"{last}_{i}" for i in range(len(rest))])


def to_inference_data(
    network,
    x,
    y=None,
    num_samples=200,
    chains=1,
    history=None,
    seed=None,
    *,
    coords=None,
    batch_size=None,
    guide=None,
):
    r"""Posterior, predictive, pointwise log-likelihood, prior, data and training history of a
    fitted network, as ArviZ data (see the module docstring for the groups).

    The network is any module that contains :class:`~vdn_pyro.models.Neurons` layers: a user's
    :class:`~pyro.nn.PyroModule`, :class:`~vdn_pyro.VDN`, :class:`~vdn_pyro.models.Forecaster`,
    ... Its model is ``network.model`` if it has one, else the module itself; its guide is
    ``guide``, else ``network.guide``, else a :class:`~vdn_pyro.guides.NeuronGuide` of it.

    :param network: the network (distributional or the deterministic twin).
    :param x: the inputs, ``(B, ...)``: a tensor (the model is called as ``model(x)``) or a tuple
        of the model's positional arguments (``model(*x)``).
    :param y: targets, passed to the model as its next positional argument (``model(*x, y)``)
        to find the sites they observe; or ``None`` (then there is no ``log_likelihood`` or
        ``observed_data`` group, unless ``x`` itself holds observed data).
    :param int num_samples: draws per chain.
    :param int chains: independent chains; S = ``chains * num_samples`` draws in all.
    :param history: a :class:`~vdn_pyro.inference.FitResult` for the ``training`` group.
    :param int seed: seed for the draws (the global random state is left as it was).
    :param dict coords: coordinate values overriding the defaults (integer ranges), e.g.
        ``{"obs": timestamps}``.
    :param int batch_size: draw for this many observations at a time (default: all at once;
        memory grows as S x B x sum of H x k x T).
    :param guide: the guide (default: see above), e.g. an
        :class:`~pyro.infer.autoguide.AutoGuideList` for a model with other latent sites.
    :returns: :class:`arviz.InferenceData` (arviz < 1) or :class:`xarray.DataTree` (arviz >= 1).
    :raises TypeError: if the network contains no ``Neurons`` layer.

    >>> idata = to_inference_data(net, x_test, y_test, num_samples=100, chains=2)  # doctest: +SKIP
    >>> az.loo(idata)  # doctest: +SKIP
    """
    if not isinstance(network, torch.nn.Module) or not find_neurons(network):
        raise TypeError(
            "to_inference_data: expected a module that contains Neurons layers (a PyroModule of "
            f"your own, VDN, Forecaster, ...), but got {type(network).__name__}. Build the "
            "model's latent layers with vdn_pyro.models.Neurons, or export other Pyro models "
            "with arviz.from_pyro."
        )
    _check_count("num_samples", num_samples)
    _check_count("chains", chains)
    if batch_size is not None:
        _check_count("batch_size", batch_size)
    layers = find_neurons(network)
    neuron_sites(network)  # distinct site names
    twin = all(layer.deterministic for layer in layers)
    model = getattr(network, "model", network)
    if guide is None:
        guide = getattr(network, "guide", None)
        guide = NeuronGuide(network) if guide is None else guide
    param = next(iter(network.parameters()), None)
    device = torch.device("cpu") if param is None else param.device
    args = tuple(_as_input(a, device) if torch.is_tensor(a) else a for a in _as_args(x))
    y = None if y is None else _as_input(y, device)
    tensors = [a for a in args if torch.is_tensor(a) and a.dim() > 0]
    if not tensors:
        raise ValueError("to_inference_data: expected x to hold a tensor of shape (B, ...) (B observations).")
    num_draws, batch = chains * num_samples, tensors[0].shape[0]

    def rows(value, start, stop):  # one chunk of the observations
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
            return value[start:stop]
        return value

    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with rng, module_params():
        if seed is not None:
            torch.manual_seed(seed)
        chunk = batch_size or batch
        parts = []
        for start in range(0, batch, chunk):
            chunk_args = tuple(rows(a, start, start + chunk) for a in args)
            chunk_y = None if y is None else rows(y, start, start + chunk)
            parts.append(_draw(model, guide, layers, chunk_args, chunk_y, num_draws))
        posterior_t, observations, stepped = parts[0]
        steps = {site: value.shape[-1] if value.dim() == 5 else None for site, value in posterior_t.items()}
        prior_steps = {
            layer.site: steps[layer.site]
            for layer in layers
            if not layer.deterministic and layer.site in steps and layer.site not in stepped
        }
        priors = _prior_draws(layers, num_draws, prior_steps)

    def cat(values, axis):
        if len(values) > 1 and axis is None:
            raise ValueError(
                "to_inference_data: batch_size splits the observations, but an observed site has "
                "no data plate to split along; leave batch_size=None."
            )
        return values[0] if len(values) == 1 else np.concatenate(values, axis=axis)

    def split(a):  # (S, ...) -> (chain, draw, ...)
        return a.reshape((chains, num_samples) + a.shape[1:])

    times = {site: t for site, t in steps.items() if t is not None}
    time_len = next(iter(set(times.values()))) if len(set(times.values())) == 1 else None
    time_dims = _shared_dim("time", times)
    latents = {
        layer.site: layer.latent_dim for layer in layers if layer.latent_dim > 1 and layer.site in steps
    }
    latent_dims = _shared_dim("latent", latents)
    all_coords = {"obs": np.arange(batch)}
    posterior, prior, site_dims = {}, {}, {}
    for layer in layers:
        site = layer.site
        if site not in posterior_t:
            continue
        draws = cat([p[0][site].detach().cpu().numpy() for p in parts], 1)  # (S, B, H, k[, T])
        if layer.latent_dim == 1:
            draws = draws.squeeze(3)  # (S, B, H[, T])
        dims = [unit_dim(site)] + ([latent_dims[site]] if site in latents else [])
        dims += [time_dims[site]] if site in times else []
        site_dims[site] = ["obs"] + dims
        all_coords[unit_dim(site)] = np.arange(layer.units)
        if site in latents:
            all_coords[latent_dims[site]] = np.arange(layer.latent_dim)
        if site in times:
            all_coords[time_dims[site]] = np.arange(times[site])
        posterior[site] = split(draws)  # (C, D, B, H[, k][, T])
        if site in priors:
            value = priors[site]  # (S, H, k[, T])
            prior[site] = split(value.squeeze(2) if layer.latent_dim == 1 else value)  # (C, D, H[, k][, T])

    groups = {"posterior": posterior, "posterior_predictive": {}, "prior": prior}
    dims = {
        "posterior": site_dims,
        "posterior_predictive": {},
        "prior": {site: d[1:] for site, d in site_dims.items()},  # no obs dim
    }
    names = {site: ("y" if len(observations) == 1 else site) for site in observations}
    for site, first in observations.items():
        var = names[site]
        plate_dims = [
            "obs" if p == DATA_PLATE else (p or f"{var}_dim_{i}") for i, p in enumerate(first.plates)
        ]
        axis = plate_dims.index("obs") if "obs" in plate_dims else None
        pred = cat(
            [p[1][site].pred.detach().cpu().numpy() for p in parts], None if axis is None else axis + 1
        )
        event_rank = pred.ndim - 1 - len(plate_dims)
        var_dims = plate_dims + _trailing_dims(pred.shape[pred.ndim - event_rank :], time_len, "output")
        groups["posterior_predictive"][var] = split(pred)  # (C, D, *batch, *event)
        dims["posterior_predictive"][var] = var_dims
        if first.log_lik is not None:
            log_lik = cat([p[1][site].log_lik.detach().cpu().numpy() for p in parts], 1)  # (S, B)
            log_lik = log_lik.astype(np.float64)
            if twin:  # identical draws: PSIS needs them to differ (see the module docstring)
                log_lik = log_lik + TWIN_JITTER * np.linspace(-1.0, 1.0, num_draws)[:, None]
            groups.setdefault("log_likelihood", {})[var] = split(log_lik)  # (C, D, B)
            dims.setdefault("log_likelihood", {})[var] = ["obs" if axis is not None else f"{var}_obs"]
        if first.observed is not None:
            data = cat([p[1][site].observed.detach().cpu().numpy() for p in parts], axis)
            groups.setdefault("observed_data", {})[var] = data  # (*batch, *event)
            dims.setdefault("observed_data", {})[var] = var_dims
    constant, constant_dims = {}, {}
    for i, arg in enumerate(args):
        if torch.is_tensor(arg) and arg.dim() > 0 and arg.shape[0] == batch:
            name = "x" if not constant else f"x{i}"
            constant[name] = arg.cpu().numpy()  # (B, ...)
            constant_dims[name] = ["obs"] + _trailing_dims(arg.shape[1:], time_len, "feature")
    groups["constant_data"], dims["constant_data"] = constant, constant_dims
    for var, value in groups["posterior_predictive"].items():
        for name, size in zip(dims["posterior_predictive"][var], value.shape[2:]):
            all_coords.setdefault(name, np.arange(size))
    for var, value in constant.items():
        for name, size in zip(constant_dims[var], value.shape):
            all_coords.setdefault(name, np.arange(size))
    if time_len is not None:
        all_coords.setdefault("time", np.arange(time_len))
    all_coords.update(coords or {})
    info = {
        "inference_library": "vdn_pyro",
        "deterministic": int(twin),
        "sites": ",".join(layer.site for layer in layers),
        "num_samples": int(num_samples),
        "chains": int(chains),
    }
    config = getattr(network, "config", None)
    if config is not None and dataclasses.is_dataclass(config):
        fields = {f.name: _to_jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}
        info["config"] = json.dumps(fields)
    extra = {"training": _history_dataset(history, layers)} if history is not None else {}
    return _from_dict(groups, dims=dims, coords=all_coords, attrs={"posterior": info}, extra=extra)
