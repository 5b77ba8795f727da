"""Perceptual Real-SR comparisons: pyiqa metrics under a pinned protocol, tables and image grids.

pyiqa is optional (`pip install dalpsr[metrics]`) and imported only when metrics are built; its licence
restricts commercial use.
"""

from dalpsr.evaluation.evaluate import CompareResult, EvalResult, compare_methods, evaluate_folder
from dalpsr.evaluation.grids import GridLayout, make_grid, pick_regions
from dalpsr.evaluation.metrics import MetricProtocol, build_metrics, score
from dalpsr.evaluation.pairing import Pairing, align_sizes, pair_folders
from dalpsr.evaluation.weights import MissingWeightsError, missing_weight_files

__all__ = [
    "CompareResult",
    "EvalResult",
    "GridLayout",
    "MetricProtocol",
    "MissingWeightsError",
    "Pairing",
    "align_sizes",
    "build_metrics",
    "compare_methods",
    "evaluate_folder",
    "make_grid",
    "missing_weight_files",
    "pair_folders",
    "pick_regions",
    "score",
]
