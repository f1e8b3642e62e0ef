"""The dataset layer: named datasets with validated parameters, built into a DataBundle."""

from xdsl.data.bundle import DataBundle, seed_worker
from xdsl.data.datasets import DATASETS, RETRIEVAL_DATASETS, build_data, dataset_params, input_shape, spec_params
from xdsl.data.params import BuildContext, DataParamError

__all__ = [
    "DATASETS",
    "RETRIEVAL_DATASETS",
    "BuildContext",
    "DataBundle",
    "DataParamError",
    "build_data",
    "dataset_params",
    "input_shape",
    "seed_worker",
    "spec_params",
]
