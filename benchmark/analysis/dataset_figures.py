"""The explore report's seven PNG figures: their file names and their drawing.

Each `plot_*` function draws one figure from the dict of
`dataset_stats.compute_statistics` (or, for the sample grid, the
`dataset_stats.SampleImage` tiles) with matplotlib's object-oriented API (no
pyplot, so no global backend state) and writes it atomically to the given
path: images and users per partition, images per coarse label, the top
fine-grained labels, labels per image, images per user (log-log), distinct
labels per user, and a grid of sample images per user. `draw_figures` draws
all seven into one folder under the names in `FIGURES`; this module owns
those names.
"""

import math
import os
import textwrap
from typing import Any, Callable, Optional, Sequence

from absl import logging
import numpy as np

from benchmark.analysis import dataset_stats
from benchmark.core import constants
from benchmark.core import file_io

# Figure file names (in the output directory), in the order they are made.
PARTITIONS_FIGURE = "partitions.png"
COARSE_LABELS_FIGURE = "coarse_labels.png"
TOP_FINE_LABELS_FIGURE = "top_fine_grained_labels.png"
LABELS_PER_IMAGE_FIGURE = "labels_per_image.png"
IMAGES_PER_USER_FIGURE = "images_per_user.png"
LABELS_PER_USER_FIGURE = "distinct_labels_per_user.png"
SAMPLE_IMAGES_FIGURE = "sample_images.png"
FIGURES = (PARTITIONS_FIGURE, COARSE_LABELS_FIGURE, TOP_FINE_LABELS_FIGURE,
           LABELS_PER_IMAGE_FIGURE, IMAGES_PER_USER_FIGURE,
           LABELS_PER_USER_FIGURE, SAMPLE_IMAGES_FIGURE)

_DPI = 110
_PARTITION_COLORS = {constants.TRAIN: "#4C72B0", constants.VAL: "#DD8452",
                     constants.TEST: "#55A868"}
_BAR_COLOR = "#4C72B0"
# Integer histograms with at most this many distinct values get one bar per
# value; wider ranges are binned.
_MAX_UNIT_BARS = 40


def _plural(n: int, noun: str) -> str:
  return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _new_figure(width: float, height: float):
  # matplotlib.figure.Figure renders with the Agg canvas when saved as PNG and
  # touches no pyplot/global backend state.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(figure, path: str) -> None:
  with file_io.atomic_path(path) as tmp:
    figure.savefig(tmp, format="png", dpi=_DPI)


def _annotate_bars(ax, bars, values: Sequence[int], horizontal: bool,
                   total: Optional[int] = None) -> None:
  for bar, value in zip(bars, values):
    text = f"{value:,}"
    if total:
      text += f" ({100.0 * value / total:.1f}%)"
    if horizontal:
      ax.annotate(text, (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                  xytext=(3, 0), textcoords="offset points", va="center",
                  fontsize=8)
    else:
      ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                  xytext=(0, 2), textcoords="offset points", ha="center",
                  va="bottom", fontsize=9)


def plot_partitions(stats: dict[str, Any], path: str) -> None:
  """Bar charts of images and users per partition."""
  figure = _new_figure(9, 4)
  axes = figure.subplots(1, 2)
  partitions = list(constants.PARTITIONS)
  colors = [_PARTITION_COLORS[p] for p in partitions]
  for ax, key, what in ((axes[0], "partition_images", "images"),
                        (axes[1], "partition_users", "users")):
    values = [stats[key][p] for p in partitions]
    bars = ax.bar(partitions, values, color=colors)
    _annotate_bars(ax, bars, values, horizontal=False)
    ax.set_title(f"{what.capitalize()} per partition "
                 f"(total {sum(values):,})")
    ax.set_xlabel("partition")
    ax.set_ylabel(f"number of {what}")
    ax.set_ylim(0, max(values + [1]) * 1.15)
    _count_axis(ax.yaxis)
  figure.suptitle("FLAIR split by user", fontsize=13)
  _save(figure, path)


def _horizontal_label_bars(counts: dict[str, int], total_images: int,
                           title: str, ylabel: str, path: str) -> None:
  names = list(counts)
  values = [counts[n] for n in names]
  figure = _new_figure(9, max(3.0, 0.32 * len(names) + 1.4))
  ax = figure.subplots()
  if not names:
    ax.text(0.5, 0.5, "no labels", ha="center", va="center",
            transform=ax.transAxes)
  bars = ax.barh(names, values, color=_BAR_COLOR)
  _annotate_bars(ax, bars, values, horizontal=True, total=total_images)
  ax.invert_yaxis()  # most frequent on top
  ax.set_xlim(0, max(values + [1]) * 1.3)  # room for the annotations
  _count_axis(ax.xaxis)
  ax.set_title(title)
  ax.set_xlabel(f"number of images with the label (of {total_images:,} "
                "images; % in brackets)")
  ax.set_ylabel(ylabel)
  ax.tick_params(axis="y", labelsize=9)
  _save(figure, path)


def plot_coarse_labels(stats: dict[str, Any], path: str) -> None:
  """Horizontal bars: images per coarse label, most frequent on top."""
  counts = stats["coarse_label_image_counts"]
  _horizontal_label_bars(
      counts, stats["num_images"],
      f"Coarse labels: images per label ({len(counts)} labels)",
      "coarse label", path)


def plot_top_fine_labels(stats: dict[str, Any], path: str) -> None:
  """Horizontal bars: images per fine-grained label for the top labels."""
  counts = stats["top_fine_grained_labels"]
  _horizontal_label_bars(
      counts, stats["num_images"],
      f"Top {len(counts)} fine-grained labels (of "
      f"{stats['num_fine_grained_labels_seen']:,} seen)",
      "fine-grained label", path)


def _count_axis(axis) -> None:
  """Integer ticks with thousands separators on a linear count axis."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  axis.set_major_locator(
      ticker.MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
  axis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))


def _log_log_axes(ax) -> None:
  """Log x and y with plain-number ticks at 1, 2, 5, 10, 20, 50, ... (so that
  short ranges get labels too)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.set_xscale("log")
  ax.set_yscale("log")
  for axis in (ax.xaxis, ax.yaxis):
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _integer_histogram(ax, histogram: dict[str, int]) -> str:
  """Draws `{value: count}` (value an integer as a string).

  One bar per integer when the values span fewer than `_MAX_UNIT_BARS`;
  otherwise (a heavy tail) geometric bins on log-log axes, or, when some value
  is 0, linear bins with a log count axis.

  Returns:
    A note for the x axis label: "" or " (log scale)".
  """
  values = [int(k) for k in histogram]
  counts = [histogram[k] for k in histogram]
  if not values:
    return ""
  low, high = min(values), max(values)
  if high - low < _MAX_UNIT_BARS:
    ax.bar(values, counts, width=0.8, color=_BAR_COLOR)
    ax.set_xlim(low - 0.7, high + 0.7)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _count_axis(ax.yaxis)
    return ""
  if low >= 1:
    edges = _log_bin_edges(high)
    ax.hist(values, bins=edges, weights=counts, color=_BAR_COLOR,
            edgecolor="white", linewidth=0.5)
    _log_log_axes(ax)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(0.7, None)
    return " (log scale)"
  ax.hist(values, bins=np.linspace(low, high + 1, _MAX_UNIT_BARS + 1),
          weights=counts, color=_BAR_COLOR, edgecolor="white", linewidth=0.5)
  ax.set_yscale("log")
  return ""


def _two_histograms(stats_pair: dict[str, Any], title: str, noun: str,
                    ylabel: str, path: str) -> None:
  figure = _new_figure(11, 4.2)
  axes = figure.subplots(1, 2)
  for ax, key, kind in ((axes[0], "coarse", "coarse"),
                        (axes[1], "fine_grained", "fine-grained")):
    dist = stats_pair[key]
    x_note = _integer_histogram(ax, dist["histogram"])
    s = dist["summary"]
    ax.set_title(f"{kind} labels (mean {s['mean']:.2f}, median "
                 f"{s['median']:g}, max {s['max']:,.0f})")
    ax.set_xlabel(f"number of distinct {kind} labels {noun}{x_note}")
    ax.set_ylabel(ylabel + (" (log scale)" if x_note else ""))
  figure.suptitle(title, fontsize=13)
  _save(figure, path)


def plot_labels_per_image(stats: dict[str, Any], path: str) -> None:
  """Histograms of the number of coarse and fine labels per image."""
  _two_histograms(stats["labels_per_image"], "Labels per image",
                  "on the image", "number of images", path)


def plot_labels_per_user(stats: dict[str, Any], path: str) -> None:
  """Histograms of the number of distinct coarse and fine labels per user."""
  _two_histograms(stats["distinct_labels_per_user"],
                  "Distinct labels per user (over all of a user's images)",
                  "of the user", "number of users", path)


def _log_bin_edges(max_value: int, num_bins: int = 25) -> np.ndarray:
  """Integer bin edges 1 = e0 < e1 < ... with max_value < e_last, roughly
  evenly spaced in log scale; bin i holds values in [e_i, e_{i+1})."""
  edges = np.unique(np.floor(np.logspace(
      0, math.log10(max_value + 1), num_bins + 1)).astype(np.int64))
  if edges[-1] <= max_value:
    edges = np.append(edges, max_value + 1)
  return edges


def plot_images_per_user(stats: dict[str, Any],
                         user_counts_by_partition: dict[str, list[int]],
                         path: str) -> None:
  """Histogram of images per user on log-log axes (the counts are
  heavy-tailed), all users as bars and each partition as an outline."""
  everyone = [n for counts in user_counts_by_partition.values() for n in counts]
  edges = _log_bin_edges(max(everyone))
  figure = _new_figure(9, 5)
  ax = figure.subplots()
  s = stats["images_per_user"]["summary"]
  ax.hist(everyone, bins=edges, color="#BBBBBB", edgecolor="white",
          label=f"all users ({len(everyone):,})")
  line_styles = dict(zip(constants.PARTITIONS, ("-", "--", ":")))
  for partition, counts in user_counts_by_partition.items():
    if counts:
      ax.hist(counts, bins=edges, histtype="step", linewidth=1.8,
              color=_PARTITION_COLORS[partition],
              linestyle=line_styles.get(partition, "-"),
              label=f"{partition} ({_plural(len(counts), 'user')})")
  _log_log_axes(ax)
  ax.set_xlim(edges[0], edges[-1])
  ax.set_ylim(0.7, None)
  ax.set_title(f"Images per user (log-log; mean {s['mean']:.1f}, median "
               f"{s['median']:g}, max {s['max']:,.0f})")
  ax.set_xlabel("number of images of the user (log scale; a bar covers "
                "[left edge, right edge) images)")
  ax.set_ylabel("number of users (log scale)")
  ax.legend(loc="upper right")
  _save(figure, path)


def plot_sample_images(rows: Sequence[Sequence[dataset_stats.SampleImage]],
                       path: str) -> None:
  """A grid: one row per sample user, its images with their labels.

  The tile title lists the coarse labels; the text under the tile the
  fine-grained ones; the row's first tile names the user.
  """
  num_rows = max(1, len(rows))
  num_cols = max([len(r) for r in rows] + [1])
  figure = _new_figure(2.9 * num_cols + 0.6, 3.6 * num_rows + 0.5)
  axes = np.asarray(figure.subplots(num_rows, num_cols, squeeze=False))
  for r in range(num_rows):
    row = rows[r] if r < len(rows) else []
    for c in range(num_cols):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if c >= len(row):
        ax.set_axis_off()
        continue
      tile = row[c]
      if tile.pixels is not None:
        ax.imshow(tile.pixels)
      else:
        ax.set_facecolor("#DDDDDD")
        ax.text(0.5, 0.5, tile.note, ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
      coarse = ", ".join(tile.record.labels) or "(no coarse labels)"
      ax.set_title("\n".join(textwrap.wrap(coarse, 30)[:2]), fontsize=9,
                   fontweight="bold")
      fine = ", ".join(tile.record.fine_grained_labels) or "(none)"
      fine_lines = textwrap.wrap("fine: " + fine, 38)
      if len(fine_lines) > 3:
        fine_lines = fine_lines[:3]
        fine_lines[-1] += " ..."
      ax.set_xlabel("\n".join(fine_lines), fontsize=7.5)
      if c == 0:
        ax.set_ylabel(f"user {tile.record.user_id}\n({tile.record.partition})",
                      fontsize=9)
  if not rows:
    axes[0, 0].set_axis_off()
    axes[0, 0].text(0.5, 0.5, "no users", ha="center", va="center")
  figure.suptitle("Sample images of the largest users (bold: coarse labels; "
                  "below: fine-grained labels)", fontsize=12)
  _save(figure, path)


def draw_figures(stats: dict[str, Any],
                 user_counts_by_partition: dict[str, list[int]],
                 sample_rows: Sequence[Sequence[dataset_stats.SampleImage]],
                 output_dir: str) -> None:
  """Draws the seven figures into `output_dir`, in the order of `FIGURES`.

  Args:
    stats: `dataset_stats.compute_statistics`'s dict.
    user_counts_by_partition: `dataset_stats.images_per_user_by_partition`'s
      dict (images of each user, per partition; at least one user).
    sample_rows: the sample grid's tiles, one list per user
      (`dataset_stats.sample_images_from_dataset_dir` or
      `dataset_stats.sample_images_from_tfrecords`).
    output_dir: the folder the PNGs go to (created when missing); existing
      files of the same names are replaced.

  Raises:
    errors.OutputWriteError: a storage failure writing a figure
      (`file_io.atomic_path`).
  """
  draw: dict[str, Callable[[str], None]] = {
      PARTITIONS_FIGURE: lambda p: plot_partitions(stats, p),
      COARSE_LABELS_FIGURE: lambda p: plot_coarse_labels(stats, p),
      TOP_FINE_LABELS_FIGURE: lambda p: plot_top_fine_labels(stats, p),
      LABELS_PER_IMAGE_FIGURE: lambda p: plot_labels_per_image(stats, p),
      IMAGES_PER_USER_FIGURE:
          lambda p: plot_images_per_user(stats, user_counts_by_partition, p),
      LABELS_PER_USER_FIGURE: lambda p: plot_labels_per_user(stats, p),
      SAMPLE_IMAGES_FIGURE: lambda p: plot_sample_images(sample_rows, p),
  }
  for name in FIGURES:
    logging.info("Drawing %s", name)
    draw[name](os.path.join(output_dir, name))
