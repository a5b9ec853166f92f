"""Draw docs/architecture.png: the layers and which way imports may go.

    .venv/bin/python docs/make_architecture_png.py

The layers and arrows are those tests/test_layers.py enforces (`ALLOWED`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_name("architecture.png")

# (name, x, y, description): one row per layer, bottom up
BOXES = [
    ("models", 0.5, 0, "zoo, datasets, training,\nweights ↔ numpy, gating"),
    ("sparse_kernels", 3.5, 0, "sparse deltas, codec,\naggregation (numpy only)"),
    ("pruning", 2.0, 1.25, "masks, schedules, channel\npruning, ONNX export"),
    ("strategies", 2.0, 2.5, "one folder per method:\nserver half + agent half"),
    ("coordinator", 0.5, 3.75, "protocol, store, service,\nFastAPI app, CLI"),
    ("edge_agent", 3.5, 3.75, "client, agent loop, local\ntraining, budget, infer"),
    ("sim / bench", 2.0, 5.0, "local federation runner,\nbenchmarks"),
]
# importer → imported (the layer just below; transitive arrows left out)
ARROWS = [
    ("pruning", "models"), ("pruning", "sparse_kernels"), ("strategies", "pruning"),
    ("coordinator", "strategies"), ("edge_agent", "strategies"), ("sim / bench", "coordinator"),
    ("sim / bench", "edge_agent"), ("models", "sparse_kernels"),
]
W, H = 2.4, 0.8


def main() -> None:
    fig, ax = plt.subplots(figsize=(7.5, 7))
    pos = {}
    for name, x, y, text in BOXES:
        ax.add_patch(FancyBboxPatch((x - W / 2, y - H / 2), W, H, boxstyle="round,pad=0.05",
                                    facecolor="#e8f0fe", edgecolor="#3367d6"))
        ax.text(x, y + 0.17, name, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(x, y - 0.15, text, ha="center", va="center", fontsize=7.5)
        pos[name] = (x, y)
    for src, dst in ARROWS:
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        if y0 == y1:  # same row: side to side
            start, end = (x0 + W / 2 * (1 if x1 > x0 else -1), y0), (x1 - W / 2 * (1 if x1 > x0 else -1), y1)
        else:
            start, end = (x0, y0 - H / 2 - 0.05), (x1, y1 + H / 2 + 0.05)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color="#555"))
    # the one exception: edge_agent imports coordinator.protocol (the wire schemas)
    ax.add_patch(FancyArrowPatch((3.5 - W / 2, 3.75), (0.5 + W / 2, 3.75), arrowstyle="-|>", mutation_scale=12,
                                 color="#d93025", linestyle="--"))
    ax.text(2.0, 3.95, "protocol.py only", ha="center", fontsize=8, color="#d93025")
    ax.set_xlim(-1, 5)
    ax.set_ylim(-0.8, 5.8)
    ax.axis("off")
    ax.set_title("fedslim layers: an arrow means 'may import'; nothing imports upward", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    plt.close(fig)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
