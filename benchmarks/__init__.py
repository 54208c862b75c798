"""gpusm's benchmarks: every figure measured against a baseline in the same run.

Run them all with ``bash scripts/bench`` (``--quick`` for a ~1 minute smoke run); see
``benchmarks/README.md`` for what each figure means and the latest table.
"""

__all__: list[str] = []
