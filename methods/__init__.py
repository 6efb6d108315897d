"""Built-in methods, one file or package each, discovered lazily by tta_bench.api.registry; `_common/`
holds the machinery they share (the registry skips it: no method is registered there)."""
