"""`RestorerEngine`'s automatic tiling (issue 18, item 11): the fewest recomputed pixels within the memory bound."""

from __future__ import annotations

import pytest

from dalpsr.pipelines.engines import AUTO_TILE, lr_tiling
from dalpsr.tiling import tile_starts


def _computed(height: int, width: int, tile: int, overlap: int) -> float:
    rows, cols = len(tile_starts(height, tile, overlap)), len(tile_starts(width, tile, overlap))
    return rows * min(tile, height) * cols * min(tile, width) / (height * width)


@pytest.mark.parametrize(("height", "width"), [(351, 500), (600, 621), (257, 257), (1000, 3000), (3000, 4000)])
def test_automatic_tiles_recompute_little(height, width):
    tile, overlap = lr_tiling(None, None, 4, height, width)
    assert tile <= AUTO_TILE and overlap == 16
    # 256² tiles computed 2.24× the 500×351 photo (a third column nearly on top of the second), 3.97× a 257² one
    assert _computed(height, width, tile, overlap) <= 1.2
    assert _computed(height, width, tile, overlap) <= _computed(height, width, AUTO_TILE, overlap)


def test_small_images_run_whole_and_explicit_tiles_are_kept():
    assert lr_tiling(None, None, 4, 256, 200) == (None, 0)
    assert lr_tiling(512, 64, 4, 1000, 1000) == (128, 16)
    assert lr_tiling(64, 512, 4, 1000, 1000) == (16, 8)  # overlap at most half a tile
    with pytest.raises(ValueError, match="--tile-size"):
        lr_tiling(2, None, 4, 100, 100)
