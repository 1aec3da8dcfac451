"""dreidel.api: the Keras-like ``Sequential`` (add / compile / fit / evaluate / predict / save / load)."""

from dreidel.api.callbacks import CSVLogger, Callback, EarlyStopping, LearningRateScheduler, ModelCheckpoint
from dreidel.api.history import History
from dreidel.api.layer_specs import LAYER_TYPES, build_layer, layer_spec, register_layer_type
from dreidel.api.losses import LOSSES, CrossEntropy, KLDivergence, MeanSquaredError, resolve_loss
from dreidel.api.metrics import Accuracy, TopKAccuracy, resolve_metric
from dreidel.api.sequential import Sequential, load

__all__ = [
    "LAYER_TYPES",
    "LOSSES",
    "Accuracy",
    "CSVLogger",
    "Callback",
    "CrossEntropy",
    "EarlyStopping",
    "History",
    "KLDivergence",
    "LearningRateScheduler",
    "MeanSquaredError",
    "ModelCheckpoint",
    "Sequential",
    "TopKAccuracy",
    "build_layer",
    "layer_spec",
    "load",
    "register_layer_type",
    "resolve_loss",
    "resolve_metric",
]
