"""Losses of the method: DMD gradient and critic flow loss, adaptive regression, temporal regularization."""

from engine.losses.dmd import critic_flow_loss, dmd_gradient, dmd_loss
from engine.losses.regression import AdaptiveRegressionLoss, per_sample_mse
from engine.losses.temporal import temporal_regularization

__all__ = [
    "AdaptiveRegressionLoss",
    "critic_flow_loss",
    "dmd_gradient",
    "dmd_loss",
    "per_sample_mse",
    "temporal_regularization",
]
