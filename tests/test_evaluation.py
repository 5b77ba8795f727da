"""Tests for dalpsr.evaluation: metric protocol, pairing, weights, tables, grids and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pyiqa")
skimage_metrics = pytest.importorskip("skimage.metrics")

from dalpsr.cli import main  # noqa: E402
from dalpsr.evaluation import (  # noqa: E402
    MetricProtocol,
    align_sizes,
    build_metrics,
    evaluate_folder,
    make_grid,
    missing_weight_files,
    pair_folders,
    pick_regions,
    score,
)
from dalpsr.evaluation import weights as weights_mod  # noqa: E402
from dalpsr.evaluation.tables import markdown_table  # noqa: E402

SHARED = Path(__file__).parents[2] / "shared" / "data"


def _pair(seed: int = 0, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth 8-bit image and a noisy, blurred version of it (3×H×W in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, size // 8, size // 8, generator=g)
    gt = torch.nn.functional.interpolate(base, size=(size, size), mode="bicubic", align_corners=False)[0]
    gt = (gt.clamp(0, 1) * 255).round() / 255
    pred = gt + 0.05 * torch.randn(gt.shape, generator=g)
    pred = (pred.clamp(0, 1) * 255).round() / 255
    return pred, gt


def _y_ycbcr(x: torch.Tensor) -> np.ndarray:
    """BT.601 Y in [16, 235] as float64 (H×W), from 3×H×W in [0, 1]."""
    r, g, b = (x.double() * 255).numpy()
    return 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def _y_yiq(x: torch.Tensor) -> np.ndarray:
    r, g, b = (x.double() * 255).numpy()
    return 0.299 * r + 0.587 * g + 0.114 * b


def _crop(a: np.ndarray, border: int) -> np.ndarray:
    return a[border:-border, border:-border]


@pytest.fixture(scope="module")
def fr_metrics():
    built, errors = build_metrics(["psnr", "ssim"], MetricProtocol())
    assert errors == {}
    return built


def test_psnr_ssim_equal_scikit_image_on_y_channel(fr_metrics):
    proto = MetricProtocol()  # Y of BT.601 YCbCr, crop border 4, 8-bit rounding
    for seed in range(3):
        pred, gt = _pair(seed)
        yp, yg = _crop(_y_ycbcr(pred), 4), _crop(_y_ycbcr(gt), 4)
        ref_psnr = skimage_metrics.peak_signal_noise_ratio(yg, yp, data_range=255)
        assert score(fr_metrics["psnr"], pred, gt, proto) == pytest.approx(ref_psnr, abs=1e-4)
        # pyiqa's SSIM rounds Y to 8-bit levels; Gaussian window sigma 1.5 (11 taps), population covariance.
        ref_ssim = skimage_metrics.structural_similarity(
            yg.round(),
            yp.round(),
            data_range=255,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert score(fr_metrics["ssim"], pred, gt, proto) == pytest.approx(ref_ssim, abs=1e-5)


def test_rgb_psnr_equals_scikit_image():
    proto = MetricProtocol(color="rgb", crop_border=0)
    built, _ = build_metrics(["psnr"], proto)
    pred, gt = _pair(5)
    ref = skimage_metrics.peak_signal_noise_ratio(gt.double().numpy(), pred.double().numpy(), data_range=1.0)
    assert score(built["psnr"], pred, gt, proto) == pytest.approx(ref, abs=1e-4)


def test_yiq_reads_lower_than_ycbcr_by_the_y_range_ratio():
    pred, gt = _pair(1)
    values = {}
    for space in ("ycbcr", "yiq"):
        proto = MetricProtocol(color_space=space)
        built, _ = build_metrics(["psnr"], proto)
        values[space] = score(built["psnr"], pred, gt, proto)
    ref_yiq = skimage_metrics.peak_signal_noise_ratio(_crop(_y_yiq(gt), 4), _crop(_y_yiq(pred), 4), data_range=255)
    assert values["yiq"] == pytest.approx(ref_yiq, abs=1e-3)
    # YCbCr's Y spans 219 levels, YIQ's 255: the same error reads 20*log10(255/219) = 1.32 dB lower in YIQ.
    assert values["ycbcr"] - values["yiq"] == pytest.approx(20 * math.log10(255 / 219), abs=2e-3)


def test_protocol_rejects_bad_values():
    with pytest.raises(ValueError, match="`color_space`"):
        MetricProtocol(color_space="lab")
    with pytest.raises(ValueError, match="`crop_border`"):
        MetricProtocol(crop_border=-1)
    with pytest.raises(ValueError, match="`size_mismatch`"):
        MetricProtocol(size_mismatch="pad")


def _save(path: Path, tensor: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


def test_pairing_reports_unmatched_and_duplicates(tmp_path):
    img = _pair(0, 16)[0]
    for name in ("a.png", "a.jpg", "b.png", "c.png"):
        _save(tmp_path / "pred" / name, img)
    for name in ("a.png", "b.png", "d.png"):
        _save(tmp_path / "gt" / name, img)
    pairing = pair_folders({"pred": tmp_path / "pred", "gt": tmp_path / "gt"})
    assert pairing.stems == ["a", "b"]
    assert pairing.unmatched == {"pred": ["c"], "gt": ["d"]}
    assert pairing.duplicates["pred"] == ["a"]
    assert pairing.files["pred"]["a"].name == "a.jpg"  # sorted order: a.jpg before a.png
    text = "\n".join(pairing.report_lines())
    assert "`pred`" in text and "c" in text and "`gt`" in text and "d" in text
    with pytest.raises(ValueError, match="`gt`"):
        pair_folders({"gt": tmp_path / "missing"})


def test_size_mismatch_policies(tmp_path):
    pred, gt = _pair(2, 32)
    big = torch.nn.functional.pad(gt, (0, 3, 0, 2))
    with pytest.raises(ValueError, match="size mismatch"):
        align_sizes(pred, big, "skip")
    p2, g2, note = align_sizes(pred, big, "crop")
    assert p2.shape == g2.shape == (3, 32, 32) and torch.equal(g2, gt) and "cropped" in note
    p3, g3, note = align_sizes(pred, big, "resize")
    assert p3.shape == g3.shape == (3, 34, 35) and "resized" in note

    _save(tmp_path / "pred" / "x.png", pred)
    _save(tmp_path / "gt" / "x.png", big)
    _save(tmp_path / "pred" / "y.png", pred)
    _save(tmp_path / "gt" / "y.png", gt)
    res = evaluate_folder(tmp_path / "pred", tmp_path / "gt", ["psnr"], progress=False)
    assert [r["image"] for r in res.rows] == ["y"] and "size mismatch" in res.skipped["x"]
    res = evaluate_folder(
        tmp_path / "pred", tmp_path / "gt", ["psnr"], MetricProtocol(size_mismatch="crop"), progress=False
    )
    assert [r["image"] for r in res.rows] == ["x", "y"] and "x" in res.notes
    assert res.rows[0]["psnr"] == pytest.approx(res.rows[1]["psnr"], abs=1e-6)


def test_missing_weights_give_one_clear_error_and_others_run(tmp_path):
    built, errors = build_metrics(["psnr", "lpips", "brisque", "nosuch"], MetricProtocol(), weights_dir=tmp_path)
    assert set(built) == {"psnr"}
    assert "`metrics`" in errors["nosuch"] and "list_models" in errors["nosuch"]
    assert "LPIPS_v0.1_alex-df73285e.pth" in errors["lpips"]
    assert str(tmp_path / "hub" / "pyiqa" / "LPIPS_v0.1_alex-df73285e.pth") in errors["lpips"]
    assert str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in errors["lpips"]
    assert str(tmp_path / "hub" / "pyiqa" / "brisque_svm_weights.pth") in errors["brisque"]
    assert [m.expected_path.name for m in missing_weight_files("brisque", tmp_path)] == ["brisque_svm_weights.pth"]
    assert missing_weight_files("psnr", tmp_path) == []
    # NIQE's parameters ship with dalpsr (weights/niqe): it builds with an empty weights folder
    built, errors = build_metrics(["niqe"], MetricProtocol(), weights_dir=tmp_path)
    assert set(built) == {"niqe"} and errors == {}


def test_download_attempts_are_refused_and_state_restored(tmp_path, monkeypatch):
    """A metric missing from the ahead-of-time table still never downloads: pyiqa's attempt is refused."""
    monkeypatch.delitem(weights_mod.HUB_FILES, "brisque")
    hub_before = torch.hub.get_dir()
    built, errors = build_metrics(["brisque"], MetricProtocol(), weights_dir=tmp_path)
    assert built == {}
    assert "brisque_svm_weights.pth" in errors["brisque"]
    assert torch.hub.get_dir() == hub_before
    from pyiqa.utils import download_util

    assert download_util.download_url_to_file is torch.hub.download_url_to_file


def _write_niqe_params(path: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A parameter file in pyiqa's NIQE format: mu_prisparam 1×36, cov_prisparam 36×36 (SPD)."""
    import scipy.io

    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(1, 36))
    a = rng.normal(size=(36, 36))
    cov = a @ a.T / 36 + np.eye(36)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"mu_prisparam": mu, "cov_prisparam": cov})
    return mu, cov


def test_niqe_runs_offline_from_weights_dir(tmp_path, monkeypatch):
    from pyiqa.archs.niqe_arch import NIQE

    param_file = tmp_path / "hub" / "pyiqa" / "niqe_modelparameters.mat"
    mu, _ = _write_niqe_params(param_file)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
    built, errors = build_metrics(["niqe"], MetricProtocol(), weights_dir=tmp_path)
    assert errors == {}
    image = _pair(3, 192)[1]
    value = score(built["niqe"], image, None, MetricProtocol())
    direct = NIQE(pretrained_model_path=str(param_file))(image[None]).item()
    assert value == pytest.approx(direct, rel=1e-9)
    assert np.allclose(built["niqe"].model.net.mu_pris_param.numpy(), mu.ravel())


def test_markdown_table_marks_best_per_column():
    table = markdown_table(
        {"a": {"psnr": 25.0, "lpips": 0.30}, "b": {"psnr": 24.0, "lpips": 0.20}},
        {"psnr": False, "lpips": True},
    )
    lines = table.strip().splitlines()
    assert lines[0] == "| method | psnr ↑ | lpips ↓ |"
    assert lines[2] == "| a | **25.00** | 0.3000 |"
    assert lines[3] == "| b | 24.00 | **0.2000** |"


def test_pick_regions_finds_the_disagreement():
    base = torch.full((3, 64, 64), 0.5)
    other = base.clone()
    other[:, 40:52, 8:20] = 1.0
    regions = pick_regions([base, other], crop_size=12, count=2)
    assert regions[0] == (40, 8, 12)
    top, left, _ = regions[1]
    assert abs(top - 40) >= 12 or abs(left - 8) >= 12  # no overlap with the first region


def test_grid_layout(tmp_path):
    colours = {"LR": (1.0, 0.0, 0.0), "m1": (0.0, 1.0, 0.0), "m2": (0.0, 0.0, 1.0), "GT": (1.0, 1.0, 0.0)}
    panels = {k: torch.tensor(c).view(3, 1, 1).expand(3, 64, 64).clone() for k, c in colours.items()}
    panels["LR"] = panels["LR"][:, :16, :16].clone()
    panels["m1"][:, 8:24, 16:32] = 0.25  # distinct content inside the region
    image, layout = make_grid(panels, regions=[(8, 16, 16)], panel_width=64, margin=4, label_height=16)
    assert image.size == layout.size == (4 + 4 * (64 + 4), 4 + 16 + 64 + 4 + (64 + 4))
    assert layout.labels == ["LR", "m1", "m2", "GT"]
    for col, label in enumerate(layout.labels):
        x0 = 4 + col * 68
        assert layout.full_boxes[label] == (x0, 20, x0 + 64, 84)
        assert layout.crop_boxes[0][label] == (x0, 88, x0 + 64, 152)
    px = np.asarray(image)
    # full panels: colour away from the outline; crop panels: interior shows the zoomed region
    assert tuple(px[20 + 50, 4 + 68 * 2 + 50]) == (0, 0, 255)
    assert tuple(px[88 + 32, 4 + 68 + 32]) == (64, 64, 64)
    assert tuple(px[88 + 32, 4 + 32]) == (255, 0, 0)  # LR upscaled with nearest
    # region outline on the full panel (red = first region colour) at its scaled position
    assert tuple(px[20 + 8, 4 + 68 * 3 + 20]) == (255, 64, 64)
    with pytest.raises(ValueError, match="`regions`"):
        make_grid(panels, regions=[(60, 60, 16)])


def _tiny_dataset(root: Path) -> None:
    for i in range(3):
        pred, gt = _pair(10 + i, 32)
        _save(root / "gt" / f"im{i}.png", gt)
        _save(root / "good" / f"im{i}.png", pred)
        _save(root / "bad" / f"im{i}.png", (pred + 0.2 * (torch.rand_like(pred) - 0.5)).clamp(0, 1))
        _save(root / "lr" / f"im{i}.png", gt[:, ::4, ::4])


def test_cli_eval_writes_outputs(tmp_path, capsys):
    _tiny_dataset(tmp_path)
    out = tmp_path / "out"
    rc = main(
        ["eval", "--pred", str(tmp_path / "good"), "--gt", str(tmp_path / "gt"), "--metrics", "psnr,ssim"]
        + ["--out", str(out), "--no-progress"]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {"psnr", "ssim"} and summary["n"] == 3
    assert summary["protocol"]["color_space"] == "ycbcr" and summary["protocol"]["crop_border"] == 4
    assert summary["protocol"]["metric_options"]["psnr"] == {"test_y_channel": True, "color_space": "ycbcr"}
    rows = (out / "per_image.csv").read_text().splitlines()
    assert rows[0] == "image,psnr,ssim" and len(rows) == 4
    table = (out / "table.md").read_text()
    assert "psnr ↑" in table and "crop border 4" in table

    rc = main(
        ["eval", "--pred", str(tmp_path / "good"), "--gt", str(tmp_path / "gt"), "--metrics", "psnr", "lpips"]
        + ["--weights-dir", str(tmp_path / "noweights"), "--out", str(out), "--no-progress"]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "LPIPS_v0.1_alex-df73285e.pth" in err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["metrics"]) == ["psnr"] and "lpips" in summary["metric_errors"]


def test_cli_compare_table_and_grid(tmp_path, capsys):
    _tiny_dataset(tmp_path)
    out = tmp_path / "cmp"
    rc = main(
        ["compare", "--method", f"good={tmp_path / 'good'}", "--method", f"bad={tmp_path / 'bad'}"]
        + ["--gt", str(tmp_path / "gt"), "--lr", str(tmp_path / "lr"), "--metrics", "psnr", "ssim"]
        + ["--out", str(out), "--grid", "im1", "--crop-border", "2", "--panel-width", "48", "--no-progress"]
    )
    assert rc == 0, capsys.readouterr().err
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| method | psnr ↑ | ssim ↑ |"
    assert table[2].startswith("| good | **") and "**" not in table[3]
    grid = Image.open(out / "grids" / "im1.png")
    assert grid.size == (4 + 4 * (48 + 4), 4 + 16 + 48 + 4 + 2 * (48 + 4))
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"good", "bad"} and summary["n"] == 3
    assert main(["compare", "--method", "nodir", "--out", str(out)]) == 2


@pytest.mark.skipif(not (SHARED / "paired" / "RealSR").is_dir(), reason="shared RealSR data absent")
def test_real_pairs_bicubic_beats_nearest(tmp_path):
    lr_dir, hr_dir = SHARED / "paired" / "RealSR" / "lr_x4", SHARED / "paired" / "RealSR" / "hr"
    names = sorted(p.name for p in lr_dir.glob("*.png"))[:2]
    for name in names:
        lr = Image.open(lr_dir / name).convert("RGB")
        for label, mode in (("bicubic", Image.BICUBIC), ("nearest", Image.NEAREST)):
            (tmp_path / label).mkdir(exist_ok=True)
            lr.resize((lr.width * 4, lr.height * 4), mode).save(tmp_path / label / name)
    means = {
        label: evaluate_folder(tmp_path / label, hr_dir, ["psnr"], progress=False).means["psnr"]
        for label in ("bicubic", "nearest")
    }
    assert means["bicubic"] > means["nearest"] > 15.0
