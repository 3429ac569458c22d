r"""``LocalELBO``: the ELBO of a network of distributional neurons, with per-unit statistics.

Alongside the loss, every evaluation records for each neuron site (a site made by
:func:`~vdn_pyro.primitives.neurons`) and each unit i, from the same forward pass:

- ``kl``: the **unscaled** :math:`\mathrm{KL}(q(z_i \mid x) \,\|\, p(z_i))` in the library's one
  KL unit, **nats per time step** for a temporal site (the KL of the unit's latent over the T
  steps, divided by T) and **nats per observation** otherwise, averaged over the batch (and
  particles, and a layer's K draws): analytic for the mean-field estimator, a
  one-sample-per-particle Monte Carlo estimate for the ``"trace"`` estimator;
- ``loc_sq``: the mean of the posterior loc squared;
- ``scale``: the mean posterior scale.

A site's time steps are read from its event shape: a neuron site has event ``(k,)`` (static: the
unit's k latent dims) or ``(k, T)`` (temporal), so T is the product of the event dims after the
first. The loss itself is unchanged: it charges each unit's KL summed over its T steps; only what
is recorded (and what constraints steer, see :mod:`~vdn_pyro.inference.constraints`) is per step,
so that the same per-step information gets the same number whatever the length of the sequence.
"""

import contextlib
import dataclasses
import math
import warnings

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.elbo import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.poutine.broadcast_messenger import BroadcastMessenger
from pyro.util import check_model_guide_match, check_site_shape
from torch.distributions import kl_divergence

from vdn_pyro.guides.builder import NeuronGuide
from vdn_pyro.primitives import (
    NEURONS_INFER_KEY,
    NEURONS_REPORT_KEY,
    NEURONS_SAME_LAW_KEY,
    _mode_reads,
    _single_pass,
    capture_posteriors,
)

__all__ = ["ESTIMATORS", "LocalELBO", "UnitStats"]

ESTIMATORS = ("mean_field", "trace")


@dataclasses.dataclass
class UnitStats:
    """Per-unit statistics of one neuron site, each a detached tensor of shape ``(H,)``.

    :ivar kl: the unit's real (unscaled, untransformed: no ``transform_kl`` hook such as
        :class:`~vdn_pyro.inference.FreeBits` has touched it) KL, mean over the batch, in nats
        per time step for a temporal site (its KL over the T steps divided by T), nats per
        observation otherwise.
    :ivar loc_sq: mean of the posterior loc squared.
    :ivar scale: mean posterior scale.
    """

    kl: torch.Tensor
    loc_sq: torch.Tensor
    scale: torch.Tensor


def _per_unit_mean(value, unit_axis, transform=None):
    """Mean of ``transform(value)`` over every dim but ``unit_axis``: ``(..., H, ...) -> (H,)``.

    Broadcast (stride-0) dims are read once, since the mean over copies of a value is that value;
    the elementwise ``transform`` (e.g. a square) then runs on the compact view only.
    """
    index = tuple(
        slice(0, 1) if d != unit_axis and value.stride(d) == 0 else slice(None) for d in range(value.dim())
    )
    value = value[index]  # (..., H, ...) with broadcast dims of size 1
    if transform is not None:
        value = transform(value)
    dims = tuple(d for d in range(value.dim()) if d != unit_axis)
    return value.mean(dims) if dims else value  # (H,)


def _num_steps(fn):
    """Time steps T of a neuron site's distribution: the product of its event dims after the
    first (event ``(k,)`` -> 1, ``(k, T)`` -> T, no event dims -> 1)."""
    return math.prod(fn.event_shape[1:])


def _normal_base(fn):
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn


#: Where a :class:`~vdn_pyro.guides.NeuronGuide` keeps whether its model may run as one pass.
_VERDICT = "_vdn_single_pass"


def _single_pass_verdict(model, guide):
    """``None`` if ``guide`` is a :class:`~vdn_pyro.guides.NeuronGuide` of ``model`` (standing
    alone, not part of an ``AutoGuideList``) that has not been checked yet, ``True``/``False``
    once it has been (whether the model may run as model and guide in one pass), and ``False``
    for any other guide."""
    if type(guide) is not NeuronGuide or guide.model is not model or guide.master is not None:
        return False
    return guide.__dict__.get(_VERDICT)


def _set_single_pass_verdict(guide, verdict):
    guide.__dict__[_VERDICT] = bool(verdict)


def _can_single_pass(guide_trace, model_trace, layer_sites, reads):
    """From a two-pass evaluation: whether one pass would have computed the same. It would if no
    code but the layers read the neuron mode and every latent site, in both traces, is one that
    a :class:`~vdn_pyro.models.Neurons` layer sampled in the guide pass."""
    if _mode_reads() != reads:
        return False
    latent = [
        {name for name, site in trace.nodes.items() if site["type"] == "sample" and not site["is_observed"]}
        for trace in (
            poutine.util.prune_subsample_sites(guide_trace),
            poutine.util.prune_subsample_sites(model_trace),
        )
    ]
    return latent[0] == latent[1] and latent[0] <= set(layer_sites)


def _broadcast_like(fn, site):
    """``fn`` broadcast by the plates of ``site`` as Pyro's plates broadcast a sample site's
    distribution (:class:`~pyro.poutine.broadcast_messenger.BroadcastMessenger`)."""
    msg = {
        "type": "sample",
        "done": False,
        "fn": fn,
        "cond_indep_stack": site["cond_indep_stack"],
        "name": site["name"],
    }
    BroadcastMessenger._pyro_sample(msg)
    return msg["fn"]


def _plus(total, term):
    """``total + term``, where ``total`` may be ``None`` (nothing yet): the first term starts the
    sum, so the graph holds no Python 0.0 (a host-to-tensor copy, forward and backward)."""
    return term if total is None else total + term


def _minus(total, term):
    """``total - term``, where ``total`` may be ``None`` (nothing yet)."""
    return -term if total is None else total - term


class LocalELBO(ELBO):
    r"""ELBO for networks of distributional neurons that also reports per-unit statistics.

    With ``estimator="mean_field"`` (default) the KL of every latent site is analytic when a
    ``kl_divergence`` is registered (falling back to Monte Carlo otherwise), as in
    :class:`~pyro.infer.TraceMeanField_ELBO`; with ``"trace"`` the whole ELBO is the Monte Carlo
    estimate of :class:`~pyro.infer.Trace_ELBO`. Both equal the same objective in expectation.

    Each neuron site's KL enters the loss scaled by the site's scale (beta times any subsample
    factor N/B). ``hooks`` are objects that may define

    - ``transform_kl(site, kl)``: map the unscaled per-element KL ``(..., B, H)``, in nats per
      time step (a temporal site's KL over its T steps divided by T; see :class:`UnitStats`),
      before scaling; the loss charges T times what it returns (e.g. free bits);
    - ``penalty(site, guide_site, stats)``: return a scalar added to the loss.

    After each evaluation :attr:`last_stats` maps site names to :class:`UnitStats`.

    With the mean-field estimator and ``guide = NeuronGuide(model)`` (the guide is the model's own
    pass with each layer sampling its posterior), the model runs **once** per particle for both
    sides: each layer samples its posterior and records its prior, so the trunk and head run once
    and the same draws give the same loss and gradients as the two passes. The first evaluation
    of a model runs the two passes and checks that one would do (no code but the layers reads
    :func:`~vdn_pyro.primitives.current_neuron_mode`, every latent site is a layer's); any other
    guide, and any model that fails the check, keeps the two passes.

    Use it like any Pyro ELBO: ``SVI(model, guide, optim, LocalELBO())``,
    ``LocalELBO().differentiable_loss(model, guide, x, y)`` or ``LocalELBO()(model, guide)``.

    :param str estimator: ``"mean_field"`` or ``"trace"``.
    :param int num_particles: number of particles.
    :param bool vectorize_particles: evaluate particles in one vectorised pass.
    :param int max_plate_nesting: bound on nested plates (2 for :class:`~vdn_pyro.VDN`).
    :param hooks: sequence of hook objects (see above).
    """

    def __init__(
        self,
        estimator="mean_field",
        num_particles=1,
        vectorize_particles=True,
        max_plate_nesting=2,
        hooks=(),
        **kwargs,
    ):
        if estimator not in ESTIMATORS:
            raise ValueError(f"Expected estimator in {ESTIMATORS}, but got {estimator!r}.")
        super().__init__(
            num_particles=num_particles,
            vectorize_particles=vectorize_particles and num_particles > 1,
            max_plate_nesting=max_plate_nesting,
            **kwargs,
        )
        self.estimator = estimator
        self.hooks = list(hooks)
        self.last_stats = {}

    # ----------------------------------------------------------- tracing
    def _get_trace(self, model, guide, args, kwargs):
        if self.estimator == "trace":
            return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)
        verdict = _single_pass_verdict(model, guide)
        if verdict:
            traces = self._single_pass_traces(model, guide, args, kwargs)
            if traces is not None:
                return traces
        reads = _mode_reads()
        with contextlib.ExitStack() as stack:
            layer_sites = stack.enter_context(capture_posteriors()) if verdict is None else None
            guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
            if layer_sites is not None:
                stack.close()  # the layers' sites are those the guide pass recorded
            model_trace = poutine.trace(
                poutine.replay(model, trace=guide_trace), graph_type="flat"
            ).get_trace(*args, **kwargs)
        if verdict is None:
            _set_single_pass_verdict(guide, _can_single_pass(guide_trace, model_trace, layer_sites, reads))
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = poutine.util.prune_subsample_sites(guide_trace)
        model_trace = poutine.util.prune_subsample_sites(model_trace)
        return self._finish_traces(model_trace, guide_trace)

    def _finish_traces(self, model_trace, guide_trace):
        # the mean-field loss only needs log-probs of observed sites
        model_trace.compute_log_prob(site_filter=lambda name, site: site["is_observed"])
        if is_validation_enabled():
            for site in model_trace.nodes.values():
                if site["type"] == "sample" and site["is_observed"]:
                    check_site_shape(site, self.max_plate_nesting)
        return model_trace, guide_trace

    def _single_pass_traces(self, model, guide, args, kwargs):
        r"""Model and guide traces from **one** run of the model.

        With ``guide = NeuronGuide(model)`` the guide is the model's own pass with each layer
        sampling its posterior, and the model pass replays those values through the same
        computation. Here the model runs once (:func:`~vdn_pyro.primitives._single_pass`): each
        layer samples its posterior at its site and records its prior, and the model trace is
        that trace with each layer's site holding the prior (broadcast by the site's plates, as
        the model pass would). The loss is the same function of the same draws; the trunk and head
        run once instead of twice. Returns ``None`` (and the model is evaluated in two passes
        from then on) if the run shows anything the single pass cannot stand for: code other
        than a layer branching on :func:`~vdn_pyro.primitives.current_neuron_mode`, or a latent
        site no layer made.
        """
        reads = _mode_reads()
        with _single_pass() as priors:
            trace = poutine.trace(model, graph_type="flat").get_trace(*args, **kwargs)
        ok = _mode_reads() == reads
        trace = poutine.util.prune_subsample_sites(trace)
        model_trace = poutine.Trace(graph_type="flat")
        for name, site in trace.nodes.items():
            if not ok:
                break
            if site["type"] != "sample":
                continue
            if not site["is_observed"]:
                prior = priors.get(name)
                if prior is None:  # a latent site that no layer made
                    ok = False
                    break
                site = dict(site, fn=_broadcast_like(prior, site))
            model_trace.add_node(name, **site)
        if not ok:
            _set_single_pass_verdict(guide, False)
            return None
        return self._finish_traces(model_trace, trace)

    # ---------------------------------------------------------- the loss
    def _site_kl(self, name, model_site, guide_site):
        """Unscaled KL per element ``(..., B, H)`` and whether it is analytic."""
        if self.estimator == "mean_field":
            try:
                return kl_divergence(guide_site["fn"], model_site["fn"]), True
            except NotImplementedError:
                pass
        lq = guide_site.get("unscaled_log_prob")
        if lq is None:
            lq = guide_site["fn"].log_prob(guide_site["value"])
        lp = model_site.get("unscaled_log_prob")
        if lp is None:
            lp = model_site["fn"].log_prob(model_site["value"])
        return lq - lp, False

    @staticmethod
    def _check_reparameterized(guide_trace):
        """Refuse a latent guide site without ``rsample``: this ELBO has no score-function term, so
        its gradient would be silently wrong there (as :class:`~pyro.infer.TraceMeanField_ELBO`
        refuses it)."""
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site["fn"].has_rsample:
                continue
            raise ValueError(
                f"Expected every latent site of the guide to be reparameterised, but site '{name}' "
                f"draws from {type(site['fn']).__name__}, which has no rsample (has_rsample=False). "
                "LocalELBO differentiates through the samples and has no score-function term, so "
                "its gradient would be silently wrong. Use a reparameterisable distribution for "
                "that site (e.g. a Normal, or a relaxed version of a discrete one), or fit the "
                "model with pyro.infer.Trace_ELBO or TraceGraph_ELBO, which add the score-function "
                "term."
            )

    def _particle_loss(self, model_trace, guide_trace, stats):
        self._check_reparameterized(guide_trace)
        elbo = None
        if self.estimator == "trace":
            guide_trace.compute_log_prob()
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo = _plus(elbo, model_site["log_prob_sum"])
                continue
            guide_site = guide_trace.nodes[name]
            if guide_site["infer"].get(NEURONS_SAME_LAW_KEY, False):
                continue  # q is p: log p - log q is identically zero (value and gradient)
            is_neuron = guide_site["infer"].get(NEURONS_INFER_KEY, False)
            reported = is_neuron and guide_site["infer"].get(NEURONS_REPORT_KEY, True)
            if not is_neuron and self.estimator == "trace":
                elbo = _minus(_plus(elbo, model_site["log_prob_sum"]), guide_site["log_prob_sum"])
                continue
            kl, _ = self._site_kl(name, model_site, guide_site)  # (..., B, H)
            raw_kl = kl  # statistics report the real KL, not a hook's transform of it
            if reported:
                kl = self._transform_kl(name, kl, guide_site["fn"])
            scaled = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
            elbo = _minus(elbo, scaled.sum())
            if reported:
                self._record(name, raw_kl, guide_site, stats)
        for name, guide_site in guide_trace.nodes.items():
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                elbo = _minus(elbo, guide_site["fn"].log_prob(guide_site["value"]).sum())
        return -(0.0 if elbo is None else elbo)

    def _transform_kl(self, name, kl, fn):
        """Apply the hooks' ``transform_kl`` to the per-step KL ``(..., B, H)`` of a neuron site
        and return the term the loss charges (T times the result; the KL itself without hooks)."""
        hooks = [hook for hook in self.hooks if hasattr(hook, "transform_kl")]
        if not hooks:
            return kl
        steps = _num_steps(fn)
        kl = kl / steps if steps > 1 else kl  # (..., B, H) nats per step
        for hook in hooks:
            kl = hook.transform_kl(name, kl)
        return kl * steps if steps > 1 else kl  # (..., B, H) nats over the T steps

    def _record(self, name, kl, guide_site, stats):
        fn = guide_site["fn"]
        unit_axis = len(fn.batch_shape) - 1
        base = _normal_base(fn)
        steps = _num_steps(fn)
        with torch.no_grad():
            kl_u = _per_unit_mean(kl.detach(), kl.dim() - 1)  # (H,) nats over the T steps
            if steps > 1:
                kl_u = kl_u / steps  # (H,) nats per step
            if isinstance(base, torch.distributions.Normal):
                loc, scale, shape = base.loc, base.scale, base.batch_shape
            else:  # e.g. a Gauss-Markov path: its marginal moments
                loc, scale = fn.mean, fn.variance.sqrt()
                shape = fn.batch_shape + fn.event_shape
            loc_sq = _per_unit_mean(loc.detach().expand(shape), unit_axis, torch.square)
            scale_u = _per_unit_mean(scale.detach().expand(shape), unit_axis)
        entry = stats.setdefault(name, [])
        entry.append((kl_u, loc_sq, scale_u))

    def loss_and_stats(self, model, guide, *args, **kwargs):
        """Differentiable loss and per-unit statistics from one evaluation.

        :returns: ``(loss, stats)``: a scalar tensor (minus the ELBO, plus hook penalties) and a
            dict ``site -> UnitStats``.
        """
        loss, stats = self._loss_and_stats(model, guide, args, kwargs)
        self.last_stats = stats
        if not torch.is_tensor(loss) or not bool(torch.isfinite(loss.detach())):
            warnings.warn(f"Encountered non-finite loss {loss}", RuntimeWarning, stacklevel=2)
        return loss, stats

    def _loss_and_stats(self, model, guide, args, kwargs):
        """:meth:`loss_and_stats` without its host-side checks: only tensor operations that
        depend on the values, so that :class:`~vdn_pyro.inference.JitLocalELBO` can capture it."""
        loss, raw = 0.0, {}
        traces = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            particle = self._particle_loss(model_trace, guide_trace, raw)
            # one particle: the loss and statistics as they are (the mean of one value is it)
            loss = particle if self.num_particles == 1 else loss + particle / self.num_particles
            traces.append(guide_trace)
        stats = {
            name: UnitStats(
                *(parts[0] if len(parts) == 1 else torch.stack(parts).mean(0) for parts in zip(*entries))
            )
            for name, entries in raw.items()
        }
        for hook in self.hooks:
            if hasattr(hook, "penalty"):
                for name in stats:
                    loss = loss + hook.penalty(name, traces[-1].nodes[name], stats[name])
        return loss, stats

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """Minus the ELBO (plus penalties), differentiable. See :meth:`loss_and_stats`."""
        return self.loss_and_stats(model, guide, *args, **kwargs)[0]

    def loss(self, model, guide, *args, **kwargs):
        """Minus the ELBO as a float (no gradients)."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """Minus the ELBO as a float, after back-propagating it (for :class:`pyro.infer.SVI`)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())
