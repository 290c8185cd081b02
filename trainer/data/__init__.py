"""The data layer: sources of preference rows, image transforms, datasets, samplers, loaders."""
from .base import DataStats, ExampleSource, MapSource, StreamSource
from .dataset import PreferenceDataset, ResumableSampler, collate
from .errors import BadImageError, DataError
from .loader import ResumableLoader, make_loader
from .records import PreferenceExample, ProcessedExample, TrainBatch
from .sources import DataSpec, open_examples
from .streaming import StreamingPreferenceDataset, StreamPosition
from .transforms import ImageTransform, decode_image

__all__ = [
    "BadImageError", "DataError", "DataSpec", "DataStats", "ExampleSource", "ImageTransform", "MapSource",
    "PreferenceDataset", "PreferenceExample", "ProcessedExample", "ResumableLoader", "ResumableSampler",
    "StreamPosition", "StreamSource", "StreamingPreferenceDataset", "TrainBatch", "collate", "decode_image",
    "make_loader", "open_examples",
]
