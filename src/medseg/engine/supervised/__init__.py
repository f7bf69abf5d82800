"""Supervised training (`train`) of the networks in `medseg.models.supervised` from a plan."""

from medseg.engine.supervised.train import TrainOptions, TrainResult, train

__all__ = ["TrainOptions", "TrainResult", "train"]
