"""Episodic training of in-context networks (`train_incontext`)."""

from medseg.engine.incontext.train import InContextTrainConfig, train_incontext

__all__ = ["InContextTrainConfig", "train_incontext"]
