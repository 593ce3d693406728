"""Offline HTML report of a run: summary, learning curves + diagnosis, confusion matrix, CAM galleries.

``build_report(run_dir)`` writes ``<run>/report/index.html`` plus its PNG figures and a
``summary.json`` with the numbers shown.  It needs no model and no GPU, reads the CAM file in
bounded-memory windows, and works offline (no CDN, no scripts).
"""

from __future__ import annotations

from cnncam.report.build import build_report as build_report
from cnncam.report.diagnose import Curves as Curves
from cnncam.report.diagnose import Diagnosis as Diagnosis
from cnncam.report.diagnose import Thresholds as Thresholds
from cnncam.report.diagnose import curves as curves
from cnncam.report.diagnose import diagnose as diagnose
