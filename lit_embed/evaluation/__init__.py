"""Retrieval evaluation: the metric names here (no torch needed to read them), exact search and metrics in ``ir``,
scoring an encoder in ``retrieval``."""

# sentence-transformers' InformationRetrievalEvaluator defaults.
DEFAULT_K = dict(
    accuracy=(1, 3, 5, 10), precision=(1, 3, 5, 10), recall=(1, 3, 5, 10), mrr=(10,), ndcg=(10,), map=(100,)
)
METRIC_NAMES = tuple(f"{metric}@{k}" for metric, ks in DEFAULT_K.items() for k in ks)
# The metric that picks the best checkpoint, ranks sweep jobs and is maximized by Optuna, unless configured.
DEFAULT_METRIC = "ndcg@10"
# The rows of the before/after table printed at the end of a run.
METRIC_TABLE_KEYS = ("mrr@10", "ndcg@10", "map@100", "recall@10", "accuracy@1", "accuracy@5", "accuracy@10")
