"""Built-in methods, one file each. Files here are discovered lazily by tta_bench.registry."""
