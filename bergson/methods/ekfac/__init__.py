"""EK-FAC influence functions: the passes and fits (:mod:`.passes`), the queries and scores
(:mod:`.scoring`) and the ``bergson ekfac`` command (:mod:`.command`)."""

from ...collect.losses import document_seed, targets
from .command import STAGES, ekfac
from .passes import (
    BatchSource,
    DocumentSource,
    EkfacOptions,
    correction_sums,
    covariance_sums,
    example_gradients,
    fit_corrected_eigenvalues,
    fit_covariances,
    per_document_gradients,
    query_gradients,
    rank_documents,
    sum_over_ranks,
)
from .scoring import (
    Scores,
    precondition_queries,
    query_products,
    save_query_store,
    score_documents,
    score_modules,
)

__all__ = [
    "STAGES",
    "BatchSource",
    "DocumentSource",
    "EkfacOptions",
    "Scores",
    "correction_sums",
    "covariance_sums",
    "document_seed",
    "ekfac",
    "example_gradients",
    "fit_corrected_eigenvalues",
    "fit_covariances",
    "per_document_gradients",
    "precondition_queries",
    "query_gradients",
    "query_products",
    "rank_documents",
    "save_query_store",
    "score_documents",
    "score_modules",
    "sum_over_ranks",
    "targets",
]
