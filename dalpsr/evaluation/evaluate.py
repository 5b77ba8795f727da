"""Scoring folders of images: `evaluate_folder` (one method) and `compare_methods` (several)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from dalpsr.batch import Shard, ShardProgress
from dalpsr.evaluation.metrics import Metric, MetricProtocol, build_metrics, score
from dalpsr.evaluation.pairing import align_sizes, pair_folders
from dalpsr.evaluation.tables import csv_text, markdown_table
from dalpsr.image_io import atomic_write_bytes, load_image


@dataclass
class EvalResult:
    """Scores of one method.

    Args:
        rows: one dict per scored image: {"image": stem, metric: value, ...}; a failed cell is NaN.
        means: metric → mean over the images where it is finite.
        counts: metric → number of images in its mean.
        lower_better: metric → direction, for the metrics that were built.
        skipped: stem → why the image was not scored (size mismatch, unreadable file).
        cell_errors: "stem/metric" → why that one score failed.
        metric_errors: metric → why it could not be built (missing weights, unknown name).
        notes: stem → size reconciliation applied.
        pairing_report: lines about unmatched and duplicate files.
    """

    rows: list[dict]
    means: dict[str, float]
    counts: dict[str, int]
    lower_better: dict[str, bool]
    protocol: dict
    skipped: dict[str, str] = field(default_factory=dict)
    cell_errors: dict[str, str] = field(default_factory=dict)
    metric_errors: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    pairing_report: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.rows)

    def summary(self) -> dict:
        return {
            "metrics": self.means,
            "protocol": self.protocol,
            "n": self.n,
            "n_per_metric": self.counts,
            "lower_better": self.lower_better,
            "skipped": self.skipped,
            "metric_errors": self.metric_errors,
            "cell_errors": self.cell_errors,
            "size_notes": self.notes,
            "pairing": self.pairing_report,
        }


def _check_fr(metrics: dict[str, Metric], has_gt: bool, errors: dict[str, str]) -> dict[str, Metric]:
    if has_gt:
        return metrics
    usable = {}
    for name, m in metrics.items():
        if m.mode == "FR":
            errors[name] = f"metric `{name}` is full-reference and needs `--gt`."
        else:
            usable[name] = m
    return usable


def score_pairs(
    files: dict[str, tuple[Path, Path | None]],
    metrics: dict[str, Metric],
    protocol: MetricProtocol,
    progress: bool = True,
    desc: str = "eval",
) -> tuple[list[dict], dict[str, str], dict[str, str], dict[str, str]]:
    """Score stem → (prediction file, GT file or None); returns (rows, skipped, cell errors, size notes)."""
    from tqdm.auto import tqdm

    rows, skipped, cell_errors, notes = [], {}, {}, {}
    for stem, (pred_path, gt_path) in tqdm(files.items(), desc=desc, disable=not progress, unit="img"):
        try:
            pred = load_image(pred_path).rgb
            gt = load_image(gt_path).rgb if gt_path is not None else None
            if gt is not None:
                pred, gt, note = align_sizes(pred, gt, protocol.size_mismatch)
                if note:
                    notes[stem] = note
        except (OSError, ValueError) as err:
            skipped[stem] = str(err)
            continue
        row: dict = {"image": stem}
        for name, metric in metrics.items():
            try:
                row[name] = score(metric, pred, gt, protocol)
            except (RuntimeError, ValueError, AssertionError) as err:
                row[name] = math.nan
                cell_errors[f"{stem}/{name}"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    return rows, skipped, cell_errors, notes


def _means(rows: list[dict], names: list[str]) -> tuple[dict[str, float], dict[str, int]]:
    means, counts = {}, {}
    for name in names:
        vals = [r[name] for r in rows if math.isfinite(r.get(name, math.nan))]
        counts[name] = len(vals)
        means[name] = sum(vals) / len(vals) if vals else math.nan
    return means, counts


def _score_shard(
    files: dict[str, tuple[Path, Path | None]],
    metrics: dict[str, Metric],
    protocol: MetricProtocol,
    progress: bool,
    shard: Shard,
) -> tuple[list[dict], dict[str, str], dict[str, str], dict[str, str]]:
    """`score_pairs` on this process's images, gathered from all processes in `files` order."""
    parts: list[tuple[str, tuple]] = []
    with ShardProgress(shard, len(files), "eval", enabled=progress) as bar:
        for stem in shard.take(list(files)):
            parts.append((stem, score_pairs({stem: files[stem]}, metrics, protocol, progress=False)))
            bar.update()
    order = {stem: i for i, stem in enumerate(files)}
    parts = sorted(shard.gather(parts), key=lambda part: order[part[0]])
    rows = [row for _, (r, *_) in parts for row in r]
    skipped, cell_errors, notes = ({k: v for _, part in parts for k, v in part[i].items()} for i in (1, 2, 3))
    return rows, skipped, cell_errors, notes


def evaluate_folder(
    pred: str | os.PathLike,
    gt: str | os.PathLike | None = None,
    metrics: list[str] | None = None,
    protocol: MetricProtocol | None = None,
    weights_dir: str | os.PathLike | None = None,
    progress: bool = True,
    shard: Shard | None = None,
) -> EvalResult:
    """Score a folder of predictions, optionally against GT files with the same stems.

    Args:
        pred: folder of predicted images.
        gt: folder of ground-truth images (needed for full-reference metrics).
        metrics: pyiqa metric names; default psnr and ssim with `gt`, niqe without.
        protocol: scoring protocol; default `MetricProtocol()`.
        weights_dir: TORCH_HOME-style folder with `hub/pyiqa/` etc. (see `dalpsr.evaluation.weights`).
        shard: this process's share of a multi-process run (`Shard.current()`): it scores every `count`-th image
            and every process gets the scores of all.
    """
    protocol = protocol or MetricProtocol()
    names = metrics or (["psnr", "ssim"] if gt is not None else ["niqe"])
    built, errors = build_metrics(names, protocol, weights_dir)
    built = _check_fr(built, gt is not None, errors)
    folders = {"pred": pred} if gt is None else {"pred": pred, "gt": gt}
    pairing = pair_folders(folders)
    files = {s: (pairing.files["pred"][s], pairing.files["gt"][s] if gt is not None else None) for s in pairing.stems}
    if shard is None or shard.count == 1:
        rows, skipped, cell_errors, notes = score_pairs(files, built, protocol, progress)
    else:
        rows, skipped, cell_errors, notes = _score_shard(files, built, protocol, progress, shard)
    means, counts = _means(rows, list(built))
    return EvalResult(
        rows,
        means,
        counts,
        {n: m.lower_better for n, m in built.items()},
        protocol.to_dict() | {"metric_options": {n: m.options for n, m in built.items()}},
        skipped,
        cell_errors,
        errors,
        notes,
        pairing.report_lines(),
    )


def write_eval_outputs(result: EvalResult, out_dir: str | os.PathLike, label: str = "pred") -> None:
    """Write `per_image.csv`, `summary.json` and `table.md` to `out_dir` (each atomically)."""
    out = Path(out_dir)
    columns = ["image", *result.lower_better]
    atomic_write_bytes(out / "per_image.csv", csv_text(result.rows, columns).encode())
    atomic_write_bytes(out / "summary.json", (json.dumps(_jsonable(result.summary()), indent=2) + "\n").encode())
    table = markdown_table({label: result.means}, result.lower_better)
    atomic_write_bytes(out / "table.md", (table + "\n" + protocol_line(result.protocol, result.n) + "\n").encode())


def protocol_line(protocol: dict, n: int) -> str:
    """One human-readable sentence with the protocol, for under a table."""
    luma = f"{protocol['luma']}" if protocol["color"] == "y" else "RGB"
    used = [m for m in protocol["luma_metrics"] if m in protocol.get("metric_options", {})]
    channel = f"{', '.join(used)} on {luma}; " if used else ""
    return (
        f"n = {n} images; {channel}crop border "
        f"{protocol['crop_border']} px (full-reference metrics); 8-bit rounding "
        f"{'on' if protocol['round_8bit'] else 'off'}; size mismatch: {protocol['size_mismatch']}."
    )


def _jsonable(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


@dataclass
class CompareResult:
    """Per-method results over the same set of images (stems present in every folder)."""

    methods: dict[str, EvalResult]
    stems: list[str]
    lower_better: dict[str, bool]
    protocol: dict
    metric_errors: dict[str, str]
    pairing_report: list[str]

    def table(self) -> str:
        return markdown_table({name: r.means for name, r in self.methods.items()}, self.lower_better)


def compare_methods(
    methods: dict[str, str | os.PathLike],
    gt: str | os.PathLike | None = None,
    lr: str | os.PathLike | None = None,
    metrics: list[str] | None = None,
    protocol: MetricProtocol | None = None,
    weights_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> CompareResult:
    """Score several methods on the images they all share (and that GT / LR have, when given).

    Args:
        methods: method name → folder of its outputs.
        gt: ground-truth folder; lr: LR input folder (only restricts pairing here; used by grids).
    """
    if not methods:
        raise ValueError("`methods` is empty; pass at least one NAME=DIR.")
    reserved = sorted(n for n in methods if n.lower() in ("gt", "lr"))
    if reserved:
        raise ValueError(f"`methods` may not use the names {reserved}; they label the GT/LR folders.")
    protocol = protocol or MetricProtocol()
    names = metrics or (["psnr", "ssim"] if gt is not None else ["niqe"])
    built, errors = build_metrics(names, protocol, weights_dir)
    built = _check_fr(built, gt is not None, errors)
    folders: dict[str, str | os.PathLike] = dict(methods)
    if gt is not None:
        folders["gt"] = gt
    if lr is not None:
        folders["lr"] = lr
    pairing = pair_folders(folders)
    results = {}
    proto = protocol.to_dict() | {"metric_options": {n: m.options for n, m in built.items()}}
    for name in methods:
        files = {s: (pairing.files[name][s], pairing.files["gt"][s] if gt is not None else None) for s in pairing.stems}
        rows, skipped, cell_errors, notes = score_pairs(files, built, protocol, progress, desc=name)
        means, counts = _means(rows, list(built))
        results[name] = EvalResult(
            rows,
            means,
            counts,
            {n: m.lower_better for n, m in built.items()},
            proto,
            skipped,
            cell_errors,
            errors,
            notes,
            pairing.report_lines(),
        )
    return CompareResult(
        results,
        pairing.stems,
        {n: m.lower_better for n, m in built.items()},
        proto,
        errors,
        pairing.report_lines(),
    )


def write_compare_outputs(result: CompareResult, out_dir: str | os.PathLike) -> None:
    """Write `per_image.csv` (one row per method and image), `summary.json` and `table.md` atomically."""
    out = Path(out_dir)
    rows = [{"method": m, **row} for m, r in result.methods.items() for row in r.rows]
    atomic_write_bytes(out / "per_image.csv", csv_text(rows, ["method", "image", *result.lower_better]).encode())
    n = len(result.stems)
    summary = {
        "methods": {m: r.means for m, r in result.methods.items()},
        "protocol": result.protocol,
        "n": n,
        "lower_better": result.lower_better,
        "metric_errors": result.metric_errors,
        "skipped": {m: r.skipped for m, r in result.methods.items()},
        "cell_errors": {m: r.cell_errors for m, r in result.methods.items()},
        "pairing": result.pairing_report,
    }
    atomic_write_bytes(out / "summary.json", (json.dumps(_jsonable(summary), indent=2) + "\n").encode())
    text = result.table() + "\n" + protocol_line(result.protocol, n) + "\n"
    atomic_write_bytes(out / "table.md", text.encode())
