"""Curating labels: workflows on top of the API (like ``runs``, rank 8).

* :mod:`imgcls.curation.label_issues` - out-of-fold probabilities + cleanlab: labels that are
  probably wrong (``imgcls label-issues``).
* :mod:`imgcls.curation.gallery` - the self-contained thumbnail page beside each CSV.
"""

# the ranking strategies (imgcls rank --strategy): here, so the command line lists them without
# importing numpy/torch (imgcls --help stays fast)
STRATEGIES = ("margin", "entropy", "coreset", "hybrid", "random")
