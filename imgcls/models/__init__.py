from imgcls.models.factory import MODEL_DEFAULTS, MODELS, count_params, create_model, list_models, model_from_config
from imgcls.models.reference import ReferenceCNN

__all__ = ["MODELS", "MODEL_DEFAULTS", "ReferenceCNN", "count_params", "create_model", "list_models", "model_from_config"]
