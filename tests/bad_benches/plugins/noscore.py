"""A plugin method that forgot score() (tests/bad_benches/plugin_method_without_score.yaml)."""
from tta_bench import register_method
from tta_bench.api.method import Method


@register_method("no-score")
class NoScore(Method):
    """Adapts but never scores."""

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return True

    def adapt(self, seg):
        pass
