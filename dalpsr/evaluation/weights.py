"""Offline weight handling for pyiqa metrics.

pyiqa downloads weight files on first use: its own files to `$TORCH_HOME/hub/pyiqa/<file>`, torchvision
backbones to `$TORCH_HOME/hub/checkpoints/<file>`, OpenAI CLIP to `$TORCH_HOME/hub/clip/<file>` and timm
backbones to the Hugging Face cache. Here nothing is ever downloaded: the files a metric needs are checked
before the metric is built, and any download pyiqa still attempts is turned into `MissingWeightsError`.

Some metrics' parameters ship with dalpsr (`SHIPPED_PARAMETERS`, under `weights/`): when pyiqa's own file is not
in the weights folder, the shipped arrays are handed to pyiqa instead, so those metrics need no file at all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dalpsr.package_data import package_data

WEIGHTS_ENV = "DALPSR_IQA_WEIGHTS"

# Files each metric loads, as paths under the torch hub folder (`<weights_dir>/hub`). Read from pyiqa
# 0.1.16's `default_model_configs.py` and arch modules; names not listed here are still guarded at run time.
_PYIQA = "pyiqa"
_TV = "checkpoints"
HUB_FILES: dict[str, tuple[str, ...]] = {
    "psnr": (),
    "psnry": (),
    "ssim": (),
    "ssimc": (),
    "ms_ssim": (),
    "cw_ssim": (),
    "fsim": (),
    "vif": (),
    "gmsd": (),
    "brisque": (f"{_PYIQA}/brisque_svm_weights.pth",),
    "niqe": (f"{_PYIQA}/niqe_modelparameters.mat",),
    "niqe_matlab": (f"{_PYIQA}/niqe_matlab_params.mat",),
    "ilniqe": (f"{_PYIQA}/ILNIQE_templateModel.mat",),
    "lpips": (f"{_PYIQA}/LPIPS_v0.1_alex-df73285e.pth", f"{_TV}/alexnet-owt-7be5be79.pth"),
    "lpips-vgg": (f"{_PYIQA}/LPIPS_v0.1_vgg-a78928a0.pth", f"{_TV}/vgg16-397923af.pth"),
    "dists": (f"{_PYIQA}/DISTS_weights-f5e65c96.pth", f"{_TV}/vgg16-397923af.pth"),
    "musiq": (f"{_PYIQA}/musiq_koniq_ckpt-e95806b9.pth",),
    "musiq-spaq": (f"{_PYIQA}/musiq_spaq_ckpt-358bb6af.pth",),
    "musiq-ava": (f"{_PYIQA}/musiq_ava_ckpt-e8d3f067.pth",),
    "maniqa": (f"{_PYIQA}/ckpt_koniq10k.pt",),
    "clipiqa": ("clip/RN50.pt",),
    "clipiqa+": ("clip/RN50.pt", f"{_PYIQA}/CLIP-IQA+_learned_prompts-603f3273.pth"),
    "topiq_nr": (f"{_PYIQA}/cfanet_nr_koniq_res50-9a73138b.pth",),
    "topiq_fr": (f"{_PYIQA}/cfanet_fr_kadid_res50-2c4cc61d.pth",),
}
# metric → (the pyiqa hub file it replaces, the file shipped under `weights/`); see weights/niqe/README.md.
SHIPPED_PARAMETERS: dict[str, tuple[str, str]] = {
    "niqe": (f"{_PYIQA}/niqe_modelparameters.mat", "niqe/niqe_pris_params.safetensors"),
}
# timm backbones that pyiqa builds with `pretrained=True` before loading its own checkpoint.
TIMM_BACKBONES: dict[str, tuple[str, ...]] = {
    "maniqa": ("vit_base_patch8_224",),
    "topiq_nr": ("resnet50",),
    "topiq_fr": ("resnet50",),
}


class MissingWeightsError(RuntimeError):
    """A metric needs a weight file that is not on disk (nothing is downloaded)."""


@dataclass(frozen=True)
class MissingFile:
    """One weight file a metric needs and where it must be put."""

    metric: str
    expected_path: Path
    source: str

    def message(self) -> str:
        return (
            f"metric `{self.metric}` needs the weight file `{self.expected_path.name}`; put it at "
            f"{self.expected_path} (download it from {self.source}) or point `--weights-dir` / "
            f"${WEIGHTS_ENV} at a folder that has it under hub/."
        )


def missing_message(metric: str, missing: list[MissingFile]) -> str:
    """One error message for all files `metric` lacks."""
    if len(missing) == 1:
        return missing[0].message()
    files = "; ".join(f"{m.expected_path} (from {m.source})" for m in missing)
    return (
        f"metric `{metric}` needs {len(missing)} weight files that are missing: {files}. Put them there or "
        f"point `--weights-dir` / ${WEIGHTS_ENV} at a folder that has them under hub/."
    )


def resolve_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """The TORCH_HOME-style root that holds `hub/pyiqa/`, `hub/checkpoints/` and `hub/clip/`.

    Args:
        weights_dir: explicit folder; else `$DALPSR_IQA_WEIGHTS`, else `$TORCH_HOME`, else `~/.cache/torch`.
    """
    if weights_dir is not None and str(weights_dir) != "":
        return Path(weights_dir).expanduser()
    for env in (WEIGHTS_ENV, "TORCH_HOME"):
        value = os.environ.get(env)
        if value:
            return Path(value).expanduser()
    return Path("~/.cache/torch").expanduser()


def _source_for(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    if rel.startswith(f"{_PYIQA}/"):
        return f"https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/{name}"
    if rel.startswith(f"{_TV}/"):
        return f"https://download.pytorch.org/models/{name}"
    return "the URL in pyiqa/archs/clip_model.py (_MODELS)"


def missing_weight_files(metric: str, weights_dir: str | os.PathLike | None = None) -> list[MissingFile]:
    """The files `metric` needs that are absent; empty when all are present or the metric needs none.

    Only metrics in `HUB_FILES` / `TIMM_BACKBONES` can be checked ahead; others are guarded while built.
    """
    hub = resolve_weights_dir(weights_dir) / "hub"
    replaced = SHIPPED_PARAMETERS[metric][0] if shipped_parameters(metric, weights_dir) is not None else None
    missing = [
        MissingFile(metric, hub / rel, _source_for(rel))
        for rel in HUB_FILES.get(metric, ())
        if rel != replaced and not (hub / rel).is_file()
    ]
    for model_name in TIMM_BACKBONES.get(metric, ()):
        cached = _timm_cached(model_name)
        if cached is not None and not cached[1]:
            missing.append(
                MissingFile(
                    metric,
                    Path(cached[0]),
                    f"https://huggingface.co/{cached[2]} (timm backbone `{model_name}`, Hugging Face cache)",
                )
            )
    return missing


def shipped_parameters(metric: str, weights_dir: str | os.PathLike | None = None) -> Path | None:
    """The shipped parameter file used for `metric`: when it has one and pyiqa's own file is not in the weights
    folder (a file put there wins); else None."""
    if metric not in SHIPPED_PARAMETERS:
        return None
    hub_file, shipped = SHIPPED_PARAMETERS[metric]
    if (resolve_weights_dir(weights_dir) / "hub" / hub_file).is_file():
        return None
    path = package_data("weights", shipped)
    return path if path.is_file() else None


@contextlib.contextmanager
def shipped_metric_options(metric: str, weights_dir: str | os.PathLike | None = None) -> Iterator[dict]:
    """Extra `pyiqa.create_metric` options that make `metric` use its shipped parameters (empty when it has none
    or pyiqa's own file is present). NIQE: the arrays are written to a temporary `.mat` in pyiqa's layout
    (`mu_prisparam`, `cov_prisparam`), which pyiqa reads while the metric is built."""
    path = shipped_parameters(metric, weights_dir)
    if path is None:
        yield {}
        return
    import tempfile

    import scipy.io
    from safetensors.numpy import load_file

    arrays = load_file(str(path))
    with tempfile.TemporaryDirectory(prefix="dalpsr-niqe-") as tmp:
        mat = Path(tmp) / "niqe_modelparameters.mat"
        scipy.io.savemat(mat, {"mu_prisparam": arrays["mu_pris_param"], "cov_prisparam": arrays["cov_pris_param"]})
        yield {"pretrained_model_path": str(mat)}


def _timm_cached(model_name: str) -> tuple[str, bool, str] | None:
    """(expected cache path, present?, repo id) of a timm backbone's Hub weights, or None if unknown."""
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_name)
    repo_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return found, True, repo_id
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    return str(folder / "model.safetensors"), False, repo_id


@contextlib.contextmanager
def offline_pyiqa(weights_dir: str | os.PathLike | None, metric: str) -> Iterator[Path]:
    """Point pyiqa/torch hub at `weights_dir` and make every download attempt raise `MissingWeightsError`.

    Restores the torch hub folder, pyiqa's cache folder and the Hub offline flag on exit.
    """
    import torch.hub
    from huggingface_hub import constants as hf_constants
    from pyiqa.archs import clip_model
    from pyiqa.utils import download_util

    hub = resolve_weights_dir(weights_dir) / "hub"

    def refuse(url, dst, *args, **kwargs):
        raise MissingWeightsError(MissingFile(metric, Path(dst), str(url)).message())

    def clip_local(url: str, root: str) -> str:
        path = Path(root) / os.path.basename(url)
        if not path.is_file():
            raise MissingWeightsError(MissingFile(metric, path, url).message())
        return str(path)

    saved = (
        torch.hub.get_dir(),
        torch.hub.download_url_to_file,
        download_util.DEFAULT_CACHE_DIR,
        download_util.download_url_to_file,
        clip_model._download,
        hf_constants.HF_HUB_OFFLINE,
    )
    torch.hub.set_dir(str(hub))
    torch.hub.download_url_to_file = refuse
    download_util.DEFAULT_CACHE_DIR = str(hub / _PYIQA)
    download_util.download_url_to_file = refuse
    clip_model._download = clip_local
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield hub
    finally:
        torch.hub.set_dir(saved[0])
        torch.hub.download_url_to_file = saved[1]
        download_util.DEFAULT_CACHE_DIR = saved[2]
        download_util.download_url_to_file = saved[3]
        clip_model._download = saved[4]
        hf_constants.HF_HUB_OFFLINE = saved[5]
