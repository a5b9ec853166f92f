"""The local federation runner: `fedslim-demo` (`sim.demo`) starts a real coordinator and
agent processes on 127.0.0.1 and runs a seeded federation; `sim.presets` names the
strategy + compression settings it and the benchmarks use; `sim.demo_export` turns the
final model into a verified ONNX file through `fedslim-agent export`.

The top layer: imports coordinator and edge_agent (by process), never imported by them.
"""
