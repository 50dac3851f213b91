"""EK-FAC influence functions: the passes and fits (:mod:`.passes`), the queries and scores
(:mod:`.scoring`) and the ``bergson ekfac`` command (:mod:`.command`)."""

from ...collect.losses import document_seed, targets
from .command import STAGES, ekfac
from .ihvp import IHVP_METHODS, IhvpOptions, batch_products, document_products, fisher_products, solve
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
    "IHVP_METHODS",
    "STAGES",
    "BatchSource",
    "DocumentSource",
    "EkfacOptions",
    "IhvpOptions",
    "Scores",
    "batch_products",
    "correction_sums",
    "covariance_sums",
    "document_products",
    "document_seed",
    "ekfac",
    "example_gradients",
    "fisher_products",
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
    "solve",
    "sum_over_ranks",
    "targets",
]
