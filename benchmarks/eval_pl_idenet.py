"""Evaluate PL-IDENet against bicubic and DAT-light under the blind-SR protocols, with the kernel error.

Setting 1: Set5 HR (cropped to a multiple of the scale) × the 8 Gaussian8 kernels (σ 1.8–3.2 for ×4), blurred
and bicubic-downsampled (`dalpsr.degradations.gaussian8`). Setting 2: held-out HR photos, each with one
DIV2KRK-style anisotropic kernel drawn from a seed derived from its file name. Scores: PSNR/SSIM on the Y channel
(BT.601 YCbCr), border = scale, 8-bit outputs. Kernel error of PL-IDENet's estimate against the applied kernel:
|σ̂ − σ| (σ = RMS spread per axis, `kernel_sigma`) and Σ|k̂ − k|, beside two estimators that look at no image:
the bicubic-only delta kernel (σ = 0) and the constant isotropic kernel at the middle of the training σ range;
the correlation of σ̂ with σ over each setting's cases (does the estimate follow the blur?); with
`--degradation-model`, the same in LR pixels for the prompt decoder's blur bin (its midpoint).

    python benchmarks/eval_pl_idenet.py --model weights/pl_idenet_tiny --json out.json --kernel-png kernels.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dalpsr.evaluation.degradation import pearson

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# PL-IDENet's published ×4 figures (PSNR, SSIM): Setting 1 Set5, Setting 2 DIV2KRK
PAPER = {"setting1": (31.92, 0.8860), "setting2": (28.82, 0.7886)}
PRIOR_SIGMA = 2.1  # middle of the training σ range [0.2, 4.0]
METHODS = ("bicubic", "dat_light", "pl_idenet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="PLIDENet folder (config.json + safetensors); none: skip it")
    p.add_argument("--dat-model", default=str(ROOT / "weights" / "dat_light_x4"), help="DATRestorer folder; '': skip")
    p.add_argument(
        "--degradation-model",
        default="shipped",
        help="degradation encoder + prompt decoder folder whose blur bin is compared with the kernel σ ('shipped': "
        "weights/degradation_tiny; '': skip)",
    )
    p.add_argument(
        "--kernel-only",
        action="store_true",
        help="run only PL-IDENet's kernel estimator (kernel errors; no PL-IDENet PSNR/SSIM): minutes instead of ~30",
    )
    p.add_argument("--previous", nargs="*", help="--json files of earlier runs on the same cases: merge their scores")
    p.add_argument("--setting2-crop", type=int, default=None, help="centre-crop the held-out HR to this size")
    p.add_argument("--set5", default=str(DATA / "paired" / "Set5" / "hr"))
    p.add_argument("--setting2-dir", default=str(DATA / "paired" / "DRealSR" / "hr"), help="held-out HR photos")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N images of each set (quick runs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write every per-image score here")
    p.add_argument("--kernel-png", default=None, help="write a picture of applied vs estimated kernels here")
    return p.parse_args(argv)


def mod_crop(hr: torch.Tensor, scale: int) -> torch.Tensor:
    h, w = hr.shape[-2:]
    return hr[..., : h - h % scale, : w - w % scale]


def cases(args) -> list[dict]:
    """Every (setting, image, kernel) case with its HR, LR and applied kernel."""
    from dalpsr.degradations.gaussian8 import blur_downsample, div2krk_kernel, gaussian8_kernels, gaussian8_sigmas
    from dalpsr.image_io import list_images, load_image
    from dalpsr.runtime import seeded_generator

    out = []
    kernels = gaussian8_kernels(args.scale)
    for path in list_images([Path(args.set5)])[: args.limit]:
        hr = mod_crop(load_image(path).rgb, args.scale)
        for sigma, k in zip(gaussian8_sigmas(args.scale), kernels):
            lr = blur_downsample(hr[None], k, args.scale)[0]
            out.append({"setting": "setting1", "name": f"{path.stem}/sigma{sigma:.1f}", "hr": hr, "lr": lr, "k": k})
    for path in list_images([Path(args.setting2_dir)])[: args.limit]:
        hr = load_image(path).rgb
        if args.setting2_crop:
            c = args.setting2_crop
            top, left = max(0, (hr.shape[-2] - c) // 2), max(0, (hr.shape[-1] - c) // 2)
            hr = hr[:, top : top + c, left : left + c]
        hr = mod_crop(hr, args.scale)
        params, k = div2krk_kernel(seeded_generator(args.seed, "div2krk", path.name), args.scale)
        lr = blur_downsample(hr[None], k, args.scale)[0]
        out.append({"setting": "setting2", "name": path.stem, "hr": hr, "lr": lr, "k": k, "kernel_params": params})
    return out


def kernel_png(pairs: list[tuple[torch.Tensor, torch.Tensor]], path: str, per_row: int = 4) -> None:
    """(applied | estimated) kernel pairs, `per_row` pairs a row, each kernel scaled to its own maximum."""
    import numpy as np
    from PIL import Image

    tiles = [
        np.concatenate([np.pad((k / k.max()).numpy(), 1) for k in pair] + [np.zeros((23, 4))], 1) for pair in pairs
    ]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % per_row)
    grid = np.concatenate([np.concatenate(tiles[i : i + per_row], 1) for i in range(0, len(tiles), per_row)], 0)
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((grid.shape[1] * 6, grid.shape[0] * 6), Image.NEAREST)
    img.save(path)


@torch.no_grad()
def main(args: argparse.Namespace) -> dict:
    from dalpsr.degradations.kernels import gaussian_family_kernel
    from dalpsr.evaluation.metrics import MetricProtocol, build_metrics, score
    from dalpsr.models.fusion import DATRestorer
    from dalpsr.models.pl_idenet import PLIDENet, kernel_sigma

    torch.set_num_threads(args.threads)
    model = PLIDENet.from_pretrained(args.model).eval() if args.model else None
    dat = DATRestorer.from_pretrained(args.dat_model).eval() if args.dat_model else None
    protocol = MetricProtocol(color="y", color_space="ycbcr", crop_border=args.scale, round_8bit=True)
    metrics, errors = build_metrics(["psnr", "ssim"], protocol)
    if errors:
        raise RuntimeError(f"metrics could not be built: {errors}")
    previous = {}
    for path in args.previous or []:
        for row in json.loads(Path(path).read_text())["rows"]:
            previous.setdefault((row["setting"], row["name"]), {}).update(row)
    describe = None
    if model is not None and args.degradation_model:
        from dalpsr.degradations.vocabulary import BLUR_SIGMA_MAX, TYPES
        from dalpsr.loaders.degradation import load_degradation_models
        from dalpsr.models.prompt_decoder import describe_image

        encoder, decoder, _ = load_degradation_models(
            None if args.degradation_model == "shipped" else args.degradation_model
        )
        blur_bins = TYPES[0].bins

        def describe(lr):  # the reported blur bin's midpoint σ (image pixels), 0 when no blur is reported
            b = describe_image(encoder, decoder, lr).bins[0]["blur"]
            return 0.0 if b is None else (blur_bins[b].low + blur_bins[b].high) / 2 * BLUR_SIGMA_MAX

    size = model.config.kernel_size if model is not None else 21
    delta = torch.zeros(size, size)
    delta[size // 2, size // 2] = 1
    prior = gaussian_family_kernel("iso", size, PRIOR_SIGMA, PRIOR_SIGMA, 0.0).float()
    rows, pairs, seconds = [], [], {"pl_idenet": 0.0, "dat_light": 0.0}
    for case in cases(args):
        hr, lr, k_true = case["hr"], case["lr"], case["k"]
        row = dict(previous.get((case["setting"], case["name"]), {}))
        row.update(setting=case["setting"], name=case["name"], **case.get("kernel_params", {}))
        outputs = {"bicubic": F.interpolate(lr[None], size=hr.shape[-2:], mode="bicubic", align_corners=False)[0]}
        if dat is not None:
            t = time.perf_counter()
            outputs["dat_light"] = dat.super_resolve(lr[None])[0].float()
            seconds["dat_light"] += time.perf_counter() - t
        if model is not None:
            t = time.perf_counter()
            if args.kernel_only:
                k_est = model.estimate_kernel(lr[None])[0]
            else:
                out = model(lr[None])
                outputs["pl_idenet"], k_est = out.sample[0], out.kernel[0]
            seconds["pl_idenet"] += time.perf_counter() - t
            sigma = float(kernel_sigma(k_true[None])[0])
            row["sigma_true"], row["sigma_est"] = sigma, float(kernel_sigma(k_est[None])[0])
            for name, k in (("est", k_est), ("delta", delta), ("prior", prior)):
                row[f"sigma_error_{name}"] = abs(float(kernel_sigma(k[None])[0]) - sigma)
                row[f"kernel_l1_{name}"] = float((k - k_true).abs().sum())
            pairs.append((case["setting"], k_true, k_est))
            if describe is not None:
                # in LR pixels, the unit of the decoder's bins (trained at scale 1): the HR blur σ / scale
                row["sigma_lr_decoder"] = describe(lr)
                row["sigma_lr_error_est"] = abs(row["sigma_est"] - sigma) / args.scale
                row["sigma_lr_error_decoder"] = abs(row["sigma_lr_decoder"] - sigma / args.scale)
                row["sigma_lr_error_prior"] = abs(PRIOR_SIGMA - sigma) / args.scale
        for method, sr in outputs.items():
            for k, m in metrics.items():
                row[f"{method}_{k}"] = score(m, sr.clamp(0, 1), hr, protocol)
        rows.append(row)
        print(
            f"{row['name']:28s} "
            + "  ".join(f"{m} {row[f'{m}_psnr']:.2f}" for m in METHODS if f"{m}_psnr" in row)
            + (f"  σ {row['sigma_true']:.2f} → {row['sigma_est']:.2f}" if "sigma_est" in row else ""),
            flush=True,
        )
    summary = summarise(rows)
    summary["seconds"] = seconds
    print_table(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "rows": rows}, indent=2))
    if args.kernel_png and pairs:
        # Set5's first image under the 8 kernels, then the first 8 held-out photos
        chosen = [p for p in pairs if p[0] == "setting1"][:8] + [p for p in pairs if p[0] == "setting2"][:8]
        kernel_png([(k, e) for _, k, e in chosen], args.kernel_png)
    return summary


def summarise(rows: list[dict]) -> dict:
    """Means per setting of every score present in all of that setting's rows."""
    out = {}
    for setting in ("setting1", "setting2"):
        sel = [r for r in rows if r["setting"] == setting]
        if not sel:
            continue
        keys = [f"{m}_{k}" for m in METHODS for k in ("psnr", "ssim")]
        keys += [f"{e}_{n}" for e in ("sigma_error", "kernel_l1") for n in ("est", "delta", "prior")]
        keys += ["sigma_lr_error_est", "sigma_lr_error_decoder", "sigma_lr_error_prior"]
        out[setting] = {"n": len(sel)}
        out[setting].update({k: sum(r[k] for r in sel) / len(sel) for k in keys if all(k in r for r in sel)})
        for name, key in (("est", "sigma_est"), ("decoder", "sigma_lr_decoder")):
            if all(key in r for r in sel):
                out[setting][f"sigma_corr_{name}"] = pearson([r[key] for r in sel], [r["sigma_true"] for r in sel])
    return out


def _corr(value) -> str:
    return "n/a (constant)" if value is None else f"{value:.3f}"


def print_table(summary: dict) -> None:
    names = {"setting1": "Set5, Setting 1 (Gaussian8)", "setting2": "held-out, Setting 2 (DIV2KRK-style)"}
    print("\n| set | n | bicubic | DAT-light (shipped) | PL-IDENet tiny (here) | PL-IDENet paper |")
    print("|---|---:|---:|---:|---:|---:|")
    for setting, s in summary.items():
        if setting not in names:
            continue
        cells = [f"{s[f'{m}_psnr']:.2f} / {s[f'{m}_ssim']:.4f}" if f"{m}_psnr" in s else "–"
                 for m in ("bicubic", "dat_light", "pl_idenet")]  # fmt: skip
        paper = PAPER[setting]
        print(f"| {names[setting]} | {s['n']} | " + " | ".join(cells) + f" | {paper[0]:.2f} / {paper[1]:.4f} |")
    print("\n| set | kernel error | PL-IDENet estimate | delta (bicubic only) | constant σ = 2.1 |")
    print("|---|---|---:|---:|---:|")
    for setting, s in summary.items():
        if setting not in names:
            continue
        for e, label in (("sigma_error", "mean abs(σ̂ − σ), HR px"), ("kernel_l1", "mean sum abs(k̂ − k)")):
            if f"{e}_est" not in s:
                continue
            print(
                f"| {names[setting]} | {label} | {s[f'{e}_est']:.3f} | {s[f'{e}_delta']:.3f} | {s[f'{e}_prior']:.3f} |"
            )
    if any("sigma_corr_est" in s for s in summary.values() if isinstance(s, dict)):
        print("\n| set | corr(σ̂, σ), PL-IDENet | corr(σ̂, σ), prompt decoder blur bin |")
        print("|---|---:|---:|")
        for setting, s in summary.items():
            if setting in names and "sigma_corr_est" in s:
                print(f"| {names[setting]} | {_corr(s['sigma_corr_est'])} | {_corr(s.get('sigma_corr_decoder'))} |")
    if any("sigma_lr_error_est" in s for s in summary.values() if isinstance(s, dict)):
        print(
            "\n| set | mean abs(σ̂ − σ), LR px | PL-IDENet kernel σ / scale | prompt decoder blur bin (midpoint) "
            "| constant σ = 2.1 / scale |"
        )
        print("|---|---|---:|---:|---:|")
        for setting, s in summary.items():
            if setting in names and "sigma_lr_error_est" in s:
                est, dec, prior = s["sigma_lr_error_est"], s["sigma_lr_error_decoder"], s["sigma_lr_error_prior"]
                print(f"| {names[setting]} | σ_HR / scale | {est:.3f} | {dec:.3f} | {prior:.3f} |")


if __name__ == "__main__":
    main(parse_args())
