"""Long-tailed datasets: profiles, LDAM-DRW subsets, real on-disk sources and device-resident loaders."""

from .datasets import DATASETS, SOURCES, Augment, ImageFiles, LongTailData, build_dataset, load_source
from .downloads import download, download_cifar, download_idx
from .loaders import DeviceLoader, ImageFileDataset, file_loader, normalize, random_crop_flip
from .sampling import SAMPLERS, ClassSampler, class_sampling_probs
from .profiles import long_tail_counts, long_tail_indices, stratified_split
from .sources import read_cifar, read_idx, read_image_list, read_inat_json, safe_unpickle
from .tabular import TabularPreprocessing, read_csv, read_feature_file

__all__ = [
    "DATASETS", "SAMPLERS", "SOURCES", "Augment", "ClassSampler", "class_sampling_probs", "DeviceLoader", "ImageFileDataset", "ImageFiles", "LongTailData",
    "build_dataset", "download", "download_cifar", "download_idx", "file_loader", "load_source",
    "long_tail_counts", "long_tail_indices", "normalize", "random_crop_flip", "read_cifar", "read_csv",
    "read_idx", "read_image_list", "read_inat_json", "safe_unpickle", "stratified_split", "TabularPreprocessing",
    "read_feature_file",
]
