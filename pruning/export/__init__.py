"""Structured-pruned ONNX export: checkpoints, export + verification, reports, int8.

Imports torch; the torch-free inference path is `edge_agent.infer`, the command line
`fedslim-agent export` (`edge_agent.export`).
"""

from pruning.export.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pruning.export.onnx_export import ExportError, ExportResult, export_onnx, make_session
from pruning.export.report import ExportReport, build_report, measure_interleaved

__all__ = [
    "CheckpointError",
    "ExportError",
    "ExportReport",
    "ExportResult",
    "build_report",
    "export_onnx",
    "load_checkpoint",
    "make_session",
    "measure_interleaved",
    "save_checkpoint",
]
