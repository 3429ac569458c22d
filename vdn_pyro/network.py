"""Former home of :class:`~vdn_pyro.VDN`; it now lives in :mod:`vdn_pyro.models.vdn`. Kept so that
``from vdn_pyro.network import VDN`` goes on working."""

from vdn_pyro.models.vdn import POOLINGS, VDN, Prediction, VDNConfig

__all__ = ["POOLINGS", "Prediction", "VDN", "VDNConfig"]
