"""Matplotlib helpers shared by the 3D figure (:mod:`.render3d`) and the training-set previews
(``[figures]`` / ``[train]`` extras): an organ legend and an atomic PNG save."""

from __future__ import annotations

from pathlib import Path

from ..atomic_files import atomic_path
from ..engine.image_io import PathLike


def add_organ_legend(fig, organs, labels: list[str], max_columns: int = 7) -> None:  # noqa: ANN001
    """A legend of organ color patches along the bottom of a black figure (nothing if no organ)."""
    from matplotlib.patches import Patch

    handles = [Patch(color=o.color_float, label=text) for o, text in zip(organs, labels)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(max_columns, len(handles)), fontsize=8,
                   facecolor="black", labelcolor="white", frameon=False)


def save_figure_atomic(fig, path: PathLike) -> Path:  # noqa: ANN001
    """Save a matplotlib figure as PNG through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    out = Path(path)
    try:
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, facecolor="black", format="png")
    finally:
        plt.close(fig)
    return out
