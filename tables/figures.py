"""``python -m tables.figures``: the paper's figures from recorded results (PNG, matplotlib Agg).

  python -m tables.figures figure=all table=all workdir=runs/demo out=out/figures

- ``schedules.png``: log SNR(t) of the cosine schedule, the shifted cosine (Eq. 5; by default
  image 512 shifted to 64 and to 32) and the interpolated one (Eq. 6; 32 -> 256), as in Figure 5.
  The curves come from :mod:`core.schedules`, the code the models train with.
- ``guidance.png``: FID train, FID eval and IS against the guidance scale (Table 9), paper and
  ours.
- ``curves_table_<N>.png``: training loss against step (metrics.jsonl) of the runs serving the
  rows of table N.
- ``samples_table_<N>.png``: the latest sample grid of each run serving table N
  (``eval/samples_<step>.png``, or ``eval/samples_<step>.npz`` with uint8 ``images`` [N,H,W,C],
  tiled here) side by side, each under its FID and KID (train and eval splits, with spread and
  sample count), and below them whether the paper's ordering held (:mod:`tables.ordering`).
- ``clip_fid.png`` (Figure 8): CLIP score against FID@30K (``fid_eval``, else ``fid_train``) of
  each text-to-image run serving Table 8, one point per guidance scale of its latest evaluated
  step, labelled with the scale (runs evaluated without a CLIP model: FID against guidance).
Figures without data (no runs, no samples) are not written.
"""
from __future__ import annotations

import io
import math
import re
import sys
import textwrap
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pandas as pd  # pylint: disable=wrong-import-position

from core import cli  # pylint: disable=wrong-import-position
from core import schedules as sched  # pylint: disable=wrong-import-position
from core.errors import UserError, run_main  # pylint: disable=wrong-import-position
from core.io import storage  # pylint: disable=wrong-import-position
from tables import measured, ordering, paper, runs  # pylint: disable=wrong-import-position

FIGURES = ("schedules", "guidance", "curves", "samples", "clip_fid")
DPI = 100
_SAMPLES_RE = re.compile(r"^samples_(\d+)\.(png|npz)$")


def _save(fig, path: str) -> str:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=DPI)
  plt.close(fig)
  storage.write_bytes(path, buf.getvalue())
  return path


def schedules(path: str, image_d: int = 512, noise_ds: Sequence[float] = (64, 32),
              interpolate: tuple[float, float] = (32, 256)) -> str:
  """Figure 5: cosine, shifted and interpolated log SNR(t) for ``image_d`` x ``image_d`` images."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  t = jnp.linspace(0.0, 1.0, 501)
  fig, ax = plt.subplots(figsize=(8, 5))
  ax.plot(t, np.asarray(sched.logsnr_cosine(t)), label="cosine", color="k")
  for d in noise_ds:
    ax.plot(t, np.asarray(sched.logsnr_shifted(t, image_d, d)),
            label=f"cosine shifted ({image_d} to {d:g})")
  low, high = interpolate
  ax.plot(t, np.asarray(sched.logsnr_interpolated(t, image_d, low, high)), "--",
          label=f"interpolated (shift {low:g} to {high:g})")
  ax.set(xlabel="t", ylabel="log SNR(t)", title=f"Noise schedules for {image_d}x{image_d} images",
         xlim=(0, 1))
  ax.axhline(0, color="0.8", lw=0.8, zorder=0)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, path)


def guidance(frame: pd.DataFrame, path: str) -> str:
  """Table 9 as curves: FID train, FID eval and IS against the guidance scale, paper and ours."""
  rows = frame[frame["table"] == "9"].copy()
  rows["g"] = [paper.guidance_of("9", r) for r in rows["row"]]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  panels = [("fid_train", "FID train"), ("fid_eval", "FID eval"), ("is_mean", "IS")]
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, (col, title) in zip(axes, panels):
    for i, (group, g) in enumerate(rows.groupby("group", sort=False)):
      c = colors[i % len(colors)]
      paper_err = g["is_std_f"] if col == "is_mean" else None
      ax.errorbar(g["g"], g[col + "_f"], yerr=paper_err, fmt="o-", color=c, capsize=2,
                  label=f"{group} paper")
      ours = pd.to_numeric(g["our_" + col], errors="coerce")
      if ours.notna().any():
        err = pd.to_numeric(g["our_is_std"], errors="coerce") if col == "is_mean" else None
        ax.errorbar(g["g"], ours, yerr=err, fmt="x--", color=c, capsize=2,
                    label=f"{group} ours")
    ax.set(xlabel="guidance scale (1 + eta)", title=title)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize="small")
  fig.suptitle("Guidance scale, U-ViT on ImageNet (paper Table 9)")
  fig.tight_layout()
  return _save(fig, path)


def _table_runs(recorded: runs.Runs, table: str) -> list[tuple[str, str, str]]:
  """(run, run path, label) for each run serving a row of ``table``, in the paper's row order."""
  paper_rows = paper.load_paper()
  order = {(g, r): i for i, (g, r) in enumerate(
      zip(paper_rows.loc[paper_rows["table"] == table, "group"],
          paper_rows.loc[paper_rows["table"] == table, "row"]))}
  serves = recorded.serves[recorded.serves["table"] == table]
  known = pd.Series([(g, r) in order for g, r in zip(serves["group"], serves["row"])],
                    index=serves.index, dtype=bool)
  serves = serves[known]
  out = []
  for run, s in serves.groupby("run", sort=False):
    s = s.assign(o=[order[(g, r)] for g, r in zip(s["group"], s["row"])]).sort_values("o")
    label = f"{s['group'].iloc[0]}: {s['row'].iloc[0]}"
    if len(s) > 1:
      label += f" (+{len(s) - 1} rows)"
    path = recorded.runs.loc[recorded.runs["run"] == run, "path"].iloc[0]
    out.append((int(s["o"].iloc[0]), run, path, label))
  return [(run, path, label) for _, run, path, label in sorted(out)]


def curves(recorded: runs.Runs, table: str, path: str) -> str | None:
  """Training loss against step of the runs serving ``table``; None if no run logged a loss."""
  fig, ax = plt.subplots(figsize=(9, 5))
  drawn, positive = 0, True
  for run, run_path, label in _table_runs(recorded, table):
    m = runs.load_metrics(run_path)
    m = m.assign(step=pd.to_numeric(m["step"], errors="coerce"),
                 loss=pd.to_numeric(m["loss"], errors="coerce")).dropna(subset=["step", "loss"])
    if m.empty:
      continue
    ax.plot(m["step"], m["loss"], label=f"{label} [{run}]")
    drawn += 1
    positive &= bool((m["loss"] > 0).all())
  if not drawn:
    plt.close(fig)
    return None
  ax.set(xlabel="training step", ylabel="loss", title=f"Training loss, {paper.source(table)}")
  if positive:
    ax.set_yscale("log")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize="small")
  fig.tight_layout()
  return _save(fig, path)


def tile(images: np.ndarray, max_images: int = 64) -> np.ndarray:
  """[N, H, W, C] uint8 images -> one near-square [rows*H, cols*W, C] grid (empty cells black)."""
  images = np.asarray(images)[:max_images]
  if images.ndim == 3:
    images = images[..., None]
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
  for i, im in enumerate(images):
    r, q = divmod(i, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
  return grid


def latest_samples(run_path: str) -> tuple[int, np.ndarray] | None:
  """(step, grid image) of a run's latest eval/samples_<step>.{png,npz}; a PNG wins a tie."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  eval_dir = storage.join(run_path, "eval")
  found = [(int(m.group(1)), m.group(2) == "png", name)
           for name in storage.listdir(eval_dir, missing_ok=True) if (m := _SAMPLES_RE.match(name))]
  for step, is_png, name in sorted(found, reverse=True):
    data = storage.read_bytes(storage.join(eval_dir, name))
    if is_png:
      return step, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    with np.load(io.BytesIO(data)) as z:
      if "images" not in z:
        print(f"warning: {storage.join(eval_dir, name)} has no 'images' array; skipped",
              file=sys.stderr)
        continue
      images = z["images"]
    if images.dtype != np.uint8:
      print(f"warning: {storage.join(eval_dir, name)} images are {images.dtype}, not uint8; "
            f"skipped", file=sys.stderr)
      continue
    return step, tile(images)
  return None


def numbers_caption(nums: dict[str, dict]) -> str:
  """'FID train 123.4 ± 2.1  eval ...' and 'KID x10^3 train ...' lines with the sample count."""
  lines = []
  for kind, scale_note in (("fid", ""), ("kid", " x10^3")):
    parts = [f"{split} {ordering.format_number(dict(nums[f'{kind}_{split}'], kid=kind == 'kid'))}"
             for split in ("train", "eval") if f"{kind}_{split}" in nums]
    if parts:
      lines.append(f"{kind.upper()}{scale_note}: " + ", ".join(parts))
  if lines:
    n = max(m["num_samples"] for m in nums.values())
    lines[-1] += f" (n={n})"
  return "\n".join(lines)


def samples(recorded: runs.Runs, table: str, path: str) -> str | None:
  """The latest sample grid of each run serving ``table`` beside its numbers; None if no run has
  samples."""
  panels = []
  for run, run_path, label in _table_runs(recorded, table):
    got = latest_samples(run_path)
    if got is not None:
      caption = numbers_caption(ordering.latest_numbers(recorded, run))
      panels.append((f"{label}\nstep {got[0]}" + (f"\n{caption}" if caption else ""), got[1]))
  if not panels:
    return None
  cols = min(4, len(panels))
  nrows = math.ceil(len(panels) / cols)
  # Below the panels: the table, then whether the paper's ordering held (tables.ordering).
  foot_lines = [f"Samples, {paper.source(table)}"] + [
      textwrap.fill(v, 40 * cols) for v in ordering.sentences(recorded, table)]
  foot = 0.25 * sum(len(line.splitlines()) for line in foot_lines) + 0.1
  height = 5.3 * nrows + foot
  fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, height), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, (title, grid) in zip(axes.flat, panels):
    gray = grid.shape[-1] == 1
    ax.imshow(grid[..., 0] if gray else grid, cmap="gray" if gray else None,
              interpolation="nearest")
    ax.set_title(title, fontsize="small")
  fig.text(0.5, 0.01, "\n".join(foot_lines), ha="center", va="bottom", fontsize="small")
  fig.tight_layout(rect=(0, foot / height, 1, 0.93))
  return _save(fig, path)


def clip_fid_points(recorded: runs.Runs, run: str) -> pd.DataFrame:
  """Per guidance scale of ``run``'s latest evaluated step: guidance, fid, clip (NaN if none) and
  n, the FID's sample count."""
  res = recorded.results[recorded.results["run"] == run].dropna(subset=["step", "value"])
  fid = next((m for m in ("fid_eval", "fid_train") if (res["metric"] == m).any()), None)
  if fid is None:
    return pd.DataFrame(columns=["guidance", "fid", "clip", "n"])
  res = res[res["step"] == res.loc[res["metric"] == fid, "step"].max()]
  res = res.assign(g=measured.guidance_values(res["guidance"])).sort_values("line", kind="stable")
  last = res.groupby(["metric", "g"]).tail(1)
  pts = last[last["metric"] == fid].set_index("g")["value"].rename("fid").to_frame()
  pts["clip"] = last[last["metric"] == "clip_score"].set_index("g")["value"]
  pts["n"] = last[last["metric"] == fid].set_index("g")["num_samples"]
  return pts.sort_index().reset_index().rename(columns={"g": "guidance"})


def fid_axis_label(counts) -> str:
  """'FID@30K' only where 30K samples were scored; otherwise the sample counts (n=...)."""
  ns = sorted({int(n) for n in counts if pd.notna(n)})
  if ns == [30000]:
    return "FID@30K"
  return f"FID (n={', '.join(str(n) for n in ns) or '?'}; the paper's is FID@30K)"


def clip_fid(recorded: runs.Runs, path: str, table: str = "8") -> str | None:
  """Figure 8: CLIP score vs FID@30K over guidance, one labelled point per guidance scale."""
  curves_ = [(label, clip_fid_points(recorded, run)) for run, _, label in
             _table_runs(recorded, table)]
  curves_ = [(label, p) for label, p in curves_ if len(p)]
  if not curves_:
    return None
  fig, ax = plt.subplots(figsize=(6, 4.5))
  with_clip = all(p["clip"].notna().all() for _, p in curves_)
  for label, p in curves_:
    x = p["clip"] if with_clip else p["guidance"]
    ax.plot(x, p["fid"], "o-", label=label)
    for xi, yi, g in zip(x, p["fid"], p["guidance"]):
      ax.annotate(f"{g:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.set(xlabel="CLIP score" if with_clip else "guidance scale (1 + eta)",
         ylabel=fid_axis_label(n for _, p in curves_ for n in p["n"]),
         title="Figure 8: CLIP vs FID over guidance" if with_clip else
         "Figure 8 without CLIP (no CLIP model given): FID vs guidance")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


def draw_all(workdir: str | None, out: str, tables: Sequence[str],
             which: Sequence[str] = FIGURES) -> list[str]:
  """Draws the chosen figures into ``out``; returns the paths written."""
  storage.makedirs(out)
  written = []
  if "schedules" in which:
    written.append(schedules(storage.join(out, "schedules.png")))
  recorded = runs.load(workdir)
  if "guidance" in which and "9" in tables:
    frame = measured.measure(recorded, paper.load_paper())
    written.append(guidance(frame, storage.join(out, "guidance.png")))
  if "clip_fid" in which and "8" in tables:
    written.append(clip_fid(recorded, storage.join(out, "clip_fid.png")))
  for t in tables:
    if "curves" in which:
      written.append(curves(recorded, t, storage.join(out, f"curves_table_{t}.png")))
    if "samples" in which:
      written.append(samples(recorded, t, storage.join(out, f"samples_table_{t}.png")))
  return [p for p in written if p]


OPTIONS = [
    cli.Option("figure", "all", "which figure(s).", choices=["all", *FIGURES]),
    cli.Option("table", "all", "the table whose runs to plot (curves, samples; guidance needs 9).",
               choices=["all", *paper.TABLES]),
    cli.Option("workdir", None, "directory holding the run directories; unset: paper values only."),
    cli.Option("out", "out/figures", "output directory for the PNG files (created)."),
]


def main(argv: Sequence[str]) -> int:
  opts, bindings = cli.parse(argv, OPTIONS, prog="tables.figures", description=__doc__)
  if bindings:
    raise UserError(f"tables.figures takes no gin bindings; got {' '.join(bindings)}")
  workdir = opts["workdir"]
  if workdir and not storage.isdir(workdir):
    raise UserError(f"workdir={workdir} is not a directory; pass the directory holding the run "
                    "directories, or leave workdir unset")
  tables = list(paper.TABLES) if opts["table"] == "all" else [opts["table"]]
  which = FIGURES if opts["figure"] == "all" else (opts["figure"],)
  for p in draw_all(workdir, opts["out"], tables, which):
    print(p)
  return 0


if __name__ == "__main__":
  run_main(main)
