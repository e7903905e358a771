"""Radiograph data: the built-in phantom, folder readers (PNG/TIFF/JPEG/DICOM), targets and fitting."""

from memtrain.data.datasets import FolderDataset, PhantomDataset
from memtrain.data.enhance import conventional_enhance
from memtrain.data.phantom import phantom_radiograph
from memtrain.data.readers import read_image

__all__ = ["FolderDataset", "PhantomDataset", "conventional_enhance", "phantom_radiograph", "read_image"]
