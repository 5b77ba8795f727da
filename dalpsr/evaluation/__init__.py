"""Perceptual Real-SR comparisons: pyiqa metrics under a pinned protocol, tables and image grids.

pyiqa is optional (`pip install dalpsr[metrics]`) and imported only when metrics are built; its licence
restricts commercial use.
"""

from __future__ import annotations

from dalpsr._lazy import lazy_getattr

# public name → defining module; imported on first use so the `dalpsr` command starts fast
_EXPORTS = {
    "CompareResult": "dalpsr.evaluation.evaluate",
    "EvalResult": "dalpsr.evaluation.evaluate",
    "GridLayout": "dalpsr.evaluation.grids",
    "MetricProtocol": "dalpsr.evaluation.metrics",
    "MissingWeightsError": "dalpsr.evaluation.weights",
    "Pairing": "dalpsr.evaluation.pairing",
    "align_sizes": "dalpsr.evaluation.pairing",
    "build_metrics": "dalpsr.evaluation.metrics",
    "compare_methods": "dalpsr.evaluation.evaluate",
    "evaluate_folder": "dalpsr.evaluation.evaluate",
    "make_grid": "dalpsr.evaluation.grids",
    "missing_weight_files": "dalpsr.evaluation.weights",
    "pair_folders": "dalpsr.evaluation.pairing",
    "pick_regions": "dalpsr.evaluation.grids",
    "score": "dalpsr.evaluation.metrics",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
