"""Tests of benchmark.analysis.dataset_figures' histogram binning and axes
(every figure of `FIGURES`, drawn as a real PNG, is checked on whole datasets
in test_dataset_report.py)."""

from benchmark.analysis import dataset_figures


def test_log_bins_cover_every_count():
  for max_value in (1, 2, 5, 37, 4151):
    edges = dataset_figures._log_bin_edges(max_value)
    assert edges[0] == 1 and edges[-1] > max_value
    assert all(b > a for a, b in zip(edges, edges[1:]))


def test_wide_histograms_use_log_axes_narrow_ones_unit_bars():
  from matplotlib.figure import Figure
  wide = {"1": 500, "7": 40, "90": 3, "1500": 1}
  ax = Figure().subplots()
  assert dataset_figures._integer_histogram(ax, wide) == " (log scale)"
  assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
  # Every user lands in a bin: the bar heights add up to the user count.
  assert sum(p.get_height() for p in ax.patches) == sum(wide.values())
  narrow = {"1": 5, "2": 14, "6": 1}
  ax = Figure().subplots()
  assert dataset_figures._integer_histogram(ax, narrow) == ""
  assert ax.get_xscale() == "linear"
  assert sorted((p.get_x() + p.get_width() / 2, p.get_height())
                for p in ax.patches) == [(1, 5), (2, 14), (6, 1)]

