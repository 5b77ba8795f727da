"""The small degradation encoder + prompt decoder shipped in `weights/degradation_tiny/`.

Found by default, small, and better than the majority class on held-out photos (scikit-image samples that were
held out of its training set), and it tells a clean photo from the same photo with noise added.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalpsr.cli import main
from dalpsr.evaluation.degradation import evaluate_degradation
from dalpsr.loaders.degradation import default_model_dir, load_degradation_models
from dalpsr.models.prompt_decoder import describe_image

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "degradation_tiny"
HELD_OUT = ("coffee", "gravel", "rocket")  # scikit-image samples held out of the training set (model card)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return load_degradation_models(None)


def _half_size(name: str) -> np.ndarray:
    """A scikit-image sample at half size (Lanczos), as the training sources were prepared."""
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    return np.asarray(image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS))


def test_shipped_model_is_the_default_and_small(models):
    assert default_model_dir().resolve() == SHIPPED.resolve()
    for sub in ("degradation_encoder", "prompt_decoder"):
        files = list((SHIPPED / sub).glob("*.safetensors"))
        assert len(files) == 1 and files[0].stat().st_size < 20 * 2**20
    assert (SHIPPED / "README.md").is_file()
    encoder, decoder, data = models
    assert data == {"hr_size": 64, "scale": 1, "degradation": "balanced"}
    assert encoder.image_size == (64, 64) and encoder.config.resize_mode == "crop"
    assert decoder.config.embed_dim == encoder.embed_dim


def test_beats_the_majority_class_on_held_out_photos(models, tmp_path):
    encoder, decoder, data = models
    for name in HELD_OUT:
        Image.fromarray(_half_size(name)).save(tmp_path / f"{name}.png")
    metrics = evaluate_degradation(
        encoder,
        decoder,
        tmp_path,
        n=128,
        seed=0,
        crop_size=data["hr_size"],
        scale=data["scale"],
        degradation=data["degradation"],
        batch_size=32,
    )
    types = metrics["types"]
    # every type is detected far more often correctly than by always answering the majority class
    for name, m in types.items():
        assert m["detection_accuracy"] > m["majority_detection_accuracy"] + 0.1, (name, m)
    assert types["noise"]["bin_accuracy"] > types["noise"]["majority_bin_accuracy"] + 0.25
    assert metrics["mean"]["bin_accuracy"] > metrics["mean"]["majority_bin_accuracy"] + 0.1


def test_describe_tells_noise_from_a_clean_photo(models, tmp_path, capsys):
    encoder, decoder, _ = models
    clean = torch.from_numpy(_half_size("coffee").copy()).permute(2, 0, 1).float() / 255
    noisy = (clean + torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)) * 20 / 255).clamp(0, 1)
    assert describe_image(encoder, decoder, clean).bins[0]["noise"] is None
    assert describe_image(encoder, decoder, noisy).bins[0]["noise"] in (2, 3)  # sigma 20 / 30 → bin 2
    # the CLI needs no --model: the shipped model is the default
    path = tmp_path / "noisy.png"
    Image.fromarray((noisy.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    assert main(["describe", str(path), "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["types"]["noise"]["bin"] in (2, 3) and "Denoise with sigma" in report["prompt"]


def test_threshold_out_of_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["describe", "photo.png", "--threshold", "2"])
    assert exit_info.value.code == 2 and "--threshold: must be in (0, 1); got 2" in capsys.readouterr().err
