"""Configuration dataclasses shared by the command line, YAML files and the Python API.

Every command's config (:mod:`.commands`) is composed of option groups (:mod:`.options`), so a
command offers exactly the options it reads (the groups themselves are in :mod:`.options`). Each field's docstring is its ``--help`` text.
Nothing here imports torch, so that ``bergson --help`` answers quickly.
"""

from .commands import (
    ConvertConfig,
    EkfacConfig,
    IndexConfig,
    MagicConfig,
    ModelConfigTestConfig,
    PreconditionerConfig,
    QueryConfig,
    ReduceConfig,
    ReportConfig,
    ScoreConfig,
    ServeConfig,
    SourceConfig,
    TrackstarConfig,
    TrakConfig,
    ValidateConfig,
    VerifyConfig,
)
from .io import ALIASES, from_dict, load_yaml, options_of, save_yaml, to_dict
from .options import DampingMode, DataConfig, FaissConfig, ModelOptions, Precision, TrainingConfig
from .self_influence import SelfInfluenceConfig
from .unroll import UnrollConfig

__all__ = [
    "ALIASES",
    "ConvertConfig",
    "DampingMode",
    "DataConfig",
    "EkfacConfig",
    "FaissConfig",
    "IndexConfig",
    "MagicConfig",
    "ModelConfigTestConfig",
    "ModelOptions",
    "Precision",
    "PreconditionerConfig",
    "QueryConfig",
    "ReduceConfig",
    "ReportConfig",
    "ScoreConfig",
    "SelfInfluenceConfig",
    "ServeConfig",
    "SourceConfig",
    "TrackstarConfig",
    "TrainingConfig",
    "TrakConfig",
    "UnrollConfig",
    "ValidateConfig",
    "VerifyConfig",
    "from_dict",
    "load_yaml",
    "options_of",
    "save_yaml",
    "to_dict",
]
