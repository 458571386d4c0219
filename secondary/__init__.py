"""Secondary processes that attach to the primary's memory: workers, stats, capture."""
