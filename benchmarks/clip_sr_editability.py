"""CLIP-SR editability at ×8: does the degradation prompt measurably edit the result?

On fixed, seeded synthetic pairs (centre crops of Set5 and of held-out photos, each degraded `--seeds_per_image`
times by the `--preset` family at ×8, seeds derived from (seed, image name, k)):

1. true text vs wrong text: PSNR/SSIM (Y of BT.601, border 8) with each image's own degradation prompt and with
   another image's (the next pair whose prompt differs); the gap is how much the text is used;
2. monotone control: for each pair with noise, the same LR with the prompt's noise phrase set to none and then
   raised bin by bin; high-frequency energy (mean squared Laplacian of Y ×1e3, border 8) of the output per bin,
   and the share of pairs whose energy falls strictly from bin to bin;
3. no text: the prompt predictor's prompt vs the true one (per-type accuracy over none + 4 bins, beside the
   majority class), and PSNR with the predicted prompt and with the empty prompt.

Baselines: bicubic ×8, and the shipped DAT restorer (`weights/degradation_tiny`, a ×4 model, loaded by
`dalpsr.loaders.restorers.load_restorer`) run at ×4 and then bicubic ×2 to reach ×8.

    OMP_NUM_THREADS=1 python benchmarks/clip_sr_editability.py --model OUT/model --json editability.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HELD_OUT = (
    "Canon_002_LR4 Canon_013_LR4 Canon_025_LR4 Canon_036_LR4 Canon_044_LR4 Canon_048_LR4 Nikon_002_LR4 "
    "Nikon_012_LR4 Nikon_023_LR4 Nikon_037_LR4 Nikon_046_LR4 Nikon_050_LR4 DSC_1404_x1 IMG_203_x1 P1140189_x1 "
    "panasonic_50_x1 sony_11_x1"
).split()  # the photos weights/degradation_tiny and the tiny CLIP-SR run held out
SCALE = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a CLIPSR folder (training/train_clip_sr.py output: OUT/model)")
    p.add_argument("--text_encoder", default=None, help="DegradationEncoder folder; default: the shipped tiny one")
    p.add_argument(
        "--dat", default=None, help="restorer folder for the DAT baseline; default: weights/degradation_tiny"
    )
    p.add_argument("--set5", default=str(DATA / "paired" / "Set5" / "hr"))
    p.add_argument(
        "--held_out_dirs",
        nargs="*",
        default=[str(DATA / "paired" / "RealSR" / "hr"), str(DATA / "paired" / "DRealSR" / "hr")],
    )
    p.add_argument("--held_out_names", nargs="*", default=HELD_OUT)
    p.add_argument("--size", type=int, default=256, help="HR centre-crop size")
    p.add_argument("--seeds_per_image", type=int, default=2)
    p.add_argument("--preset", default="balanced")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every figure here")
    return p.parse_args(argv)


def make_pairs(paths, size: int, preset_name: str, seeds_per_image: int, seed: int) -> list[dict]:
    from dalpsr.degradations.config import preset
    from dalpsr.degradations.pipeline import degrade
    from dalpsr.image_io import load_image
    from dalpsr.runtime import derive_seed

    config = preset(preset_name, scale=SCALE)
    pairs = []
    for path in paths:
        rgb = load_image(path).rgb
        h, w = rgb.shape[-2:]
        s = min(size, h, w) // SCALE * SCALE
        top, left = (h - s) // 2, (w - s) // 2
        hr = rgb[None, :, top : top + s, left : left + s].contiguous()
        for k in range(seeds_per_image):
            out = degrade(hr, config, scale=SCALE, seeds=[derive_seed(seed, "editability", path.name, k)])
            pairs.append({"name": f"{path.stem}/{k}", "hr": hr[0], "lr": out.lr[0], "labels": out.labels[0],
                          "prompt": out.prompts[0]})  # fmt: skip
    return pairs


def hf_energy(img: torch.Tensor, border: int = SCALE) -> float:
    """Mean squared Laplacian of the BT.601 luma (×1e3), `border` px removed."""
    y = (65.481 * img[0] + 128.553 * img[1] + 24.966 * img[2] + 16.0) / 255.0
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    out = F.conv2d(y[None, None], lap)[0, 0]
    b = max(border - 1, 0)
    out = out[b : out.shape[0] - b, b : out.shape[1] - b]
    return float((out**2).mean() * 1e3)


def run_set(pairs, net, encoder, dat, dat_encoder, metrics, protocol, cache) -> dict:
    from dalpsr.degradations import vocabulary
    from dalpsr.evaluation.metrics import score
    from dalpsr.models.clip_sr import embed_prompts, labels_to_classes, swap_prompts, with_bin

    outputs: dict[str, list[torch.Tensor]] = {}
    true = [p["prompt"] for p in pairs]
    wrong = swap_prompts(true)
    preds, noise_rows = [], []
    for i, pair in enumerate(pairs):
        lr = pair["lr"][None]
        pred = net.prompt_predictor.predict(lr)
        preds.append(pred.logits.argmax(-1)[0])
        texts = {"true text": true[i], "wrong text": wrong[i], "predicted text": pred.prompts[0]}
        res = {k: net.super_resolve(lr, embed_prompts(encoder, [t], cache))[0] for k, t in texts.items()}
        res["no text"] = net.super_resolve(lr)[0]
        res["bicubic"] = F.interpolate(lr, scale_factor=SCALE, mode="bicubic", align_corners=False)[0].clamp(0, 1)
        x4 = dat.super_resolve(lr, encoder=dat_encoder)
        res["DAT ×4 + bicubic ×2"] = F.interpolate(x4, scale_factor=2, mode="bicubic", align_corners=False)[0]
        res["DAT ×4 + bicubic ×2"] = res["DAT ×4 + bicubic ×2"].clamp(0, 1)
        for k, v in res.items():
            outputs.setdefault(k, []).append(v)
        if vocabulary.labels_to_bins(pair["labels"])["noise"] is not None:
            row = []
            for b in (None, 0, 1, 2, 3):
                sr = net.super_resolve(lr, embed_prompts(encoder, [with_bin(true[i], "noise", b)], cache))[0]
                row.append(hf_energy(sr))
            noise_rows.append(row)
    table = {}
    for k, srs in outputs.items():
        table[k] = {
            m: sum(score(metric, sr, p["hr"], protocol) for sr, p in zip(srs, pairs)) / len(pairs)
            for m, metric in metrics.items()
        }
    truth = labels_to_classes(torch.stack([p["labels"] for p in pairs]))
    got = torch.stack(preds).cpu()
    accuracy = {}
    for t, name in enumerate(vocabulary.TYPE_NAMES):
        majority = torch.bincount(truth[:, t], minlength=5).max().item() / len(pairs)
        accuracy[name] = {"accuracy": float((got[:, t] == truth[:, t]).float().mean()), "majority": majority}
    exact = sum(
        p == t
        for p, t in zip(
            [
                vocabulary.labels_to_text(
                    {n: (int(c) - 1 if c > 0 else None) for n, c in zip(vocabulary.TYPE_NAMES, row)}
                )
                for row in got
            ],
            true,
        )
    )
    monotone = {}
    if noise_rows:
        rows = torch.tensor(noise_rows)
        monotone = {
            "n": len(noise_rows),
            "hf_per_bin": dict(zip(["none", "0", "1", "2", "3"], rows.mean(0).tolist())),
            "strictly_falling_bins_0_3": float((rows[:, 2:] < rows[:, 1:4]).all(1).float().mean()),
            "strictly_falling_none_3": float((rows[:, 1:] < rows[:, :4]).all(1).float().mean()),
        }
    hf_hr = sum(hf_energy(p["hr"]) for p in pairs) / len(pairs)
    return {
        "n": len(pairs),
        "scores": table,
        "gap_psnr": table["true text"]["psnr"] - table["wrong text"]["psnr"],
        "gap_ssim": table["true text"]["ssim"] - table["wrong text"]["ssim"],
        "predictor": accuracy,
        "predictor_exact_prompt": exact / len(pairs),
        "monotone_noise_control": monotone,
        "hf_hr": hf_hr,
    }


def main(args) -> dict:
    from dalpsr.evaluation.metrics import MetricProtocol, build_metrics
    from dalpsr.image_io import list_images
    from dalpsr.loaders.degradation import load_degradation_encoder, load_degradation_models
    from dalpsr.loaders.manifest import shipped_weights
    from dalpsr.loaders.restorers import load_restorer
    from dalpsr.models.clip_sr import CLIPSR

    torch.set_num_threads(1)
    net = CLIPSR.from_pretrained(args.model).eval()
    if net.config.scale != SCALE:
        raise ValueError(f"`--model` upscales ×{net.config.scale}; this benchmark is ×{SCALE}.")
    encoder = load_degradation_encoder(args.text_encoder) if args.text_encoder else load_degradation_models()[0]
    encoder.eval()
    dat, dat_encoder = load_restorer(args.dat or shipped_weights("degradation_tiny"))
    protocol = MetricProtocol(color="y", color_space="ycbcr", crop_border=SCALE, round_8bit=True)
    metrics, errors = build_metrics(["psnr", "ssim"], protocol)
    if errors:
        raise RuntimeError(f"metrics could not be built: {errors}")
    held = [q for q in list_images(args.held_out_dirs) if q.stem in set(args.held_out_names)]
    sets = {"Set5": list_images([args.set5]), "held-out photos": held}
    cache: dict = {}
    results = {"settings": {k: v for k, v in vars(args).items()}, "scale": SCALE, "sets": {}}
    for name, paths in sets.items():
        pairs = make_pairs(paths, args.size, args.preset, args.seeds_per_image, args.seed)
        with torch.no_grad():
            results["sets"][name] = run_set(pairs, net, encoder, dat, dat_encoder, metrics, protocol, cache)
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_tables(results: dict) -> None:
    sets = results["sets"]
    names = list(sets)
    methods = list(next(iter(sets.values()))["scores"])
    print(f"| method (×{results['scale']}) | " + " | ".join(f"{n} PSNR / SSIM" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for m in methods:
        cells = [f"{sets[n]['scores'][m]['psnr']:.2f} / {sets[n]['scores'][m]['ssim']:.4f}" for n in names]
        print(f"| {m} | " + " | ".join(cells) + " |")
    print("| true − wrong text gap | " + " | ".join(
        f"{sets[n]['gap_psnr']:+.3f} dB / {sets[n]['gap_ssim']:+.4f}" for n in names) + " |")  # fmt: skip
    print()
    print("| set | pairs with noise | HF energy: noise prompt none / 0 / 1 / 2 / 3 | falling 0→3 | falling none→3 |")
    print("|---|---:|---|---:|---:|")
    for n in names:
        mono = sets[n]["monotone_noise_control"]
        if mono:
            hf = " / ".join(f"{v:.3f}" for v in mono["hf_per_bin"].values())
            print(f"| {n} | {mono['n']} | {hf} (HR {sets[n]['hf_hr']:.3f}) | "
                  f"{mono['strictly_falling_bins_0_3']:.2f} | {mono['strictly_falling_none_3']:.2f} |")  # fmt: skip
    print()
    types = list(next(iter(sets.values()))["predictor"])
    print("| set | " + " | ".join(f"{t} acc. (majority)" for t in types) + " | exact prompt |")
    print("|---|" + "---:|" * (len(types) + 1))
    for n in names:
        acc = sets[n]["predictor"]
        cells = [f"{acc[t]['accuracy']:.2f} ({acc[t]['majority']:.2f})" for t in types]
        print(f"| {n} | " + " | ".join(cells) + f" | {sets[n]['predictor_exact_prompt']:.2f} |")


if __name__ == "__main__":
    main(parse_args())
