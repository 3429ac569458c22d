r"""Sliding look-back/horizon windows over a multichannel time series.

A window is ``lookback + horizon`` consecutive rows of a series of shape
``(N, C)``: the first ``lookback`` rows are the input ``x`` and the next
``horizon`` rows the target ``y``. Window ``w`` starts at row ``w * stride``;
every window that fits is returned, none is dropped, so there are

.. math:: W = \left\lfloor \frac{N - L - H}{\mathrm{stride}} \right\rfloor + 1

windows for ``N`` rows, look-back ``L`` and horizon ``H``.
"""

import numbers

import numpy as np
import torch

__all__ = ["sliding_windows", "window_chunks"]


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Expected {name} to be a positive int but got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"Expected {name} > 0 but got {name}={value}")
    return int(value)


def _as_series(series):
    """Convert ``series`` to a finite float32 tensor of shape ``(N, C)``."""
    if isinstance(series, torch.Tensor):
        tensor = series.detach()
    else:
        array = np.asarray(series)
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise TypeError(
                f"Expected a numeric array-like series but got dtype {array.dtype}; "
                "convert the values to float first"
            )
        if not array.flags.writeable:  # e.g. pandas copy-on-write views; torch warns on them
            array = array.copy()
        tensor = torch.as_tensor(array)
    if tensor.dim() != 2:
        hint = " (for a univariate series use series.reshape(-1, 1))" if tensor.dim() == 1 else ""
        raise ValueError(
            f"Expected series of shape (N, C) with 2 dims but got shape {tuple(tensor.shape)}{hint}"
        )
    tensor = tensor.to(torch.float32)  # (N, C)
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        row, col = (int(i) for i in bad[0])
        raise ValueError(
            f"Expected a finite series but found {bad.shape[0]} NaN/inf values "
            f"(first at row {row}, column {col}); fill or drop them first, "
            "e.g. load_csv(..., fill='interpolate')"
        )
    return tensor


def _check_length(num_rows, span, what):
    if num_rows < span:
        raise ValueError(
            f"Series has {num_rows} rows but {what} needs at least {span} rows; "
            "shorten lookback/horizon or pass a longer series"
        )


def sliding_windows(series, lookback, horizon, stride=1, channel_independent=True):
    r"""
    Cut a series into every look-back/horizon window, ``stride`` rows apart.

    With ``channel_independent=True`` each channel of each window becomes its
    own row, ordered window-major then channel: row ``w * C + c`` holds channel
    ``c`` of window ``w``. This is the layout of channel-independent forecasters
    that share one univariate model across channels.

    >>> series = torch.arange(12.0).reshape(6, 2)  # N=6 rows, C=2 channels
    >>> x, y = sliding_windows(series, lookback=3, horizon=2)  # W = 2 windows
    >>> x.shape, y.shape
    (torch.Size([4, 3]), torch.Size([4, 2]))
    >>> x[1], y[1]  # window 0, channel 1
    (tensor([1., 3., 5.]), tensor([7., 9.]))

    :param series: values of shape ``(N, C)`` (numpy array or tensor), finite.
    :param int lookback: input length :math:`L > 0`.
    :param int horizon: target length :math:`H > 0`.
    :param int stride: rows between consecutive window starts (default 1: every window).
    :param bool channel_independent: flatten channels into the batch (default) or keep them last.
    :returns: float32 tensors ``(x, y)``: shapes ``(W * C, L)`` and ``(W * C, H)`` when
        channel-independent, else ``(W, L, C)`` and ``(W, H, C)``, with
        :math:`W = \lfloor (N - L - H) / \mathrm{stride} \rfloor + 1`.
    :rtype: tuple(torch.Tensor, torch.Tensor)
    :raises ValueError: for non-positive sizes, a series that is not 2-D, shorter
        than ``L + H`` rows, or not finite.
    """
    lookback = _check_positive_int(lookback, "lookback")
    horizon = _check_positive_int(horizon, "horizon")
    stride = _check_positive_int(stride, "stride")
    values = _as_series(series)  # (N, C)
    _check_length(values.shape[0], lookback + horizon, f"lookback + horizon = {lookback} + {horizon}")
    windows = values.unfold(0, lookback + horizon, stride)  # (W, C, L + H)
    if channel_independent:
        windows = windows.reshape(-1, lookback + horizon)  # (W * C, L + H)
    else:
        windows = windows.transpose(1, 2)  # (W, L + H, C)
    x = windows[:, :lookback].contiguous()  # (W * C, L) or (W, L, C)
    y = windows[:, lookback:].contiguous()  # (W * C, H) or (W, H, C)
    return x, y


def window_chunks(
    series,
    lookback,
    horizon,
    num_windows,
    window_stride,
    chunk_stride=None,
    channel_independent=True,
):
    r"""
    Cut a series into chunks of ``T = num_windows`` consecutive windows.

    A chunk is one training item for models with a time axis over windows:
    window ``t`` of chunk ``i`` starts at row ``i * chunk_stride + t * window_stride``.
    Chunks start ``chunk_stride`` rows apart, by default ``num_windows * window_stride``,
    so consecutive chunks tile the window sequence without overlap. Every chunk that
    fits is returned, so there are

    .. math:: N_\mathrm{items} = \left\lfloor
        \frac{N - (T - 1)\,\mathrm{window\_stride} - L - H}{\mathrm{chunk\_stride}}
        \right\rfloor + 1

    chunks (times ``C`` rows when channel-independent, ordered chunk-major then
    channel as in :func:`sliding_windows`). With ``T = 1`` (and the default
    ``chunk_stride``) the result equals
    ``sliding_windows(series, L, H, stride=window_stride)`` with a singleton time axis.

    :param series: values of shape ``(N, C)`` (numpy array or tensor), finite.
    :param int lookback: input length :math:`L > 0`.
    :param int horizon: target length :math:`H > 0`.
    :param int num_windows: windows per chunk :math:`T > 0`.
    :param int window_stride: rows between window starts inside a chunk.
    :param int chunk_stride: rows between chunk starts (default ``T * window_stride``).
    :param bool channel_independent: flatten channels into the batch (default) or keep them last.
    :returns: float32 tensors ``(x, y)``: shapes ``(N_items * C, T, L)`` and
        ``(N_items * C, T, H)`` when channel-independent, else ``(N_items, T, L, C)``
        and ``(N_items, T, H, C)``.
    :rtype: tuple(torch.Tensor, torch.Tensor)
    :raises ValueError: as :func:`sliding_windows`, with the chunk span in place of ``L + H``.
    """
    lookback = _check_positive_int(lookback, "lookback")
    horizon = _check_positive_int(horizon, "horizon")
    num_windows = _check_positive_int(num_windows, "num_windows")
    window_stride = _check_positive_int(window_stride, "window_stride")
    if chunk_stride is None:
        chunk_stride = num_windows * window_stride
    chunk_stride = _check_positive_int(chunk_stride, "chunk_stride")
    values = _as_series(series)  # (N, C)
    span = (num_windows - 1) * window_stride + lookback + horizon
    _check_length(
        values.shape[0],
        span,
        f"a chunk of (num_windows - 1) * window_stride + lookback + horizon = "
        f"({num_windows} - 1) * {window_stride} + {lookback} + {horizon}",
    )
    windows = values.unfold(0, lookback + horizon, 1)  # (N - L - H + 1, C, L + H), a view
    num_items = (values.shape[0] - span) // chunk_stride + 1
    starts = torch.arange(num_items) * chunk_stride  # (N_items,)
    offsets = torch.arange(num_windows) * window_stride  # (T,)
    chunks = windows[starts[:, None] + offsets]  # (N_items, T, C, L + H)
    if channel_independent:
        chunks = chunks.transpose(1, 2).reshape(-1, num_windows, lookback + horizon)
        # (N_items * C, T, L + H)
        x = chunks[..., :lookback].contiguous()  # (N_items * C, T, L)
        y = chunks[..., lookback:].contiguous()  # (N_items * C, T, H)
    else:
        chunks = chunks.transpose(2, 3)  # (N_items, T, L + H, C)
        x = chunks[:, :, :lookback].contiguous()  # (N_items, T, L, C)
        y = chunks[:, :, lookback:].contiguous()  # (N_items, T, H, C)
    return x, y
