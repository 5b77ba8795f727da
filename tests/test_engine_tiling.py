"""`RestorerEngine`'s automatic tiling (issue 18, item 11): the fewest computed pixels within the memory bound."""

from __future__ import annotations

import pytest
import torch

from dalpsr.models.dat import DAT
from dalpsr.pipelines.engines import AUTO_TILE_AREA, lr_tiling
from dalpsr.testing import TINY_DAT_CONFIG
from dalpsr.tiling import tile_starts


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
    assert lr_tiling(None, None, 4, 40, 1600, 32) == (None, 0)  # 64000 px: one forward within the bound
    assert lr_tiling(512, 64, 4, 1000, 1000) == (128, 16)
    assert lr_tiling(64, 512, 4, 1000, 1000) == (16, 8)  # overlap at most half a tile
    with pytest.raises(ValueError, match="--tile-size"):
        lr_tiling(2, None, 4, 100, 100)


def test_a_thin_strip_gets_an_overlap_it_can_hold():
    tile, overlap = lr_tiling(None, None, 4, 20, 10000, 32)
    assert tile[0] == 20 and overlap == 10 and 20 * tile[1] <= AUTO_TILE_AREA


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
