"""A kernel estimator (PL-IDENet) in the pipeline: its kernel joins the degradation report and survives save/load."""

from __future__ import annotations

import math

import pytest
import torch

from dalpsr import DaLPSRPipeline
from dalpsr.models.pl_idenet import PLIDENet
from dalpsr.testing import get_dummy_components, get_dummy_degradation_models

TINY = {
    "scale": 2, "kernel_size": 7, "estimator_channels": 8, "upsample_channels": 8, "wiener_filter_size": 3,
    "wiener_num_nsr": 2, "embed_dim": 16, "depths": [1], "num_heads": [2], "window_size": 4, "prompt_len": 8,
    "prompt_dim": 4, "prompt_scale_factors": [1], "prompt_num_heads": [1], "kernel_init_sigma": 1.2,
}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def lr_images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 12, 10, generator=g), torch.rand(3, 6, 6, generator=g)]


@pytest.mark.parametrize("with_decoder", [True, False])
def test_kernel_joins_the_degradation_report(tmp_path, with_decoder):
    torch.manual_seed(0)
    estimator = PLIDENet(**TINY).eval()
    extra = {}
    if with_decoder:
        extra["degradation_encoder"], extra["prompt_decoder"] = get_dummy_degradation_models()
    pipe = DaLPSRPipeline(**get_dummy_components(), kernel_estimator=estimator, **extra)
    pipe.set_progress_bar_config(disable=True)
    images = lr_images()
    out = pipe(images, upscale=2, num_inference_steps=1, guidance_scale=1.0, output_type="np")
    big, small = out.degradations
    expected = estimator.describe_kernel(images[0])
    assert big["kernel"]["sigma"] == pytest.approx(expected["sigma"]) and math.isfinite(big["kernel"]["sigma"])
    assert big["kernel"]["scale"] == 2 and "kernel" not in big["kernel"]
    assert small["kernel"] is None, "under 8 px a side no kernel is estimated"
    assert ("types" in big) == with_decoder
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DaLPSRPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.kernel_estimator, PLIDENet)
    again = loaded(images[:1], upscale=2, num_inference_steps=1, guidance_scale=1.0, output_type="np")
    assert again.degradations[0]["kernel"]["sigma"] == pytest.approx(expected["sigma"])
