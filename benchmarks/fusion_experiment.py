"""Controlled experiment (issue 15): do degradation features steer restoration? SRCLIP fusion vs CDSR (LPE + DQA).

Arms, ×4, all trained by `training/train_cdsr.py` with the same steps, batch, crops, seeds and on-the-fly
degradations (`setting2` and `realesrgan`, mixed per crop):
  a  DAT-light, no fusion                       (from weights/dat_light_x4)
  b  DAT-light + SRCLIP fusion + CLIP encoder   (from weights/dat_light_x4; encoder weights/degradation_tiny)
  c  DAT-light + DQA + LPE                      (from weights/dat_light_x4; LPE pre-trained here, InfoNCE + queue)
  d  DAT-light + DQA + CLIP encoder             (from weights/dat_light_x4)
  e  CDSR's own network (RRDB + DQA) + LPE      (from scratch: no CDSR weights exist offline)
Scored on fixed seeded synthetic held-out pairs (Set5 + held-out photos, 256 px centre crops, under each preset)
and on the real pairs of ../shared/data/paired/RealSR and DRealSR: PSNR/SSIM (Y of BT.601, border 4, 8-bit) and
the swapped-features test (`dalpsr.evaluation.feature_use`). The shipped restorer and plain dat_light_x4 are
scored beside them. Writes `results.json` and `table.md` into `--work_dir` and prints the table.

    OMP_NUM_THREADS=1 python benchmarks/fusion_experiment.py --work_dir /tmp/fusion_exp

The run reported in issue 15 (2-core machine shared with other jobs, about an hour):
`--arms acdbe --steps 40 --batch 2 --hr_size 128 --real_n 4 --heldout_photos 2` with the LPE of an earlier
`--lpe_steps 150 --lpe_batch 8` (HR 256) run copied into the work folder. Arms are trained first, then the
references (bicubic, plain dat_light_x4, the shipped restorer) are scored.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TRAIN_SCRIPT = ROOT / "training" / "train_cdsr.py"
PRESETS = ("setting2", "realesrgan")
SCALE = 4

# the 34 training photos of weights/dat_light_x4 (its card), none from RealSR/DRealSR
TRAIN_PHOTOS = {
    "DiffBIR-demo": ["01", "Bears", "cty_fnb_0047", "palace"],
    "DiffBIR-real47": ["5", "11", "12"],
    "InvSR-RealSet80": ["2684549-PH", "dog2", "hongkong1", "lion1", "london1", "street2"],
    "PASD-samples": ["house", "2e753d77bca91095", "ed84982626af1f44", "629e4da70703193b"],
    "Real-ESRGAN": ["00017_gray"],
    "StarSRGAN-testset": ["0015", "0054", "0068", "ADE_val_00000015", "ADE_val_00000711"],
    "SwinIR-RealSRSet": ["tiger", "foreman", "oldphoto6"],
}
SKIMAGE_TRAIN = ["astronaut", "rocket", "coffee", "chelsea", "camera", "brick", "grass", "gravel"]
# held-out photos (not in training, not RealSR/DRealSR scenes): the first `--heldout_photos` of at least 192 px
HELDOUT_PHOTOS = [
    ("DiffBIR-demo", "hermione"),
    ("StableSR", "cat_aigc"),
    ("Real-ESRGAN", "children-alpha"),
    ("KAIR-real_faces", "face_05"),
    ("KAIR-real_faces", "face_08"),
    ("SwinIR-RealSRSet", "butterfly"),
    ("Real-ESRGAN", "tree_alpha_16bit"),
    ("InvSR-RealSet80", "bag1"),
    ("PASD-samples", "461a96f62b724eab"),
    ("SwinIR-RealSRSet", "frog"),
    ("SwinIR-RealSRSet", "painting"),
    ("Real-ESRGAN", "wolf_gray"),
]
ARMS = {
    "a": {"label": "(a) DAT-light, no fusion", "args": ["--arch", "dat", "--fusion", "none"]},
    "b": {"label": "(b) DAT-light + SRCLIP fusion + CLIP enc.", "args": ["--arch", "dat", "--fusion", "srclip"]},
    "c": {"label": "(c) DAT-light + DQA + LPE", "args": ["--arch", "dat", "--fusion", "dqa"]},
    "d": {"label": "(d) DAT-light + DQA + CLIP enc.", "args": ["--arch", "dat", "--fusion", "dqa"]},
    "e": {"label": "(e) CDSR net (RRDB+DQA) + LPE", "args": ["--arch", "cdsr"]},
}
LPE_CONFIG = {
    "pixel_channels": [32, 48, 64],
    "patch_channels": [32, 64, 128],
    "patch_size": 12,
    "embed_dim": 128,
    "num_codes": 256,
    "projection_dim": 128,
}
CDSR_CONFIG = {"num_features": 32, "growth_channels": 16, "num_blocks": 4}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", required=True)
    p.add_argument("--arms", default="abcde")
    p.add_argument("--steps", type=int, default=90, help="SR training steps of every arm")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--hr_size", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=2e-4, help="DAT weights (arms a-d)")
    p.add_argument("--fusion_learning_rate", type=float, default=1e-3, help="new fusion parameters (b-d)")
    p.add_argument("--cdsr_learning_rate", type=float, default=1e-3, help="arm e (from scratch)")
    p.add_argument("--lpe_steps", type=int, default=300)
    p.add_argument("--lpe_batch", type=int, default=16)
    p.add_argument("--real_n", type=int, default=20, help="pairs of RealSR and of DRealSR (evenly spaced)")
    p.add_argument("--heldout_photos", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_seed", type=int, default=1234)
    return p.parse_args()


def prepare_images(work: Path, heldout_n: int) -> tuple[Path, list[tuple[str, torch.Tensor]]]:
    """Training folder (PNG; short side >= 384 px reduced to 2/3, Lanczos, as dat_light_x4's card) and the
    held-out HR images (name, 3×H×W) with a short side of at least 192 px after the same reduction."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from dalpsr.image_io import list_images

    def reduced(im: Image.Image) -> Image.Image:
        im = im.convert("RGB")
        if min(im.size) >= 384:
            im = im.resize((im.width * 2 // 3, im.height * 2 // 3), Image.Resampling.LANCZOS)
        return im

    def find(folder: str, stem: str) -> Path:
        hits = [p for p in list_images([DATA / "real_lr" / folder]) if p.stem == stem]
        if not hits:
            raise FileNotFoundError(f"{DATA / 'real_lr' / folder}/{stem}.* not found")
        return hits[0]

    train = work / "train_hr"
    if not train.is_dir():
        tmp = work / "train_hr.partial"
        tmp.mkdir(parents=True, exist_ok=True)
        for folder, stems in TRAIN_PHOTOS.items():
            for stem in stems:
                reduced(Image.open(find(folder, stem))).save(tmp / f"{folder}__{stem}.png")
        for name in SKIMAGE_TRAIN:
            arr = getattr(skimage.data, name)()
            arr = np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]
            reduced(Image.fromarray(arr)).save(tmp / f"skimage__{name}.png")
        tmp.rename(train)
    heldout = []
    for folder, stem in HELDOUT_PHOTOS:
        im = reduced(Image.open(find(folder, stem)))
        if min(im.size) >= 192:
            heldout.append(
                (f"{folder}__{stem}", torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255)
            )
        if len(heldout) == heldout_n:
            break
    return train, heldout


def synthetic_pairs(heldout: list[tuple[str, torch.Tensor]], seed: int) -> dict[str, list]:
    """Per preset: (name, LR, HR) of the centre 256 px crop (smaller: the largest multiple of 4) of Set5 + photos."""
    from dalpsr.degradations.config import preset
    from dalpsr.degradations.pipeline import degrade
    from dalpsr.image_io import list_images, load_image
    from dalpsr.runtime import derive_seed

    images = [(p.stem, load_image(p).rgb) for p in list_images([DATA / "paired" / "Set5" / "hr"])] + heldout
    out = {}
    for name in PRESETS:
        config = preset(name, scale=SCALE)
        pairs = []
        for stem, rgb in images:
            _, h, w = rgb.shape
            size = min(256, h // 4 * 4, w // 4 * 4)
            top, left = (h - size) // 2, (w - size) // 2
            hr = rgb[:, top : top + size, left : left + size].contiguous()
            lr = degrade(hr[None], config, scale=SCALE, seeds=[derive_seed(seed, name, stem)]).lr[0]
            pairs.append((stem, lr, hr))
        out[f"synthetic {name}"] = pairs
    return out


def real_pairs(n: int) -> dict[str, list]:
    from dalpsr.image_io import list_images, load_image

    out = {}
    for name in ("RealSR", "DRealSR"):
        root = DATA / "paired" / name
        lrs = {p.name: p for p in list_images([root / "lr_x4"])}
        files = [(p, lrs[p.name]) for p in list_images([root / "hr"]) if p.name in lrs]
        files = sorted(files)[:: max(1, len(files) // n)][:n]
        out[name] = [(hr.stem, load_image(lr).rgb, load_image(hr).rgb) for hr, lr in files]
    return out


def run(cmd: list[str], log: Path) -> float:
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return time.time() - start


def train_arm(key: str, args: argparse.Namespace, work: Path, train_dir: Path, lpe_dir: Path) -> float | None:
    out = work / f"arm_{key}"
    if (out / "restorer" / "config.json").is_file():
        return None
    clip = ROOT / "weights" / "degradation_tiny"
    cmd = [sys.executable, str(TRAIN_SCRIPT), "--stage", "sr", *ARMS[key]["args"], "--train_data_dir", str(train_dir)]
    cmd += ["--output_dir", str(out), "--hr_size", str(args.hr_size), "--train_batch_size", str(args.batch)]
    cmd += ["--max_train_steps", str(args.steps), "--seed", str(args.seed), "--lr_warmup_steps", "10"]
    cmd += ["--checkpointing_steps", "30", "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest"]
    cmd += ["--logging_steps", "10", "--degradations", *PRESETS]
    if key in "abcd":
        cmd += ["--pretrained_dat", str(ROOT / "weights" / "dat_light_x4"), "--learning_rate", str(args.learning_rate)]
        cmd += ["--fusion_learning_rate", str(args.fusion_learning_rate)]
    if key in "bd":
        cmd += ["--feature_source", "clip", "--encoder", str(clip)]
    if key in "ce":
        cmd += ["--feature_source", "lpe", "--encoder", str(lpe_dir)]
    if key == "e":
        cmd += ["--cdsr_config", json.dumps(CDSR_CONFIG), "--learning_rate", str(args.cdsr_learning_rate)]
    return run(cmd, work / f"arm_{key}.log")


def load_arm(path: Path):
    """(model, encoder or None) of a train_cdsr.py output or a restorer folder."""
    from dalpsr.models.cdsr import CDSRNet, LightweightPatchEncoder
    from dalpsr.models.degradation_encoder import DegradationEncoder
    from dalpsr.models.fusion import DATRestorer

    folder = path / "restorer" if (path / "restorer" / "config.json").is_file() else path
    cls_name = json.loads((folder / "config.json").read_text())["_class_name"]
    model = (CDSRNet if cls_name == "CDSRNet" else DATRestorer).from_pretrained(folder).eval()
    encoder = None
    for sub, cls in (("lpe", LightweightPatchEncoder), ("degradation_encoder", DegradationEncoder)):
        for base in (path, folder.parent):
            if encoder is None and (base / sub / "config.json").is_file() and model.needs_features:
                encoder = cls.from_pretrained(base / sub).eval()
    return model, encoder


@torch.no_grad()
def evaluate(model, encoder, sets: dict[str, list]) -> dict:
    from dalpsr.evaluation.feature_use import swapped_features_test
    from dalpsr.evaluation.metrics import MetricProtocol, build_metrics, score

    protocol = MetricProtocol(color="y", color_space="ycbcr", crop_border=4, round_8bit=True)
    results = {}
    for name, pairs in sets.items():
        if model is not None and model.needs_features:
            r = swapped_features_test(
                pairs, encoder.encode_images, lambda lr, f: model.super_resolve(lr, features=f), protocol
            )
            results[name] = {"n": r.n, **r.own, "gap": r.gap, "mean_abs_change": r.mean_abs_change}
            continue
        metrics, errors = build_metrics(["psnr", "ssim"], protocol)
        if errors:
            raise RuntimeError(errors)
        rows = []
        for _, lr, hr in pairs:
            if model is None:  # bicubic
                sr = F.interpolate(lr[None], scale_factor=SCALE, mode="bicubic", align_corners=False)[0]
            else:
                sr = model.super_resolve(lr[None])[0]
            sr = sr.float().clamp(0, 1)
            gt = hr[:, : sr.shape[-2], : sr.shape[-1]]
            rows.append({k: score(m, sr, gt, protocol) for k, m in metrics.items()})
        results[name] = {"n": len(rows), **{k: sum(r[k] for r in rows) / len(rows) for k in metrics}}
    return results


def table(results: dict, order: list[str], labels: dict[str, str], sets: list[str]) -> str:
    head = "| arm | " + " | ".join(f"{s} PSNR / SSIM (gap dB)" for s in sets) + " | train s |"
    lines = [head, "|---|" + "---:|" * (len(sets) + 1)]
    for key in order:
        r = results[key]
        cells = []
        for s in sets:
            m = r["scores"][s]
            gap = f" ({m['gap']['psnr']:+.3f})" if "gap" in m else ""
            cells.append(f"{m['psnr']:.2f} / {m['ssim']:.4f}{gap}")
        t = r.get("train_seconds")
        lines.append(f"| {labels[key]} | " + " | ".join(cells) + f" | {'' if t is None else round(t)} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    train_dir, heldout = prepare_images(work, args.heldout_photos)
    print(f"training images: {len(list(train_dir.iterdir()))}; held-out photos: {[n for n, _ in heldout]}", flush=True)

    lpe_dir = work / "lpe"
    if any(k in args.arms for k in "ce") and not (lpe_dir / "lpe" / "config.json").is_file():
        cmd = [sys.executable, str(TRAIN_SCRIPT), "--stage", "lpe", "--train_data_dir", str(train_dir)]
        cmd += ["--output_dir", str(lpe_dir), "--hr_size", str(args.hr_size), "--train_batch_size", str(args.lpe_batch)]
        cmd += ["--max_train_steps", str(args.lpe_steps), "--learning_rate", "1e-3", "--momentum", "0.99"]
        cmd += ["--queue_size", "2048", "--seed", str(args.seed), "--lpe_config", json.dumps(LPE_CONFIG)]
        cmd += ["--checkpointing_steps", "100", "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest"]
        cmd += ["--logging_steps", "25", "--degradations", *PRESETS]
        seconds = run(cmd, work / "lpe.log")
        results["lpe_pretraining_seconds"] = seconds
        print(f"LPE pre-training: {seconds:.0f} s", flush=True)

    sets = {**synthetic_pairs(heldout, args.eval_seed), **real_pairs(args.real_n)}
    print({k: len(v) for k, v in sets.items()}, flush=True)
    labels = {k: v["label"] for k, v in ARMS.items()}
    labels.update(bicubic="bicubic", plain="dat_light_x4 (init, not fine-tuned)", shipped="shipped restorer")
    refs = {
        "bicubic": None,
        "plain": ROOT / "weights" / "dat_light_x4",
        "shipped": ROOT / "weights" / "degradation_tiny",
    }
    for key in [*args.arms, *refs]:
        if key in results and "scores" in results[key]:
            continue
        entry = {}
        if key in ARMS:
            try:
                seconds = train_arm(key, args, work, train_dir, lpe_dir)
            except RuntimeError as err:  # one failed arm must not stop the others
                print(f"arm {key} FAILED: {err}", flush=True)
                continue
            if seconds is not None:
                entry["train_seconds"] = seconds
                print(f"arm {key} trained in {seconds:.0f} s", flush=True)
            model, encoder = load_arm(work / f"arm_{key}")
        elif refs[key] is None:
            model, encoder = None, None
        else:
            model, encoder = load_arm(refs[key])
        start = time.time()
        entry["scores"] = evaluate(model, encoder, sets)
        entry["eval_seconds"] = time.time() - start
        if model is not None:
            entry["parameters"] = sum(p.numel() for p in model.parameters())
        results[key] = entry
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(key, json.dumps(entry["scores"]), flush=True)
    order = [k for k in [*refs, *args.arms] if k in results]
    md = table(results, order, labels, list(sets))
    (work / "table.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
