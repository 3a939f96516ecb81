from imgcls.evaluation.metrics import classification_metrics, format_metrics

__all__ = ["classification_metrics", "format_metrics"]
