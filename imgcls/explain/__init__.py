"""Explanations of a classifier's predictions: Grad-CAM, Grad-CAM++, integrated gradients,
occlusion, LIME and SHAP behind one call, each scored for faithfulness.

    from imgcls.explain import explain
    [e] = explain(clf, "seven.png", method="gradcam")
    e.overlay.save("seven-cam.png"); e.faithfulness["deletion_auc"]
"""

# The adapter modules register themselves in EXPLAINERS; they are imported here, by name,
# so the registry's contents are visible in one place.
from imgcls.explain import gradcam, integrated_gradients, lime_method, occlusion, shap_method  # noqa: F401
from imgcls.explain.base import EXPLAINERS, Explanation
from imgcls.explain.core import explain

METHODS = EXPLAINERS.names()

__all__ = ["EXPLAINERS", "METHODS", "Explanation", "explain"]
