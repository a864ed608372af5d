"""Datasets as WebDataset shards, and the one loader contract every backend follows."""

from pipeline.data.convert import read_manifest, write_digits, write_synthetic
from pipeline.data.loaders import Loader, build_loader

__all__ = ["Loader", "build_loader", "read_manifest", "write_digits", "write_synthetic"]
