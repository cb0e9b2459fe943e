"""The study report: event files in, an HTML page with figures out.

Example:

>>> import tempfile
>>> from keras_fim.reports import find_runs, rank_runs
>>> rank_runs(find_runs(tempfile.mkdtemp())).correlations["early C_K_bar"]
(nan, nan)
"""

from keras_fim.reports.html import write_report
from keras_fim.reports.ranking import Ranking, rank_runs
from keras_fim.reports.records import RunRecord, find_runs, read_run

__all__ = ["Ranking", "RunRecord", "find_runs", "rank_runs", "read_run", "write_report"]
