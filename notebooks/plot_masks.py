"""Render the attention masks of every variant, as the code defines them, to ``docs/masks.png``.

``python notebooks/plot_masks.py [--length 64] [--heads 4] [--out docs/masks.png]``. Each row is a
variant of :data:`spattn_jax.masks.VARIANTS`; each column a head (query ``i`` down, key ``j`` across, a
dark cell = allowed), and the last column counts how many heads see each (query, key) pair. The picture
comes from ``MaskSpec.dense``, the same spec the kernels read.
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from spattn_jax import masks  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plot(length: int, heads: int, out: str) -> None:
    variants = masks.VARIANTS
    fig, axes = plt.subplots(
        len(variants), heads + 1, figsize=(1.6 * (heads + 1), 1.6 * len(variants)), squeeze=False
    )
    for r, variant in enumerate(variants):
        dense = masks.make(variant, num_heads=heads, band_len=length).dense(length)  # [H, T, T]
        for h in range(heads + 1):
            ax = axes[r, h]
            if h < heads:
                ax.imshow(dense[h], cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
                if r == 0:
                    ax.set_title(f"head {h}", fontsize=8)
            else:
                im = ax.imshow(dense.sum(0), cmap="viridis", vmin=0, vmax=heads, interpolation="nearest")
                if r == 0:
                    ax.set_title("heads per pair", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(variant, fontsize=8, rotation=0, ha="right", va="center")
    fig.subplots_adjust(right=0.9, top=0.94, wspace=0.08, hspace=0.08)
    fig.colorbar(im, cax=fig.add_axes([0.92, 0.35, 0.015, 0.3]), ticks=range(heads + 1))
    fig.suptitle(f"SPAttention masks, L = {length}, H = {heads} (query down, key across)", fontsize=10)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "masks.png"))
    args = parser.parse_args()
    plot(args.length, args.heads, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
