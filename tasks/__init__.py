"""Built-in tasks, one file each. Files here are discovered lazily by tta_bench.api.registry."""
