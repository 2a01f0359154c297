"""Everything that knows about ranks: meshes (folding), TP/SP plans, EP dispatchers, CP, PP, DP."""

from parallel.dims import ParallelDims

__all__ = ["ParallelDims"]
