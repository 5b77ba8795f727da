"""`RestorerEngine`'s automatic tiling (issue 18, item 11): the fewest computed pixels within the memory bound."""

from __future__ import annotations

import math

import pytest
import torch

from dalpsr.models.dat import DAT
from dalpsr.pipelines.engines import lr_tiling
from dalpsr.testing import TINY_DAT_CONFIG
from dalpsr.tiling import AUTO_TILE_AREA, tile_starts


def _computed(height: int, width: int, tile: tuple[int, int], overlap: int, multiple: int) -> float:
    """Pixels computed by the tiles, each padded to `multiple`, over the image's own padded area."""

    def pad(edge: int) -> int:
        return -(-edge // multiple) * multiple

    th, tw = min(tile[0], height), min(tile[1], width)
    rows, cols = len(tile_starts(height, th, overlap)), len(tile_starts(width, tw, overlap))
    return rows * pad(th) * cols * pad(tw) / (pad(height) * pad(width))


@pytest.mark.parametrize(("height", "width"), [(351, 500), (600, 621), (257, 257), (1000, 3000), (3000, 4000)])
@pytest.mark.parametrize("multiple", [1, 32])
def test_automatic_tiles_compute_little_within_the_memory_bound(height, width, multiple):
    tile, overlap = lr_tiling(None, None, 4, height, width, multiple)
    assert overlap == 16 and min(tile[0], height) * min(tile[1], width) <= AUTO_TILE_AREA
    computed = _computed(height, width, tile, overlap, multiple)
    # square 256² tiles computed 2.18× the 500×351 photo (a third column nearly on top of the second)
    assert computed <= 1.2
    assert computed <= _computed(height, width, (256, 256), overlap, multiple)
    assert computed <= _computed(height, width, (184, 184), overlap, multiple)


def test_small_images_run_whole_and_explicit_tiles_are_kept():
    assert lr_tiling(None, None, 4, 256, 200) == (None, 0)
    assert lr_tiling(None, None, 4, 32, 2000, 32) == (None, 0)  # padded 32×2016: one forward within the bound
    assert lr_tiling(None, None, 4, 40, 1600, 32)[0] is not None  # padded 64×1600 is over it
    assert lr_tiling(512, 64, 4, 1000, 1000) == (128, 16)
    assert lr_tiling(64, 512, 4, 1000, 1000) == (16, 8)  # overlap at most half a tile
    with pytest.raises(ValueError, match="--tile-size"):
        lr_tiling(2, None, 4, 100, 100)


def _padded_area(tile: tuple[int, int], multiple: int) -> int:
    return math.prod(-(-max(e, multiple) // multiple) * multiple for e in tile)


@pytest.mark.parametrize(("height", "width"), [(20, 10000), (10, 7000), (1, 70000), (1, 65536), (24, 2700)])
def test_thin_strips_are_tiled_as_the_model_pads_them(height, width):
    # DAT pads a side shorter than its 32-px window up to it: a strip counts as 32 tall, whole-height tiles
    tile, overlap = lr_tiling(None, None, 4, height, width, 32)
    assert tile[0] == 32 and overlap == 16
    assert _padded_area(tile, 32) <= AUTO_TILE_AREA


def test_padded_tiles_stay_within_the_memory_bound():
    for height, width in [(292, 422), (351, 500), (300, 1000), (257, 4000), (1000, 1000)]:
        for multiple in (1, 8, 32, 64):
            tile, _ = lr_tiling(None, None, 4, height, width, multiple)
            assert _padded_area(tile, multiple) <= AUTO_TILE_AREA, (height, width, multiple, tile)


def test_square_only_networks_get_square_tiles_and_a_large_overlap_is_capped():
    tile, _ = lr_tiling(None, None, 4, 300, 1000, 128, square=True)
    assert tile[0] == tile[1] and _padded_area(tile, 128) <= AUTO_TILE_AREA
    assert lr_tiling(None, None, 4, 40, 40, 1, square=False) == (None, 0)
    tile, overlap = lr_tiling(None, 4096, 4, 1000, 1000, 32)  # 1024 LR px asked: capped at half a 256 tile
    assert overlap == 128 and min(tile) >= 256
    with pytest.raises(ValueError, match="--tile-overlap"):
        lr_tiling(None, None, 4, 300, 1000, 512)


def test_the_pipeline_tiles_its_restorer_stage_automatically(monkeypatch):
    from dalpsr.testing import get_dummy_degradation_models, get_dummy_pipeline, get_dummy_restorer

    encoder, decoder = get_dummy_degradation_models(seed=0)
    restorer = get_dummy_restorer(seed=0, scale=2)
    pipe = get_dummy_pipeline(seed=0, degradation_encoder=encoder, prompt_decoder=decoder, restorer=restorer)
    seen = {}

    class Stop(Exception):
        pass

    def spy(lr, features=None, tile_size=None, tile_overlap=16):
        seen.update(shape=tuple(lr.shape[-2:]), tile=tile_size, overlap=tile_overlap)
        raise Stop

    monkeypatch.setattr(restorer, "super_resolve", spy)
    with pytest.raises(Stop):
        pipe(torch.rand(3, 300, 260), num_inference_steps=1, upscale=2)
    assert seen["shape"] == (300, 260) and _padded_area(seen["tile"], restorer.tile_multiple) <= AUTO_TILE_AREA
    with pytest.raises(Stop):
        pipe(torch.rand(3, 300, 260), num_inference_steps=1, upscale=2, restorer_tile_size=64)
    assert seen["tile"] == 64


def test_rectangular_tiles_match_the_untiled_dat_where_the_receptive_field_allows():
    torch.manual_seed(0)
    model = DAT(**{**TINY_DAT_CONFIG, "upscale": 2}).eval()
    lr = torch.rand(1, 3, 40, 72)
    whole = model.super_resolve(lr)
    tiled = model.super_resolve(lr, tile_size=(40, 32), tile_overlap=16)
    square = model.super_resolve(lr, tile_size=32, tile_overlap=16)
    assert tiled.shape == whole.shape == square.shape == (1, 3, 80, 144)
    # full-height tiles cut only columns: closer to the whole image than square tiles, which cut rows too
    assert (tiled - whole).abs().mean() < (square - whole).abs().mean()
    with pytest.raises(ValueError, match="tile_size"):
        model.super_resolve(lr, tile_size=(40, 0))
