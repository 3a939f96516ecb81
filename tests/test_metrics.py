"""The numpy confusion matrix and precision / recall / F1 against scikit-learn's."""

import numpy as np
import pytest
import torch

from imgcls.evaluation.metrics import classification_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn(seed):
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    k, n = 6, 300
    y = rng.integers(0, k - 1, n)  # class 5 never occurs: zero support
    logits = torch.tensor(rng.normal(size=(n, k)), dtype=torch.float32)
    logits[np.arange(n) % 3 == 0, y[np.arange(n) % 3 == 0]] += 3.0  # a third right by a margin
    logits[:, 2] -= 10.0  # class 2 is never predicted: zero precision by zero_division=0
    m = classification_metrics(logits, torch.tensor(y), [f"c{i}" for i in range(k)])
    pred = logits.argmax(1).numpy()
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=list(range(k))).tolist()
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
    for i in range(k):
        got = m["per_class"][f"c{i}"]
        want = (p[i], r[i] if s[i] else None, f[i], s[i])  # no images of the class: no recall (null)
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(want)
    for avg in ("macro", "weighted"):
        # scikit-learn's default label set (classes with images or predictions): class 5 is
        # predicted, so it counts (precision 0) even without images
        pa, ra, fa, _ = precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        got = m[f"{avg}_avg"]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((pa, ra, fa))
    assert (pred == 5).any() and m["macro_avg"]["classes"] == k
    assert m["per_class"]["c2"]["precision"] == 0.0 and m["per_class"]["c5"]["support"] == 0


def test_format_metrics_columns_line_up_on_every_row():
    """'weighted avg' (12 characters) used to push its row's numbers right of the columns."""
    from imgcls.evaluation.metrics import format_metrics

    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    m = classification_metrics(logits, torch.tensor([0, 1, 1, 0]), ["a", "b"])
    lines = format_metrics(m).splitlines()
    table = lines[lines.index(next(l for l in lines if l.startswith("class"))):][:5]
    assert [r.split()[0] for r in table] == ["class", "a", "b", "macro", "weighted"]
    ends = {len(r) for r in table}
    assert len(ends) == 1, table  # every row ends at the support column's right edge
    assert table[-1].index("  ") == len("weighted avg")
