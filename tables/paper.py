"""The paper's Tables 2-9 and the 1024 result of appendix C, read from experiments/paper_tables.csv.

Row identity is (table, group, row) with the CSV's exact strings. Values are kept as the CSV's
strings (so the rendered tables show the paper's own precision, e.g. ``6.9`` or ``158.71``) and
as floats (for comparisons and plots).
"""
from __future__ import annotations

import dataclasses
import os

import pandas as pd

PAPER_CSV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "experiments", "paper_tables.csv")
VALUE_COLUMNS = ("fid_train", "fid_eval", "is_mean", "is_std", "steps_per_sec_rel")


@dataclasses.dataclass(frozen=True)
class TableInfo:
  """What a table is about and how its numbers were measured in the paper."""
  caption: str
  row_header: str
  paper_samples: int  # FID@50K on ImageNet (section 5.1), FID@30K on COCO.
  # Our metric(s) for the paper's 'FID train' column, first one present wins (Table 8 has one
  # FID@30K column, measured against the COCO validation set: appendix C).
  fid_train_metrics: tuple[str, ...] = ("fid_train",)
  fid_train_header: str = "FID train"


TABLES: dict[str, TableInfo] = {
    "2": TableInfo("Noise schedule on ImageNet 128 and 256.", "Noise schedule", 50_000),
    "3": TableInfo("Dropout ablation on ImageNet 128.", "Dropout from resolution", 50_000),
    "4": TableInfo("Scaling the U-Net architecture on ImageNet 128.", "Blocks at 16x16", 50_000),
    "5": TableInfo("Downsampling strategies on ImageNet 512x512.", "Strategy", 50_000),
    "6": TableInfo("Multiscale loss; 256 uses shift 32, 512 uses shift 64.", "Resolution", 50_000),
    "7": TableInfo("Comparison to generative models in the literature on ImageNet, without "
                   "guidance (* uses temperature scaling).", "Method", 50_000),
    "8": TableInfo("Text to image, zero-shot COCO (512 from the text of section 5.2).", "Method",
                   30_000,
                   fid_train_metrics=("fid_eval", "fid_train"), fid_train_header="FID@30K"),
    "9": TableInfo("Guidance scale for the U-ViT on ImageNet (scale reported as 1+eta).",
                   "Guidance", 50_000),
    "1024": TableInfo("U-Net on ImageNet 1024x1024.", "Model", 50_000),
}


def source(table: str) -> str:
  """Where a table is in the paper: 'Table 2' ... 'Table 9', or 'Appendix C' for '1024'."""
  return "Appendix C" if table == "1024" else f"Table {table}"


def load_paper(path: str = PAPER_CSV) -> pd.DataFrame:
  """The paper's rows in the paper's order: string columns plus ``<value>_f`` float columns."""
  df = pd.read_csv(path, dtype=str, keep_default_na=False)
  for c in VALUE_COLUMNS:
    df[c] = df[c].str.strip()
    df[c + "_f"] = pd.to_numeric(df[c].replace("", None), errors="coerce")
  df["order"] = range(len(df))
  return df


def is_literature(note: str) -> bool:
  """Rows of other papers (Tables 7, 8): shown with the paper's value only."""
  return "literature" in (note or "")


def guidance_of(table: str, row: str) -> float:
  """Guidance scale a row is evaluated at: 'guidance X' rows of Table 9, else 1.0 (no guidance)."""
  if table == "9" and row.startswith("guidance "):
    return float(row.split()[1])
  return 1.0
