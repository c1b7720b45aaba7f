from rpncalc.core import evaluate

__all__ = ["evaluate"]
