"""HarMA: parameter-efficient adapters on a frozen open_clip CLIP for remote-sensing retrieval.

Huang et al., "Efficient Remote Sensing with Harmonized Transfer Learning and Modality Alignment",
ICLR 2024 workshop, arXiv 2404.18253. Importing this package loads no weights and makes no
network calls.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .archs import register_model_config
from .checkpoint import load_adapter_weights, load_adapters, read_adapter_config, save_adapters
from .config import HarmaConfig, ModelConfig, MRSConfig
from .errors import (
                     BaseWeightsError,
                     CheckpointError,
                     ConfigError,
                     DatasetError,
                     HarmaError,
                     NonFiniteEmbeddingError,
                     UnsupportedModelError,
)
from .inject import find_towers, remove_adapters
from .losses import HarmaLoss, LossConfig
from .model import HarmaModel, build_clip, create_model
from .retrieval import EmbeddingIndex, Retriever
from .weights import load_base_weights

__all__ = [
    "__version__",
    "BaseWeightsError",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "EmbeddingIndex",
    "HarmaConfig",
    "HarmaError",
    "HarmaLoss",
    "HarmaModel",
    "LossConfig",
    "ModelConfig",
    "MRSConfig",
    "NonFiniteEmbeddingError",
    "UnsupportedModelError",
    "build_clip",
    "create_model",
    "find_towers",
    "load_adapter_weights",
    "load_adapters",
    "load_base_weights",
    "read_adapter_config",
    "register_model_config",
    "remove_adapters",
    "Retriever",
    "save_adapters",
]
