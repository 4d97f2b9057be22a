"""Training logs: per-step and per-epoch CSV files, optional TensorBoard scalars, a PNG of the curves.

``steps.csv``: one row per optimizer step (every loss term, unweighted, and the λ values and lr).
``epochs.csv``: one row per epoch (means of the terms over labeled and unlabeled steps).
``losses.png``: the epoch curves, redrawn at the end of every epoch (matplotlib, Agg backend).
On resume, rows after the checkpoint are dropped so that re-run steps are not logged twice.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from ..atomic_files import atomic_path

STEP_FIELDS = ["stage", "epoch", "step", "kind", "lr", "ramp", "lambda_dis", "lambda_ssl",
               "lambda_kl_unlabeled", "total", "seg_S", "seg_T1", "seg_T2", "kl", "ct_T1", "ct_T2", "psv",
               "seconds"]
TERMS = ["total", "seg_S", "seg_T1", "seg_T2", "kl", "ct_T1", "ct_T2", "psv"]
EPOCH_FIELDS = ["stage", "epoch", "lr", "ramp", "lambda_dis", "lambda_ssl", "lambda_kl_unlabeled", "steps",
                "seconds"] + [f"{k}_{t}" for k in ("labeled", "unlabeled") for t in TERMS]


def _truncate_csv(path: Path, fields: List[str], keep) -> None:
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if keep(r)]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


class TrainingLogger:
    """Writes the logs of one stage into ``folder`` (only on rank 0; other ranks pass enabled=False)."""

    def __init__(self, folder: Path, stage: str, enabled: bool = True, resume_step: Optional[int] = None,
                 resume_epoch: Optional[int] = None, tensorboard: bool = True) -> None:
        self.folder = Path(folder)
        self.stage = stage
        self.enabled = enabled
        self.steps_csv = self.folder / "steps.csv"
        self.epochs_csv = self.folder / "epochs.csv"
        self.png = self.folder / "losses.png"
        self._epoch_rows: Dict[str, List[float]] = defaultdict(list)
        self._tb = None
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            _truncate_csv(self.steps_csv, STEP_FIELDS, lambda r: int(r["step"]) <= resume_step)
            _truncate_csv(self.epochs_csv, EPOCH_FIELDS, lambda r: int(r["epoch"]) < (resume_epoch or 0))
            self._reload_epoch(resume_epoch or 0)
        else:
            for path in (self.steps_csv, self.epochs_csv):
                path.unlink(missing_ok=True)
        for path, fields in ((self.steps_csv, STEP_FIELDS), (self.epochs_csv, EPOCH_FIELDS)):
            if not path.is_file():
                with path.open("w", newline="") as fh:
                    csv.DictWriter(fh, fieldnames=fields).writeheader()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except Exception:  # not installed: CSV and PNG only
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(self.folder / "tensorboard"))

    def _reload_epoch(self, epoch: int) -> None:
        """After a mid-epoch resume, count the epoch's already logged steps in its means."""
        if not self.steps_csv.is_file():
            return
        with self.steps_csv.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if int(row["epoch"]) == epoch:
                    self._accumulate(row)

    def _accumulate(self, row: Dict) -> None:
        for term in TERMS:
            if row.get(term) not in (None, ""):
                self._epoch_rows[f"{row['kind']}_{term}"].append(float(row[term]))

    def step(self, row: Dict) -> None:
        """Log one optimizer step (``row`` keys from :data:`STEP_FIELDS`)."""
        if not self.enabled:
            return
        row = {"stage": self.stage, **row}
        with self.steps_csv.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=STEP_FIELDS, extrasaction="ignore").writerow(row)
        kind = row["kind"]
        self._accumulate(row)
        if self._tb is not None:
            for key in ("total", "seg_S", "seg_T1", "seg_T2", "kl", "ct_T1", "ct_T2", "psv", "lr", "ramp",
                        "lambda_dis", "lambda_ssl", "lambda_kl_unlabeled"):
                if key in row and row[key] != "":
                    tag = f"{self.stage}/{kind}/{key}" if key in TERMS else f"{self.stage}/{key}"
                    self._tb.add_scalar(tag, float(row[key]), int(row["step"]))

    def epoch(self, row: Dict) -> Dict:
        """Close an epoch: write its mean terms, redraw the PNG; returns the epoch row."""
        if not self.enabled:
            return dict(row)
        full = {"stage": self.stage, **row}
        for key, values in self._epoch_rows.items():
            full[key] = sum(values) / len(values)
        self._epoch_rows.clear()
        with self.epochs_csv.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=EPOCH_FIELDS, extrasaction="ignore").writerow(full)
        if self._tb is not None:
            self._tb.flush()
        plot_losses(self.epochs_csv, self.png, title=f"{self.stage} stage")
        return full

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def plot_losses(epochs_csv: Path, png: Path, title: str = "") -> None:
    """Draw the epoch means of every logged term (and lr, λ) from ``epochs_csv`` into ``png``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with Path(epochs_csv).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]

    def series(key: str) -> List[float]:
        return [float(r[key]) if r.get(key) not in (None, "") else math.nan for r in rows]

    marker = "." if len(epochs) < 30 else None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, kind in zip(axes[:2], ("labeled", "unlabeled")):
        for term in TERMS:
            values = series(f"{kind}_{term}")
            if not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, marker=marker, label="total (weighted)" if term == "total" else term)
        ax.set_title(f"{title}: {kind} steps")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (terms unweighted)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(epochs, [v / series("lr")[0] for v in series("lr")], marker=marker, label="lr / initial lr")
    ax.plot(epochs, series("ramp"), marker=marker, label="ramp r(t)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("schedule")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(png, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)
