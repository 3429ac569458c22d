r"""``JitLocalELBO``: the :class:`~vdn_pyro.inference.LocalELBO` step captured once and replayed.

Pyro builds every step anew in Python: effect handlers, sample sites, traces, distribution objects.
For a network of a few layers that bookkeeping costs as much as the arithmetic. This module runs
the step once under :func:`torch.fx.experimental.proxy_tensor.make_fx`, which records the tensor
operations it performs (Pyro's Python is executed, and disappears), and replays that graph on
every later call.

Two things make the replay correct where Pyro 1.9's ``JitTraceMeanField_ELBO`` is not:

- **Everything that changes is an input.** The parameters *and buffers* of the modules that run
  the model and the guide (any :class:`~pyro.nn.PyroModule` with
  :class:`~vdn_pyro.models.Neurons` layers as the model, its
  :class:`~vdn_pyro.guides.NeuronGuide` or another guide module) are passed to the graph on every
  call (through :func:`torch.func.functional_call`), as are all tensor arguments. A layer's
  ``beta`` buffer that a thermostat updates in place, or replaces, is read fresh each step
  instead of being frozen into the trace. Pyro's version passes only the global param store's
  entries, so buffers such as ``beta`` become constants of its trace (and with this library's
  module-local parameters it fails outright: it looks ``likelihood.raw_scale`` up in the empty
  store, a ``KeyError``).
- **It compiles once.** Graphs are cached under a key made of everything the capture depends on:
  the module, the model and guide functions, the shapes, dtypes and devices of the tensor
  arguments and of the module state, the values of the other arguments (``num_data``), the
  training and grad modes and the ELBO settings. Pyro's check looks for
  ``_loss_and_surrogate_loss`` but stores ``_differentiable_loss``, so it builds and traces a new
  function on every call (and its key ignores shapes).
  :attr:`JitLocalELBO.num_compilations` counts captures.

Random draws are operations in the graph (``normal_``), so each replay samples afresh, from the
same generator as eager code: with the same seed the JIT and eager losses agree to rounding.

A model whose Python control flow reads the values of its tensor arguments (an ``int()`` or
``bool()`` of them, e.g. :class:`~vdn_pyro.models.RecurrentVDN` trimming each batch's padding)
cannot be captured: :class:`JitLocalELBO` refuses it with a ``ValueError``; use the eager
:class:`~vdn_pyro.inference.LocalELBO` there.

What is *not* an input is a constant of the graph: Python numbers (the plate scale
``num_data / B``, ``scale_min``), hook settings and tensors that are neither parameters, buffers
nor arguments. Keep anything that changes between steps in a buffer, or call
:meth:`JitLocalELBO.reset` after changing it. Pyro's validation runs once per capture (when it is
enabled); the replayed graph does no data-dependent checks.
"""

import collections
import time
import warnings

import pyro
import torch
from torch import nn

from vdn_pyro.guides.builder import NeuronGuide
from vdn_pyro.inference.elbo import LocalELBO, UnitStats, _single_pass_verdict
from vdn_pyro.models.priors import no_prior_cache

__all__ = ["JitLocalELBO"]


def _owner(model, guide, module):
    """The module whose parameters and buffers the model and guide read.

    ``model`` is a :class:`torch.nn.Module` (``net.model`` of a
    :class:`~vdn_pyro.models.base.NeuronNetwork` is the network itself; a user's
    :class:`~pyro.nn.PyroModule`) or a method of one; ``guide`` is a method of the same module, a
    guide of it that holds no parameters of its own (:class:`~vdn_pyro.guides.NeuronGuide`), or
    any other module (an autoguide), whose state then joins the model's.
    """
    if module is not None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"Expected module to be a torch.nn.Module, but got {type(module).__name__}.")
        return module
    owner = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)
    if not isinstance(owner, nn.Module):
        raise TypeError(
            "JitLocalELBO passes the parameters and buffers of the modules that run the model and "
            "guide to the compiled graph, so it expects the model to be a torch.nn.Module (a "
            "PyroModule, e.g. net.model) or both to be methods of one torch.nn.Module, but got "
            f"{getattr(model, '__qualname__', type(model).__name__)} and "
            f"{getattr(guide, '__qualname__', type(guide).__name__)}. Pass module=... to "
            "JitLocalELBO to name it explicitly."
        )
    guide_owner = guide if isinstance(guide, nn.Module) else getattr(guide, "__self__", None)
    if not isinstance(guide_owner, nn.Module):
        raise TypeError(
            "JitLocalELBO passes the parameters and buffers of the modules that run the model and "
            "guide to the compiled graph, so it expects the guide to be a torch.nn.Module (e.g. "
            "net.guide, a NeuronGuide) or a method of the model's module, but got "
            f"{getattr(guide, '__qualname__', type(guide).__name__)}. Pass module=... to "
            "JitLocalELBO to name the module that holds their state."
        )
    if guide_owner is owner:
        return owner
    if not any(True for _ in guide_owner.parameters()) and not any(True for _ in guide_owner.buffers()):
        return owner  # e.g. a NeuronGuide: its parameters are the model's
    return owner, guide_owner


def _guide_key(guide):
    """What identifies a guide in the cache: a :class:`~vdn_pyro.guides.NeuronGuide` holds no
    state and runs its model, so any NeuronGuide of one model is the same guide."""
    if isinstance(guide, NeuronGuide):
        return (NeuronGuide, id(guide.model))
    return getattr(guide, "__func__", guide)


class _Pair(nn.Module):
    """The model's module and a guide module with state of its own, as one module."""

    def __init__(self, model, guide):
        super().__init__()
        self.model_module, self.guide_module = model, guide


def _static_key(value, where):
    """A hashable stand-in for a non-tensor argument (it becomes a constant of the graph)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_static_key(v, where) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple(sorted((k, _static_key(v, where)) for k, v in value.items()))
    if torch.is_tensor(value):
        raise TypeError(
            f"JitLocalELBO: argument {where} holds a tensor inside a container; pass tensors as "
            "top-level positional or keyword arguments so that they become graph inputs."
        )
    try:
        hash(value)
    except TypeError as e:
        raise TypeError(
            f"JitLocalELBO: argument {where} of type {type(value).__name__} is not a tensor and "
            "not hashable; non-tensor arguments key the compiled graph, so they must be hashable."
        ) from e
    return value


def _tensor_key(t):
    return (tuple(t.shape), t.dtype, t.device, t.requires_grad, t.layout)


class _Captured(nn.Module):
    """Holds the module (so :func:`torch.func.functional_call` can swap its state) and runs the
    eager ELBO on the arguments rebuilt from the flat tensor inputs."""

    def __init__(self, module, run, layout):
        super().__init__()
        self.module = module
        self._run = run
        self._layout = layout  # (num_args, kwarg names, {slot: static value})

    def forward(self, *tensors):
        num_args, names, static = self._layout
        values, it = [], iter(tensors)
        for slot in range(num_args + len(names)):
            values.append(static[slot] if slot in static else next(it))
        return self._run(tuple(values[:num_args]), dict(zip(names, values[num_args:])))


class _Entry:
    __slots__ = ("graph", "sites", "seconds")

    def __init__(self, graph, sites, seconds):
        self.graph, self.sites, self.seconds = graph, sites, seconds


class JitLocalELBO(LocalELBO):
    r""":class:`~vdn_pyro.inference.LocalELBO` whose step is captured into a graph once and
    replayed, with the module's parameters, buffers (per-unit ``beta``) and the tensor arguments
    as graph inputs. It is a drop-in replacement: same loss (to rounding, for the same random
    state), same per-unit statistics, usable with :func:`~vdn_pyro.inference.fit`.

    ``model`` is a :class:`torch.nn.Module` that contains :class:`~vdn_pyro.models.Neurons`
    layers (``net.model`` of any network, a user's :class:`~pyro.nn.PyroModule`) and ``guide``
    its :class:`~vdn_pyro.guides.NeuronGuide` (``net.guide``) or another guide module; or both
    are methods of one module; or the module is given as ``module``. Tensors must be passed as
    top-level arguments; every other argument (``num_data=N``) is part of the cache key. A guide
    with parameters of its own must have created them (run it once) before the first call.

    >>> from vdn_pyro import VDN
    >>> net = VDN(4, 1, units=(8,))
    >>> elbo = JitLocalELBO()
    >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
    >>> for _ in range(3):
    ...     loss, stats = elbo.loss_and_stats(net.model, net.guide, x, y, num_data=64)
    >>> elbo.num_compilations
    1

    :param backend: ``None`` (replay the captured graph; no compiler needed) or a
        :func:`torch.compile` backend such as ``"inductor"`` to compile the captured graph
        further (fuses elementwise operations; needs a C++ compiler and compiles for minutes).
        A compiler may draw random numbers its own way (inductor does unless
        ``torch._inductor.config.fallback_random`` is set), so the equality with the eager loss
        for a given seed holds for ``backend=None`` only.
    :param module: the module owning the parameters and buffers (default: the model's module,
        with the guide's if it holds state of its own).
    :param int max_graphs: cached graphs kept (least recently used dropped); a warning is
        issued when the cache overflows, which means the shapes keep changing.
    :param options: everything else is passed to :class:`~vdn_pyro.inference.LocalELBO`
        (``estimator``, ``num_particles``, ``hooks``, ...).

    :ivar int num_compilations: graphs captured so far.
    :ivar list compile_seconds: wall time of each capture.
    """

    def __init__(self, *args, backend=None, module=None, max_graphs=8, **options):
        super().__init__(*args, **options)
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"Expected module to be a torch.nn.Module, but got {type(module).__name__}.")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"Expected max_graphs to be an int >= 1, but got {max_graphs!r}.")
        self.backend, self.module, self.max_graphs = backend, module, max_graphs
        self.num_compilations = 0
        self.compile_seconds = []
        self._graphs = collections.OrderedDict()
        self._pairs = {}
        self._warned = False

    def reset(self):
        """Drop every captured graph (the next call captures again)."""
        self._graphs.clear()
        self._pairs.clear()

    def loss_and_stats(self, model, guide, *args, **kwargs):
        """Differentiable loss and per-unit statistics, from the captured graph.

        Shapes and meaning as :meth:`LocalELBO.loss_and_stats`: a scalar loss and a dict
        ``site -> UnitStats`` of ``(H,)`` tensors.
        """
        module = _owner(model, guide, self.module)
        if isinstance(module, tuple):  # model and guide modules, each with state: hold both
            pair = self._pairs.get(tuple(map(id, module)))
            if pair is None or (pair.model_module, pair.guide_module) != module:
                pair = self._pairs[tuple(map(id, module))] = _Pair(*module)
            module = pair
        state = [t for _, t in module.named_parameters()] + [t for _, t in module.named_buffers()]
        names = list(kwargs)
        values = list(args) + [kwargs[k] for k in names]
        static, tensors, arg_keys = {}, [], []
        for slot, value in enumerate(values):
            if torch.is_tensor(value):
                tensors.append(value)
                arg_keys.append(_tensor_key(value))
            else:
                where = f"#{slot}" if slot < len(args) else repr(names[slot - len(args)])
                static[slot] = value
                arg_keys.append(("static", _static_key(value, where)))
        key = (
            id(module),
            tuple(id(m) for m in module.modules()),
            getattr(model, "__func__", model),
            _guide_key(guide),
            len(args),
            tuple(names),
            tuple(arg_keys),
            tuple(_tensor_key(t) for t in state),
            tuple(m.training for m in module.modules()),
            torch.is_grad_enabled(),
            torch.get_default_dtype(),
            (self.estimator, self.num_particles, self.vectorize_particles, self.max_plate_nesting),
            tuple(id(h) for h in self.hooks),
            self.backend,
        )
        entry = self._graphs.get(key)
        if entry is None:
            layout = (len(args), names, static)
            entry = self._capture(module, model, guide, args, kwargs, layout, state, tensors)
            self._graphs[key] = entry
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"JitLocalELBO captured more than max_graphs={self.max_graphs} graphs; "
                        "the argument shapes or settings keep changing, so every step pays for "
                        "a capture. Use fixed shapes (e.g. drop the last partial batch) or the "
                        "eager LocalELBO.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        else:
            self._graphs.move_to_end(key)
        outputs = entry.graph(*state, *tensors)
        loss = outputs[0]
        stats = {site: UnitStats(*outputs[1 + 3 * i : 4 + 3 * i]) for i, site in enumerate(entry.sites)}
        self.last_stats = stats
        if not bool(torch.isfinite(loss.detach())):
            warnings.warn(f"Encountered non-finite loss {loss}", RuntimeWarning, stacklevel=2)
        return loss, stats

    def _capture(self, module, model, guide, args, kwargs, layout, state, tensors):
        from torch.fx.experimental.proxy_tensor import make_fx

        start = time.perf_counter()
        devices = sorted({t.device.index or 0 for t in state + tensors if t.device.type == "cuda"})
        if pyro.infer.is_validation_enabled() or _single_pass_verdict(model, guide) is None:
            # Pyro's and our checks once, eagerly, before they are left out of the graph; this
            # run also settles whether model and guide may run as one pass (what is captured)
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                LocalELBO._loss_and_stats(self, model, guide, args, kwargs)
        sites = []

        def run(call_args, call_kwargs):
            loss, stats = LocalELBO._loss_and_stats(self, model, guide, call_args, call_kwargs)
            if not torch.is_tensor(loss):  # no sample sites at all
                loss = torch.zeros((), device=state[0].device if state else None)
            sites[:] = list(stats)
            flat = [loss]
            for s in stats.values():
                flat += [s.kl, s.loc_sq, s.scale]
            return flat

        captured = _Captured(module, run, layout)
        prefixed = ["module." + n for n, _ in module.named_parameters()]
        prefixed += ["module." + n for n, _ in module.named_buffers()]

        def flat_fn(*inputs):
            swapped = dict(zip(prefixed, inputs[: len(prefixed)]))
            return torch.func.functional_call(captured, swapped, tuple(inputs[len(prefixed) :]))

        # the capture run draws random numbers: restore the state so the first real call draws
        # exactly what an eager step would
        # priors are built from the buffers inside the graph, never taken from a cache
        with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False), no_prior_cache():
            try:
                graph = make_fx(flat_fn, tracing_mode="real")(*state, *tensors)
            except RuntimeError as e:
                if "data-dependent" not in str(e):
                    raise
                raise ValueError(
                    "JitLocalELBO captures one graph of tensor operations and replays it, but the "
                    "model or guide reads the values of its tensor arguments in Python (an int(), "
                    "bool() or .item() on them: control flow that depends on the data, such as "
                    "RecurrentVDN trimming each batch's padding), which a replay cannot repeat. "
                    "Use the eager LocalELBO for this model, or move such checks behind "
                    "pyro.infer.is_validation_enabled() (the capture runs without validation)."
                ) from None
        # drop what no output reads (e.g. the guide's or model's values nothing downstream uses);
        # random and in-place operations count as used, so the draws stay those of eager code
        if graph.graph.eliminate_dead_code():
            graph.recompile()
        if self.backend is not None:
            graph = torch.compile(graph, backend=self.backend, dynamic=False)
        self.num_compilations += 1
        seconds = time.perf_counter() - start
        self.compile_seconds.append(seconds)
        return _Entry(graph, list(sites), seconds)
