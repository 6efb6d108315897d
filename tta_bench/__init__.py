"""tta-bench: test-time adaptation of language models, measured side by side."""
from .errors import TTABenchError
from .registry import register_method, register_model, register_task

__version__ = "0.1.0"
__all__ = ["TTABenchError", "register_method", "register_model", "register_task", "__version__"]
