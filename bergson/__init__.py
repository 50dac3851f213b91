"""bergson: training-data attribution for language models and custom PyTorch models.

The public API is imported lazily, so that ``import bergson`` (and ``bergson --help``)
stays fast until torch is actually needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "BergsonError": "bergson.errors",
    "DataConfig": "bergson.config",
    "IndexConfig": "bergson.config",
    "AttentionConfig": "bergson.core.layout",
    "GradientCollector": "bergson.collect.hooks",
    "collect_gradients": "bergson.methods.compat",
    "GradientProcessor": "bergson.methods.compat",
    "load_gradient_dataset": "bergson.store.reader",
    "per_example_gradients": "bergson.collect.generic",
    "ExampleGradients": "bergson.collect.generic",
    "gradient_scores": "bergson.methods.custom",
    "fit_second_moment": "bergson.methods.custom",
    "trackstar_scores": "bergson.methods.custom",
    "fit_ekfac": "bergson.methods.custom",
    "ekfac_scores": "bergson.methods.custom",
    "EkfacFactors": "bergson.methods.custom",
    "source_scores": "bergson.methods.custom",
    "adam_step_preconditioner": "bergson.methods.source",
    "per_document_loss": "bergson.collect.losses",
    "InMemorySink": "bergson.collect.loop",
    "AdafactorNormalizer": "bergson.transforms.normalizers",
    "AdamNormalizer": "bergson.transforms.normalizers",
    "KfacWhitening": "bergson.transforms.normalizers",
    "whitening_from_ekfac": "bergson.transforms.whitening",
    "projection_matrix": "bergson.transforms.projection",
    "GradientStore": "bergson.store.reader",
    "load_gradients": "bergson.store.reader",
    "verify_store": "bergson.store.verify",
    "VerifyReport": "bergson.store.verify",
    "build": "bergson.methods.build",
    "load_data": "bergson.data.load",
    "tokenize_documents": "bergson.data.tokenize",
    "load_model": "bergson.models",
    "find_tracked_modules": "bergson.models",
    "Attributor": "bergson.search.attributor",
    "FaissConfig": "bergson.config",
    "exact_topk": "bergson.search.exact",
    "QueryConfig": "bergson.config",
    "ScoreConfig": "bergson.config",
    "ReduceConfig": "bergson.config",
    "score": "bergson.scoring",
    "reduce": "bergson.reduction",
    "query": "bergson.querying",
    "PreconditionerConfig": "bergson.config",
    "TrackstarConfig": "bergson.config",
    "Preconditioner": "bergson.transforms.preconditioners",
    "StatisticsSink": "bergson.transforms.preconditioners",
    "load_preconditioner": "bergson.transforms.preconditioners",
    "mix_preconditioners": "bergson.transforms.preconditioners",
    "fit_preconditioner": "bergson.preconditioning",
    "trackstar": "bergson.methods.trackstar",
    "trak": "bergson.methods.trak",
    "trak_scores": "bergson.methods.trak",
    "TrakConfig": "bergson.config",
    "source": "bergson.methods.source",
    "cascade": "bergson.methods.cascade",
    "cascade_config": "bergson.methods.cascade",
    "unrolled_queries": "bergson.methods.source",
    "SourceConfig": "bergson.config",
    "ekfac": "bergson.methods.ekfac",
    "EkfacConfig": "bergson.config",
    "normalizers_from_optimizer_state": "bergson.transforms.optimizer_state",
    "MagicConfig": "bergson.config",
    "TrainingConfig": "bergson.config",
    "ValidateConfig": "bergson.config",
    "magic": "bergson.methods.magic",
    "unroll": "bergson.methods.magic.unroll",
    "UnrollConfig": "bergson.config",
    "validate": "bergson.validation",
    "GradientCollectorCallback": "bergson.integrations",
    "prepare_for_gradient_collection": "bergson.integrations",
    "ModelConfigTestConfig": "bergson.config",
    "test_model_configuration": "bergson.diagnostics",
    "ReportConfig": "bergson.config",
    "ServeConfig": "bergson.config",
    "report": "bergson.reports",
    "serve": "bergson.reports",
    "self_influence": "bergson.methods.self_influence",
    "SelfInfluenceConfig": "bergson.config",
}

__all__ = [  # noqa: RUF022 - grouped like _EXPORTS
    "AttentionConfig",
    "__version__",
    "BergsonError",
    "DataConfig",
    "IndexConfig",
    "GradientCollector",
    "collect_gradients",
    "GradientProcessor",
    "load_gradient_dataset",
    "per_example_gradients",
    "ExampleGradients",
    "gradient_scores",
    "fit_second_moment",
    "trackstar_scores",
    "fit_ekfac",
    "ekfac_scores",
    "EkfacFactors",
    "source_scores",
    "adam_step_preconditioner",
    "per_document_loss",
    "InMemorySink",
    "AdafactorNormalizer",
    "AdamNormalizer",
    "KfacWhitening",
    "whitening_from_ekfac",
    "projection_matrix",
    "GradientStore",
    "load_gradients",
    "verify_store",
    "VerifyReport",
    "build",
    "load_data",
    "tokenize_documents",
    "load_model",
    "find_tracked_modules",
    "Attributor",
    "FaissConfig",
    "exact_topk",
    "QueryConfig",
    "ScoreConfig",
    "ReduceConfig",
    "score",
    "reduce",
    "query",
    "PreconditionerConfig",
    "TrackstarConfig",
    "Preconditioner",
    "StatisticsSink",
    "load_preconditioner",
    "mix_preconditioners",
    "fit_preconditioner",
    "trackstar",
    "trak",
    "trak_scores",
    "TrakConfig",
    "source",
    "cascade",
    "cascade_config",
    "unrolled_queries",
    "SourceConfig",
    "ekfac",
    "EkfacConfig",
    "normalizers_from_optimizer_state",
    "MagicConfig",
    "TrainingConfig",
    "ValidateConfig",
    "magic",
    "unroll",
    "UnrollConfig",
    "validate",
    "GradientCollectorCallback",
    "prepare_for_gradient_collection",
    "ModelConfigTestConfig",
    "test_model_configuration",
    "ReportConfig",
    "ServeConfig",
    "report",
    "serve",
    "self_influence",
    "SelfInfluenceConfig",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bergson' has no attribute {name!r}")


if TYPE_CHECKING:
    from .collect.generic import ExampleGradients, per_example_gradients
    from .collect.hooks import GradientCollector
    from .collect.loop import InMemorySink
    from .collect.losses import per_document_loss
    from .config import (
        DataConfig,
        EkfacConfig,
        FaissConfig,
        IndexConfig,
        MagicConfig,
        ModelConfigTestConfig,
        PreconditionerConfig,
        QueryConfig,
        ReduceConfig,
        ReportConfig,
        ScoreConfig,
        SelfInfluenceConfig,
        ServeConfig,
        SourceConfig,
        TrackstarConfig,
        TrainingConfig,
        TrakConfig,
        UnrollConfig,
        ValidateConfig,
    )
    from .core.layout import AttentionConfig
    from .data.load import load_data
    from .data.tokenize import tokenize_documents
    from .diagnostics import test_model_configuration
    from .errors import BergsonError
    from .integrations import GradientCollectorCallback, prepare_for_gradient_collection
    from .methods.build import build
    from .methods.cascade import cascade, cascade_config
    from .methods.compat import GradientProcessor, collect_gradients
    from .methods.custom import (
        EkfacFactors,
        ekfac_scores,
        fit_ekfac,
        fit_second_moment,
        gradient_scores,
        source_scores,
        trackstar_scores,
    )
    from .methods.ekfac import ekfac
    from .methods.magic import magic
    from .methods.magic.unroll import unroll
    from .methods.self_influence import self_influence
    from .methods.source import adam_step_preconditioner, source, unrolled_queries
    from .methods.trackstar import trackstar
    from .methods.trak import trak, trak_scores
    from .models import find_tracked_modules, load_model
    from .preconditioning import fit_preconditioner
    from .querying import query
    from .reduction import reduce
    from .reports import report, serve
    from .scoring import score
    from .search.attributor import Attributor
    from .search.exact import exact_topk
    from .store.reader import GradientStore, load_gradient_dataset, load_gradients
    from .store.verify import VerifyReport, verify_store
    from .transforms.normalizers import AdafactorNormalizer, AdamNormalizer, KfacWhitening
    from .transforms.optimizer_state import normalizers_from_optimizer_state
    from .transforms.preconditioners import (
        Preconditioner,
        StatisticsSink,
        load_preconditioner,
        mix_preconditioners,
    )
    from .transforms.projection import projection_matrix
    from .transforms.whitening import whitening_from_ekfac
    from .validation import validate
