"""A plugin whose import fails (tests/bad_benches/plugin_raises_on_import.yaml)."""
from tta_bench import register_method
from tta_bench.api.method import Method

raise RuntimeError("this plugin is broken on purpose")


@register_method("broken-on-import")
class Broken(Method):
    """Never registered: the module raises first."""
