"""Inference: the local ELBO, fitting, local constraints, diagnostics, checkpoints and ArviZ export."""

from vdn_pyro.inference.arviz import load_inference_data, save_inference_data, to_inference_data, unit_dim
from vdn_pyro.inference.checkpoint import (
    LAST_CHECKPOINT,
    CheckpointError,
    CorruptCheckpointError,
    ForeignCheckpointError,
    IncompatibleCheckpointError,
    load_checkpoint,
    load_network,
    save_checkpoint,
)
from vdn_pyro.inference.constraints import (
    Constraint,
    FreeBits,
    KLBand,
    LocBand,
    Persistence,
    ScaleGuard,
    layer_stats,
)
from vdn_pyro.inference.diagnostics import (
    STATUSES,
    StatusThresholds,
    UnitMonitor,
    classify_units,
    layer_summary,
    mutual_information,
    unit_kl,
    unit_report,
)
from vdn_pyro.inference.distributed import (
    DistributedContext,
    DistributedLocalELBO,
    ELBOModule,
    distributed_fit,
    init_distributed,
    launch,
)
from vdn_pyro.inference.elbo import ESTIMATORS, LocalELBO, UnitStats
from vdn_pyro.inference.fit import LOG_COLUMNS, FitResult, FitState, NonFiniteError, evaluate_loss, fit
from vdn_pyro.inference.jit import JitLocalELBO

__all__ = [
    "CheckpointError",
    "Constraint",
    "CorruptCheckpointError",
    "DistributedContext",
    "DistributedLocalELBO",
    "ELBOModule",
    "ESTIMATORS",
    "FitResult",
    "FitState",
    "ForeignCheckpointError",
    "FreeBits",
    "IncompatibleCheckpointError",
    "JitLocalELBO",
    "KLBand",
    "LAST_CHECKPOINT",
    "LOG_COLUMNS",
    "LocBand",
    "LocalELBO",
    "NonFiniteError",
    "Persistence",
    "STATUSES",
    "ScaleGuard",
    "StatusThresholds",
    "UnitMonitor",
    "UnitStats",
    "classify_units",
    "distributed_fit",
    "evaluate_loss",
    "fit",
    "init_distributed",
    "launch",
    "layer_stats",
    "layer_summary",
    "load_checkpoint",
    "load_inference_data",
    "load_network",
    "mutual_information",
    "save_checkpoint",
    "save_inference_data",
    "to_inference_data",
    "unit_dim",
    "unit_kl",
    "unit_report",
]
