"""Datasets on disk (nnU-Net raw layout, images/ + masks/ folders) and their checks."""

from medseg.data.dataset import Case, Dataset, find_dataset_json, label_names_of, open_dataset, read_dataset_json

__all__ = ["Case", "Dataset", "find_dataset_json", "label_names_of", "open_dataset", "read_dataset_json"]
