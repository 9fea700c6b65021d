"""The one training loop and its in-memory, resumable data."""

from distill_rf_cifar.training.data import (
           EpochOrder,
           ImageLabelData,
           PairData,
           PairsWithImages,
           TrainingData,
           load_cifar_training_data,
)
from distill_rf_cifar.training.loop import LossHooks, TrainingCallback, TrainResult, save_checkpoint, train

__all__ = ["EpochOrder", "ImageLabelData", "LossHooks", "PairData", "PairsWithImages", "TrainResult", "TrainingCallback", "TrainingData",
           "load_cifar_training_data", "save_checkpoint", "train"]
