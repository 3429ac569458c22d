r"""``NeuronNetwork``: what every network built from :class:`~vdn_pyro.models.Neurons` shares.

A network writes its forward pass once (``forward(*args, **kwargs)``, the Pyro model) and gets,
from this base:

- :attr:`~NeuronNetwork.model`: the module itself (so :class:`~pyro.nn.PyroModule` registers every
  parameter under Pyro's default settings, and ``pyro.optim`` sees them all);
- :attr:`~NeuronNetwork.guide`: a :class:`~vdn_pyro.guides.NeuronGuide` of it, the same pass with
  the neurons sampling their amortized posteriors; empty for the deterministic twin;
- :attr:`~NeuronNetwork.neuron_layers`, :attr:`~NeuronNetwork.site_names` and
  :meth:`~NeuronNetwork.posteriors`, which the analysis tools read.
"""

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule

from vdn_pyro.guides.builder import NeuronGuide
from vdn_pyro.models.neurons import find_neurons, neuron_sites
from vdn_pyro.primitives import capture_posteriors, module_params, neuron_mode

__all__ = ["NeuronNetwork", "posteriors"]


@torch.no_grad()
def posteriors(network, *args, **kwargs):
    """Each neuron layer's posterior parameters along the mean path (every layer passes on its
    posterior mean; no sample site is recorded anywhere).

    :param network: any module whose neuron layers are :class:`~vdn_pyro.models.Neurons`; it is
        called as ``network.model(*args, **kwargs)`` if it has a ``model`` method, else
        ``network(*args, **kwargs)``.
    :returns: dict ``site -> (loc, scale)``, each ``(B, H, k)`` or ``(B, H, k, T)``.
    """
    call = getattr(network, "model", network)
    with neuron_mode("mean"), capture_posteriors() as record, module_params(), poutine.block():
        call(*args, **kwargs)
    return {site: (loc, scale) for site, (loc, scale, _) in record.items()}


class NeuronNetwork(PyroModule):
    """Base class of the networks built from :class:`~vdn_pyro.models.Neurons` layers.

    Subclasses define ``forward`` (the model) and a ``config`` dataclass with a
    ``deterministic`` field.
    """

    @property
    def deterministic(self):
        """Whether this is the deterministic twin (z = loc, no KL)."""
        return bool(getattr(self.config, "deterministic", False))

    @property
    def neuron_layers(self):
        """The :class:`~vdn_pyro.models.Neurons` layers, in order."""
        return find_neurons(self)

    @property
    def site_names(self):
        """The latent site names, one per neuron layer."""
        return neuron_sites(self)

    @property
    def model(self):
        """The model (Pyro's convention): the network itself, whose forward pass samples each
        neuron layer's prior. Being the module, it shows every parameter to ``pyro.optim`` (default
        settings) and to ``Trace_ELBO()(net.model, net.guide)`` (module-local parameters)."""
        return self

    @property
    def guide(self):
        """The guide: a :class:`~vdn_pyro.guides.NeuronGuide` of this network (the same forward
        pass, each neuron layer sampling its amortized posterior; empty for the twin). It holds no
        parameters of its own."""
        guide = self.__dict__.get("_neuron_guide")
        try:  # a copy (deepcopy, pickle) may carry a guide of the original, or a broken one
            current = guide is not None and guide.model is self
        except (AttributeError, TypeError, IndexError):
            current = False
        if not current:
            guide = NeuronGuide(self)
            self.__dict__["_neuron_guide"] = guide
        return guide

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_neuron_guide", None)  # rebuilt on first use
        return state

    def check_inputs(self, *args, **kwargs):
        """Subclass hook: raise ``TypeError``/``ValueError`` on unusable inputs."""

    def posteriors(self, *args, **kwargs):
        """Each layer's posterior ``(loc, scale)`` along the mean path; see :func:`posteriors`."""
        return posteriors(self, *args, **kwargs)

    def _predictive(self, sites, num_samples, *args, **kwargs):
        """``{site: (S, ...)}`` from :class:`pyro.infer.Predictive` over model and guide."""
        guide = None if self.deterministic else self.guide
        predictive = pyro.infer.Predictive(
            self.model, guide=guide, num_samples=num_samples, parallel=True, return_sites=sites
        )
        with module_params():
            return predictive(*args, **kwargs)
