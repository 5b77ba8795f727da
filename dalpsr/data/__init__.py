"""Training datasets: HR folders degraded on the fly, and pair folders written by `dalpsr make-pairs`."""

from dalpsr.data.pairs import HRFolderPairs, PairsFolder

__all__ = ["HRFolderPairs", "PairsFolder"]
