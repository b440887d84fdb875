"""Run reports: one self-contained HTML file per run (plots, metrics, the data's problems, the top losses).

    >>> from headstart.report import build_report
    >>> build_report("run")                  # run/report.html and run/plots/*.png
"""

from .analysis import Predictions, calibration, most_confused, top_losses
from .build import PLOTS, REPORT_FILE, build_report

__all__ = ["build_report", "Predictions", "calibration", "most_confused", "top_losses", "REPORT_FILE", "PLOTS"]
