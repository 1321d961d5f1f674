"""The run's log (``log.csv``) and its loss and Dice curves (``curves.png``)."""
from __future__ import annotations

import csv
import io as _io
import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..atomic import atomic_output


def label_key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower()


class RunLog:
    """Rows of OUT/log.csv kept in memory and rewritten atomically at checkpoints and the end."""

    def __init__(self, path: Path, groups: list, labels: list):
        self.path = path
        self.lr_columns = [f"lr_{g}" for g in groups]
        self.val_columns = [f"val_dice_{label_key(e['name'])}" for e in labels]
        self.columns = (["step", "epoch", "stage", "stage_name", "loss", "loss_name"] + self.lr_columns
                        + self.val_columns + ["elapsed_s"])
        self.rows: list = []

    def restore(self, up_to_step: int) -> None:
        """Keep the rows of an interrupted run up to its checkpoint."""
        if not self.path.exists():
            return
        with open(self.path, newline="", encoding="utf-8") as f:
            self.rows = [row for row in csv.DictReader(f) if int(row["step"]) <= up_to_step]

    def add(self, row: dict) -> None:
        self.rows.append({c: "" if row.get(c) is None else row[c] for c in self.columns})

    def write(self) -> None:
        buffer = _io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        with atomic_output(self.path) as tmp:
            tmp.write_text(buffer.getvalue(), encoding="utf-8")

    def plot(self, path: Path, title: str) -> None:
        """Loss (per stage and loss), learning rates and validation Dice against the step."""
        def column(name):
            return np.array([float(r[name]) if r.get(name) not in ("", None) else np.nan for r in self.rows])

        steps = column("step")
        has_val = any(r.get(c) not in ("", None) for r in self.rows for c in self.val_columns)
        panels = 3 if has_val else 2
        fig = Figure(figsize=(7, 2.6 * panels), dpi=90)
        FigureCanvasAgg(fig)
        axes = fig.subplots(panels, 1, sharex=True)
        loss = column("loss")
        for key in dict.fromkeys((r["stage_name"], r["loss_name"]) for r in self.rows):
            mask = np.array([(r["stage_name"], r["loss_name"]) == key for r in self.rows])
            axes[0].plot(steps[mask], loss[mask], lw=0.8, label=f"{key[0]}: {key[1]}")
        if self.rows and np.all(loss[np.isfinite(loss)] > 0):
            axes[0].set_yscale("log")
        axes[0].set_ylabel("loss")
        axes[0].set_title(title)
        for c in self.lr_columns:
            axes[1].plot(steps, column(c), lw=0.8, label=c[3:])
        axes[1].set_ylabel("learning rate")
        if has_val:
            for c in self.val_columns:
                values = column(c)
                mask = np.isfinite(values)
                axes[2].plot(steps[mask], values[mask], "o-", ms=3, label=c[9:])
            axes[2].set_ylabel("validation Dice")
            axes[2].set_ylim(0, 1)
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png")
