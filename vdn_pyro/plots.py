r"""Plots of a fitted network, written as PNG files with matplotlib's Agg backend.

- :func:`plot_dashboard`: the living-neuron dashboard, one figure with the loss, each unit's KL
  over training as a heatmap, the count of units in each status over training, each unit's
  :math:`\overline{\mu^2}` (loc^2) against its band, its KL against the KL band, and its
  :math:`\beta`;
- :func:`plot_fan_chart`: a forecast fan chart (history, truth, median and central bands);
- :func:`plot_forest`: the ArviZ forest plot of the unit posteriors of one observation;
- :func:`plot_half_lives`: the units' learned half-lives against the forecast horizon;
- :func:`plot_sample_paths`: joint sample paths of several forecasts of one window, and the
  distribution of each forecast's horizon sum against what happened.

matplotlib is imported inside each function (with the Agg backend, so no display is needed),
and every function takes the output path and returns it. Axes of unit indices and unit counts
have whole-number ticks; a ``dpi`` that would make an image of more than :data:`MAX_PIXELS`
pixels is refused with a ``ValueError`` before anything is drawn to disk.
"""

from pathlib import Path

import numpy as np

from vdn_pyro.files import atomic_path

__all__ = [
    "MAX_PIXELS",
    "STATUS_COLORS",
    "plot_dashboard",
    "plot_fan_chart",
    "plot_forest",
    "plot_half_lives",
    "plot_sample_paths",
]

#: Colour of each unit status (see :data:`vdn_pyro.inference.STATUSES`).
STATUS_COLORS = {
    "living": "#2a9d8f",
    "drifting": "#e9c46a",
    "dead": "#8d99ae",
    "deterministic": "#6d597a",
    "exploding": "#e76f51",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: The most pixels a figure may have (about 0.4 GiB as RGBA): larger ones are refused up front
#: rather than failing inside the renderer with a MemoryError.
MAX_PIXELS = 10**8


def _save(fig, path, dpi):
    plt = _pyplot()
    path = Path(path)
    width, height = (float(v) * dpi for v in fig.get_size_inches())
    if not width * height <= MAX_PIXELS:
        plt.close(fig)
        raise ValueError(
            f"Expected a dpi that keeps the image of {path.name} under {MAX_PIXELS:.0e} pixels, but "
            f"dpi={dpi} gives {width:.0f} x {height:.0f} pixels; use a dpi of at most "
            f"{int((MAX_PIXELS / (width * height)) ** 0.5 * dpi)}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:  # a reader never sees a half-drawn image
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path


def _integer_ticks(axis):
    """Ticks at whole numbers only (unit indices and unit counts)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _positive(values, floor=1e-6):
    """Values clipped below at ``floor`` for a log axis (NaN kept)."""
    return np.where(np.isnan(values), np.nan, np.maximum(values, floor))


def _status_colors(statuses, count):
    if statuses is None:
        return [STATUS_COLORS["living"]] * count
    return [STATUS_COLORS.get(str(s), "black") for s in statuses]


def _legend(ax, **options):
    """A legend, only when something is labelled (matplotlib warns otherwise)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def _empty(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _band(ax, band, axis="y", label=None):
    if band is None:
        return
    span = ax.axhspan if axis == "y" else ax.axvspan
    span(band[0] if band[0] > 0 else 1e-6, band[1], color="tab:green", alpha=0.12, lw=0, label=label)


def plot_dashboard(
    path,
    steps,
    kl,
    beta=None,
    *,
    report=None,
    monitor=None,
    loss=None,
    kl_band=(0.05, 0.3),
    loc_band=(0.01, 1.0),
    living_kl=0.01,
    title=None,
    dpi=110,
):
    r"""The living-neuron dashboard of one neuron layer, as a PNG.

    Six panels: (a) the training loss per observation (and validation loss); (b) each unit's KL
    over training as a heatmap (log colour scale); (c) how many units are in each status over
    training (from ``monitor``; without one, a unit counts as living when its KL exceeds
    ``living_kl`` and as dead otherwise); (d) each unit's mean loc^2 against ``loc_band``;
    (e) each unit's KL against ``kl_band``; (f) each unit's :math:`\beta` over training (bars of
    the final values when it never moved). Bars and lines are coloured by each unit's final status
    (:data:`STATUS_COLORS`).

    :param path: the PNG file to write.
    :param steps: ``(S,)`` logged steps.
    :param kl: ``(S, U)`` per-unit KL at each logged step (nats per time step; per observation
        for static units).
    :param beta: ``(S, U)`` per-unit :math:`\beta` at each logged step, or ``None``.
    :param report: the final per-unit table (:func:`~vdn_pyro.inference.unit_report` rows of this
        layer; columns ``unit``, ``kl``, ``loc_sq``, ``status``), or ``None``.
    :param monitor: the per-unit tables recorded during training (the same columns plus
        ``step``), or ``None``.
    :param dict loss: ``{"step": (n,), "train": (n,), "val": (n,)}`` losses per observation,
        or ``None``.
    :param tuple kl_band: the KL band (nats per step), or ``None``.
    :param tuple loc_band: the loc^2 band, or ``None``.
    :param float living_kl: KL threshold of the fallback living/dead count.
    :param str title: figure title.
    :param int dpi: resolution.
    :returns: the :class:`pathlib.Path` written.
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    steps = np.asarray(steps, dtype=float)  # (S,)
    kl = np.asarray(kl, dtype=float)  # (S, U)
    if kl.ndim != 2 or kl.shape[0] != steps.shape[0]:
        raise ValueError(f"Expected kl of shape (len(steps), U) = ({steps.shape[0]}, U), got {kl.shape}.")
    units = kl.shape[1]
    statuses = None
    if report is not None and len(report):
        report = report.sort_values("unit")
        statuses = report["status"].to_numpy()
    colors = _status_colors(statuses, units)

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    (ax_loss, ax_heat, ax_status), (ax_loc, ax_kl, ax_beta) = axes

    # (a) loss
    if loss is not None and len(loss.get("step", ())):
        ax_loss.plot(loss["step"], loss["train"], color="black", lw=1, label="train")
        val = np.asarray(loss.get("val", []), dtype=float)
        if val.size and np.isfinite(val).any():
            keep = np.isfinite(val)
            ax_loss.plot(
                np.asarray(loss["step"])[keep],
                val[keep],
                "o-",
                color="tab:orange",
                ms=3,
                lw=1,
                label="validation",
            )
        _legend(ax_loss, fontsize=8)
    else:
        _empty(ax_loss, "no loss logged")
    ax_loss.set(title="(a) loss per observation (-ELBO / N)", xlabel="step")

    has_kl = kl.size > 0
    # (b) KL heatmap
    if has_kl:
        positive = kl[np.isfinite(kl) & (kl > 0)]
        low = max(float(positive.min()) if positive.size else 1e-4, 1e-4)
        high = max(float(positive.max()) if positive.size else 1.0, low * 10)
        extent = (steps[0], steps[-1] if steps.size > 1 else steps[0] + 1, -0.5, units - 0.5)
        image = ax_heat.imshow(
            _positive(kl.T, low),
            aspect="auto",
            origin="lower",
            extent=extent,
            cmap="viridis",
            norm=LogNorm(low, high),
            interpolation="nearest",
        )
        bar = fig.colorbar(image, ax=ax_heat, label="KL (nats per step)")
        if kl_band is not None:
            for edge in kl_band:
                if low <= edge <= high:
                    bar.ax.axhline(edge, color="white", lw=1.5)
    else:
        _empty(ax_heat, "no per-unit KL (no distributional units)")
    ax_heat.set(title="(b) KL per unit over training", xlabel="step", ylabel="unit")
    _integer_ticks(ax_heat.yaxis)

    # (c) status counts
    from vdn_pyro.inference.diagnostics import STATUSES

    if monitor is not None and len(monitor):
        counts = monitor.groupby(["step", "status"]).size().unstack(fill_value=0)
        order = [s for s in reversed(STATUSES) if s in counts.columns]
        ax_status.stackplot(
            counts.index.to_numpy(),
            *(counts[s].to_numpy() for s in order),
            labels=order,
            colors=[STATUS_COLORS[s] for s in order],
            alpha=0.9,
        )
        ax_status.set_title("(c) units per status (unit monitor)")
    elif has_kl:
        living = (kl > living_kl).sum(1)
        ax_status.stackplot(
            steps,
            living,
            units - living,
            labels=["living", "dead"],
            colors=[STATUS_COLORS["living"], STATUS_COLORS["dead"]],
            alpha=0.9,
        )
        ax_status.set_title(f"(c) units with KL > {living_kl:g} nats per step")
    else:
        _empty(ax_status, "no unit statuses")
    ax_status.set(xlabel="step", ylabel="units", ylim=(0, max(units, 1)))
    _integer_ticks(ax_status.yaxis)
    _legend(ax_status, fontsize=7, loc="lower left")

    index = np.arange(units)
    # (d) loc^2 against its band
    if report is not None and len(report):
        _band(ax_loc, loc_band, label="loc$^2$ band")
        ax_loc.bar(index, _positive(report["loc_sq"].to_numpy(dtype=float)), color=colors)
        ax_loc.set_yscale("log")
        _legend(ax_loc, fontsize=7)
    else:
        _empty(ax_loc, "no per-unit table")
    ax_loc.set(title="(d) mean loc$^2$ per unit against its band", xlabel="unit")
    _integer_ticks(ax_loc.xaxis)

    # (e) final KL against its band
    if report is not None and len(report) or has_kl:
        final_kl = report["kl"].to_numpy(dtype=float) if report is not None and len(report) else kl[-1]
        _band(ax_kl, kl_band, label="KL band")
        ax_kl.bar(index, _positive(final_kl), color=colors)
        ax_kl.set_yscale("log")
        _legend(ax_kl, fontsize=7)
    else:
        _empty(ax_kl, "no per-unit KL")
    ax_kl.set(title="(e) KL per unit (nats per step) against the band", xlabel="unit")
    _integer_ticks(ax_kl.xaxis)

    # (f) beta: its path over training when it moves (a KL thermostat), else the final values
    if beta is not None and np.size(beta):
        beta = _positive(np.asarray(beta, dtype=float), 1e-12)  # (S, U)
        if beta.shape[0] > 1 and not np.allclose(beta[0], beta[-1]):
            for unit in range(units):
                ax_beta.plot(steps[: beta.shape[0]], beta[:, unit], color=colors[unit], lw=0.8, alpha=0.8)
            ax_beta.set(title=r"(f) $\beta$ per unit over training", xlabel="step")
        else:
            ax_beta.bar(index, beta[-1], color=colors)
            ax_beta.set(title=r"(f) $\beta$ per unit", xlabel="unit")
            _integer_ticks(ax_beta.xaxis)
        ax_beta.set_yscale("log")
    else:
        _empty(ax_beta, "no beta logged")
        ax_beta.set_title(r"(f) $\beta$ per unit")

    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in STATUS_COLORS.values()]
    fig.legend(
        handles,
        list(STATUS_COLORS),
        loc="lower center",
        ncol=len(STATUS_COLORS),
        fontsize=8,
        title="status (bar colours)",
        title_fontsize=8,
        frameon=False,
    )
    fig.suptitle(title or "living-neuron dashboard")
    # fixed margins: tight_layout measures every tick label and takes seconds on this figure
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.14, top=0.9, wspace=0.3, hspace=0.38)
    return _save(fig, path, dpi)


def plot_fan_chart(
    path,
    history,
    truth,
    quantiles,
    *,
    title=None,
    xlabel="steps from the forecast origin",
    ylabel="value",
    dpi=110,
):
    """A forecast fan chart: history, truth, median and the central 50% and 90% bands.

    :param path: the PNG file to write.
    :param history: ``(L,)`` observed values up to the forecast origin.
    :param truth: ``(H,)`` what happened next (or ``None``).
    :param dict quantiles: level -> ``(H,)`` predictive quantiles; levels 0.05, 0.25, 0.5, 0.75
        and 0.95 are drawn when present.
    :param str title: figure title.
    :param str xlabel: x axis label.
    :param str ylabel: y axis label.
    :param int dpi: resolution.
    :returns: the :class:`pathlib.Path` written.
    """
    plt = _pyplot()
    history = np.asarray(history, dtype=float)
    horizon = len(next(iter(quantiles.values())))
    past = np.arange(-len(history) + 1, 1)
    future = np.arange(1, horizon + 1)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(past, history, color="black", lw=1.2, label="history")
    if truth is not None:
        ax.plot(future, np.asarray(truth, dtype=float), color="black", lw=1.2, ls="--", label="truth")
    for (lo, hi), alpha in (((0.05, 0.95), 0.2), ((0.25, 0.75), 0.4)):
        if lo in quantiles and hi in quantiles:
            band = f"{round(100 * (hi - lo))}% band"
            ax.fill_between(
                future, quantiles[lo], quantiles[hi], color="tab:blue", alpha=alpha, lw=0, label=band
            )
    if 0.5 in quantiles:
        ax.plot(future, quantiles[0.5], color="tab:blue", lw=1.5, label="median forecast")
    ax.axvline(0.5, color="grey", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title or "forecast")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_forest(path, idata, site="layers.0.z", *, obs=0, hdi_prob=0.94, dpi=110):
    """ArviZ forest plot of every unit's posterior for one observation.

    Under arviz < 1 this is ``az.plot_forest(idata, var_names=[site], coords={"obs": [obs]},
    combined=True)``; arviz >= 1 draws forests with another library, so there the same chart
    (posterior mean and central interval of each unit) is drawn with matplotlib.

    :param path: the PNG file to write.
    :param idata: the output of :func:`~vdn_pyro.inference.to_inference_data`.
    :param str site: the neuron site.
    :param int obs: which observation (window).
    :param float hdi_prob: width of the interval.
    :param int dpi: resolution.
    :returns: the :class:`pathlib.Path` written.
    """
    from vdn_pyro.inference import arviz as vdn_arviz

    plt = _pyplot()
    posterior = idata["posterior"][site].sel(obs=obs)  # (chain, draw, unit[, ...])
    extra = [d for d in posterior.dims if d not in ("chain", "draw")]
    count = int(np.prod([posterior.sizes[d] for d in extra])) if extra else 1
    height = max(3.0, 0.22 * count + 1.5)
    title = f"{site}: unit posteriors of window {obs} ({hdi_prob:.0%} HDI)"
    if vdn_arviz.arviz_major_version() < 1:
        az = vdn_arviz._arviz()
        axes = az.plot_forest(
            idata,
            var_names=[site],
            coords={"obs": [obs]},
            combined=True,
            hdi_prob=hdi_prob,
            figsize=(6, height),
        )
        fig = np.ravel(axes)[0].figure
        np.ravel(axes)[0].set_title(title, fontsize=9)
    else:  # pragma: no cover - exercised where arviz >= 1 is installed
        values = posterior.stack(sample=("chain", "draw")).transpose(..., "sample").values
        values = values.reshape(count, -1)  # (U, S)
        tail = (1 - hdi_prob) / 2
        lo, hi = np.quantile(values, [tail, 1 - tail], axis=1)
        fig, ax = plt.subplots(figsize=(6, height))
        rows = np.arange(count)[::-1]
        ax.hlines(rows, lo, hi, color="tab:blue", lw=2)
        ax.plot(values.mean(1), rows, "o", color="tab:blue", ms=3)
        ax.set_yticks(rows, [f"{site}[{i}]" for i in range(count)], fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_half_lives(path, half_lives, *, unit="steps", title=None, dpi=110):
    """Each unit's learned half-life against the forecast horizon: one column of points per
    horizon (every unit of every run), its median, and the line half-life = horizon.

    A unit above the line keeps more than half of its state over the whole horizon; one far below
    it forgets the look-back within a fraction of it.

    :param path: the PNG file to write.
    :param dict half_lives: horizon (a positive number, in ``unit``) -> sequence of half-lives
        (same unit; 0 for a unit without memory, ``inf`` allowed and drawn at the top).
    :param str unit: the time unit of both axes.
    :param str title: figure title.
    :param int dpi: resolution.
    :returns: the :class:`pathlib.Path` written.
    :raises ValueError: for an empty ``half_lives`` or a horizon that is not positive.
    """
    if not half_lives:
        raise ValueError("Expected half_lives to map at least one horizon to half-lives, but got none.")
    horizons = sorted(float(h) for h in half_lives)
    if horizons[0] <= 0:
        raise ValueError(f"Expected positive horizons, but got {horizons[0]}.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    rng = np.random.default_rng(0)  # horizontal jitter only, for legibility
    top = max(horizons) * 100
    for i, (horizon, values) in enumerate(sorted(half_lives.items(), key=lambda kv: float(kv[0]))):
        values = np.minimum(_positive(np.asarray(values, dtype=float), 1e-2), top)
        jitter = float(horizon) * np.exp(rng.uniform(-0.08, 0.08, size=values.shape))
        ax.scatter(jitter, values, s=9, alpha=0.35, color="tab:blue", lw=0, label="units" if i == 0 else None)
        if np.isfinite(values).any():
            median = np.nanmedian(values)
            ax.plot(
                [float(horizon) / 1.15, float(horizon) * 1.15],
                [median, median],
                color="black",
                lw=2,
                label="median" if i == 0 else None,
            )
    span = np.array([horizons[0] / 1.5, horizons[-1] * 1.5])
    ax.plot(span, span, color="tab:red", ls="--", lw=1, label="half-life = horizon")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(horizons)
    ax.set_xticklabels([f"{h:g}" for h in horizons])
    ax.minorticks_off()
    ax.set(
        xlabel=f"forecast horizon ({unit})",
        ylabel=f"unit half-life ({unit})",
        title=title or "learned memory of the units against the horizon",
    )
    _legend(ax, loc="upper left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_sample_paths(
    path,
    history,
    truth,
    samples,
    *,
    num_paths=5,
    context=None,
    title=None,
    xlabel="steps from the forecast origin",
    ylabel="value",
    dpi=110,
):
    """Joint sample paths of one window's forecasts, one column per forecast: on top, the
    history, what happened, the central 90% band of each step and ``num_paths`` whole sample
    paths; below, the histogram of the horizon sums of every sample path, with the central 90%
    interval of the sum and the sum that happened (the histograms share their bins, which span
    the central 99% of every forecast's sums; a sum beyond them is counted in the edge bin).

    A forecast whose paths move together has a wide sum distribution; one that draws its steps
    nearly independently has a narrow one around its mean, whatever its marginal bands say.

    :param path: the PNG file to write.
    :param history: ``(L,)`` observed values up to the forecast origin.
    :param truth: ``(H,)`` what happened next.
    :param dict samples: forecast label -> ``(S, H)`` joint sample paths (S >= 2).
    :param int num_paths: whole paths drawn per forecast (the first ones).
    :param int context: history steps drawn (default all).
    :param str title: figure title.
    :param str xlabel: x axis label.
    :param str ylabel: y axis label.
    :param int dpi: resolution.
    :returns: the :class:`pathlib.Path` written.
    :raises ValueError: for no forecasts, or samples that are not ``(S >= 2, H)`` with the
        length of ``truth``.
    """
    if not samples:
        raise ValueError("Expected samples to map at least one forecast label to its paths, but got none.")
    truth = np.asarray(truth, dtype=float)
    history = np.asarray(history, dtype=float)
    arrays = {}
    for label, paths in samples.items():
        paths = np.asarray(paths, dtype=float)
        if paths.ndim != 2 or paths.shape[0] < 2 or paths.shape[1] != truth.shape[-1]:
            raise ValueError(
                f"Expected the paths of {label!r} of shape (S >= 2, H={truth.shape[-1]}), but got "
                f"{paths.shape}; pass one window's joint sample paths."
            )
        arrays[label] = paths
    if context is not None:
        history = history[-int(context) :]
    plt = _pyplot()
    count = len(arrays)
    fig, axes = plt.subplots(
        2, count, figsize=(4.6 * count, 6.4), squeeze=False, gridspec_kw={"height_ratios": [3, 2]}
    )
    horizon = truth.shape[-1]
    past = np.arange(-len(history) + 1, 1)
    future = np.arange(1, horizon + 1)
    sums = {label: paths.sum(-1) for label, paths in arrays.items()}  # (S,) each
    # the histograms share bins over the central 99% of every forecast's sums and the truth's sum;
    # a sum beyond them is counted in the edge bin (heavy tails would otherwise squash the rest)
    low = min(min(np.quantile(v, 0.005) for v in sums.values()), truth.sum())
    high = max(max(np.quantile(v, 0.995) for v in sums.values()), truth.sum())
    bins = np.linspace(low, high, 41)
    top = axes[0, 0]
    for j, (label, paths) in enumerate(arrays.items()):
        ax = axes[0, j]
        if j:
            ax.sharey(top)
        ax.plot(past, history, color="black", lw=1.0, label="history")
        lo, hi = np.quantile(paths, [0.05, 0.95], axis=0)  # (H,) each
        ax.fill_between(future, lo, hi, color="tab:blue", alpha=0.18, lw=0, label="90% band of each step")
        for k in range(min(num_paths, paths.shape[0])):
            ax.plot(future, paths[k], lw=0.8, alpha=0.85, label="sample paths" if k == 0 else None)
        ax.plot(future, truth, color="black", lw=1.4, ls="--", label="what happened")
        ax.axvline(0.5, color="grey", lw=0.8)
        ax.set(xlabel=xlabel, ylabel=ylabel if j == 0 else None, title=label)
        if j == 0:
            _legend(ax, loc="upper left", fontsize=7)
        ax = axes[1, j]
        total = sums[label]
        lo, hi = np.quantile(total, [0.05, 0.95])
        ax.hist(np.clip(total, low, high), bins=bins, color="tab:blue", alpha=0.6)
        ax.axvspan(lo, hi, color="tab:blue", alpha=0.1, lw=0, label="central 90% of the sum")
        ax.axvline(truth.sum(), color="black", lw=1.6, ls="--", label="the sum that happened")
        ax.set(xlabel="sum over the horizon", ylabel="sample paths" if j == 0 else None)
        if j == 0:
            _legend(ax, loc="upper left", fontsize=7)
    fig.suptitle(title or "joint sample paths and the horizon sum")
    fig.tight_layout()
    return _save(fig, path, dpi)
