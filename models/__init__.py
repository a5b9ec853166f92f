"""fedslim model zoo, datasets, partitioners and counting.

`models.__version__` is the single version source of the distribution.
"""

from models.counting import count_macs, count_params
from models.datasets import (
    DatasetError,
    ImageDataset,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    make_synthetic,
)
from models.partition import label_histograms, partition
from models.training import EvalStats, TrainStats, evaluate, train_epochs
from models.zoo import MODEL_NAMES, build_model

__version__ = "0.1.0"

__all__ = [
    "MODEL_NAMES",
    "DatasetError",
    "EvalStats",
    "ImageDataset",
    "TrainStats",
    "__version__",
    "build_model",
    "count_macs",
    "count_params",
    "evaluate",
    "label_histograms",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "make_synthetic",
    "partition",
    "train_epochs",
]
