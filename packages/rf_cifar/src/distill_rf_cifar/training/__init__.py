"""The one training loop and its in-memory, resumable data."""

from distill_rf_cifar.training.data import (
           EpochOrder,
           ImageLabelData,
           PairData,
           TrainingData,
           load_cifar_training_data,
)
from distill_rf_cifar.training.loop import TrainingCallback, TrainResult, save_checkpoint, train

__all__ = ["EpochOrder", "ImageLabelData", "PairData", "TrainResult", "TrainingCallback", "TrainingData",
           "load_cifar_training_data", "save_checkpoint", "train"]
