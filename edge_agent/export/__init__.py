"""`fedslim-agent export`: the command line over `pruning.export` (checkpoint → optional
channel pruning → verified ONNX + report)."""

from edge_agent.export.cli import export_main

__all__ = ["export_main"]
