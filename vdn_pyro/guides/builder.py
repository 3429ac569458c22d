r"""``NeuronGuide``: the guide of any Pyro model built with :class:`~vdn_pyro.models.Neurons`.

The guide is the model's own forward pass with every neuron layer switched to its amortized
posterior (:func:`~vdn_pyro.primitives.neuron_mode` ``"guide"``). Only the neuron sites (and
parameters) are exposed; the model's other sample sites, observations included, are blocked. So
the user writes the forward pass once and ``SVI(model, NeuronGuide(model), optim, elbo)`` trains
it with any Pyro ELBO.

Other latent sites of the model are for Pyro's autoguides: compose them with
:class:`~pyro.infer.autoguide.AutoGuideList`::

    guide = AutoGuideList(net)
    guide.append(NeuronGuide(poutine.block(net, hide=["w"])))
    guide.append(AutoNormal(poutine.block(net, expose=["w"])))

Inside the guide's pass such a site takes a draw from its prior (its guide value is not seen by
the neuron heads), so put neuron layers upstream of, or beside, other latents. A plate with random
subsampling (``pyro.plate(..., subsample_size=b)``) is replayed from the guide on its own; inside
an ``AutoGuideList`` pass explicit indices (``subsample=...``, as
:func:`~vdn_pyro.primitives.data_plate` does) so that every part reads the same rows.
"""

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.subsample_messenger import _Subsample

from vdn_pyro.primitives import NEURONS_INFER_KEY, capture_posteriors, neuron_mode

__all__ = ["NeuronGuide", "run_as_guide"]


def _is_neuron_site(msg):
    return msg["type"] == "sample" and bool((msg.get("infer") or {}).get(NEURONS_INFER_KEY, False))


def _is_subsample_site(msg):
    return msg["type"] == "sample" and isinstance(msg.get("fn"), _Subsample)


def _expose(msg):
    return msg["type"] == "param" or _is_neuron_site(msg)


def _expose_with_subsamples(msg):
    return _expose(msg) or _is_subsample_site(msg)


def run_as_guide(model, *args, subsample_sites=True, **kwargs):
    """Run ``model`` as its own guide: neuron layers sample their posteriors; every sample site
    but theirs is blocked.

    :param bool subsample_sites: also expose the random subsample sites of the model's plates
        (``pyro.plate(..., subsample_size=b)``), so that the model, replayed against the guide,
        reads the same rows.
    :returns: ``{site: value}`` of the neuron sites.
    """
    expose = _expose_with_subsamples if subsample_sites else _expose
    with neuron_mode("guide"):
        try:
            trace = poutine.trace(poutine.block(model, expose_fn=expose)).get_trace(*args, **kwargs)
        except RuntimeError as error:
            if "Multiple sample sites named" not in str(error):
                raise
            raise ValueError(
                f"{str(error).splitlines()[0]}: two sample sites of the model share a name. A Neurons "
                "layer is named after its place in the tree of PyroModules, and inside a plain "
                "nn.ModuleList or nn.Sequential that path is lost. Hold the layers in "
                "PyroModule[nn.ModuleList] (or PyroModule[nn.Sequential]), or pass name=... to each "
                "layer."
            ) from error
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and _is_neuron_site(site)
    }


class NeuronGuide(AutoGuide):
    """The amortized guide of a model that contains :class:`~vdn_pyro.models.Neurons` layers.

    It has no parameters of its own (the posterior heads belong to the model's layers), so the
    model's parameters are all an optimiser needs, in both of Pyro's parameter modes.

    :param callable model: the Pyro model (typically a :class:`~pyro.nn.PyroModule`), called with
        the same arguments as the guide.

    >>> import torch, pyro
    >>> import pyro.distributions as dist
    >>> from pyro.nn import PyroModule
    >>> from vdn_pyro.models import Neurons
    >>> from vdn_pyro.primitives import data_plate
    >>> class Net(PyroModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.hidden = Neurons(3, 4, beta=0.5)
    ...         self.head = torch.nn.Linear(4, 1)
    ...     def forward(self, x, y=None):
    ...         with data_plate(x.shape[0]):
    ...             z = self.hidden(x)
    ...             loc = self.head(z).unsqueeze(-2)  # (B, 1, 1): observations at dim -2
    ...             obs = None if y is None else y.unsqueeze(-2)
    ...             return pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=obs)
    >>> net = Net()
    >>> guide = NeuronGuide(net)
    >>> sorted(guide(torch.randn(2, 3)))
    ['hidden.z']
    """

    def forward(self, *args, **kwargs):
        """Sample every neuron site from its amortized posterior.

        :returns: ``{site: value}`` (empty for a deterministic twin, which is not run).
        """
        if getattr(self.model, "deterministic", False) is True:
            return {}
        # inside an AutoGuideList the list's own plates own the subsample sites
        return run_as_guide(self.model, *args, subsample_sites=self.master is None, **kwargs)

    def _loc(self, *args, **kwargs):
        with neuron_mode("mean"), capture_posteriors() as record, poutine.block():
            self.model(*args, **kwargs)
        return {site: loc for site, (loc, _, _) in record.items()}

    def median(self, *args, **kwargs):
        """The posterior median (= mean, the posteriors are Normal) of each neuron site, along the
        path where every layer passes on its mean.

        :returns: ``{site: loc}``, each shaped like the site's value.
        """
        return self._loc(*args, **kwargs)

    def quantiles(self, quantiles, *args, **kwargs):
        """Posterior quantiles of each neuron site along the mean path.

        :param quantiles: levels in (0, 1).
        :returns: ``{site: tensor}``, each with a leading dim of ``len(quantiles)``.
        """
        with neuron_mode("mean"), capture_posteriors() as record, poutine.block():
            self.model(*args, **kwargs)
        levels = torch.as_tensor(quantiles, dtype=torch.get_default_dtype())
        out = {}
        for site, (loc, scale, _) in record.items():
            z = torch.special.ndtri(levels.to(loc.dtype)).reshape((-1,) + (1,) * loc.dim())
            out[site] = loc + z * scale  # (Q, ..., B, H, k[, T])
        return out
