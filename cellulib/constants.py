"""The facts every layer shares, defined once: classes and channel order, pixel size and scale,
pixel normalisation, cellularity bins, image files.

Nothing here imports the rest of the library, so any module may import it.
"""
from __future__ import annotations

#: Mask and segmentation-output channels, in order (SPEC 2): three nucleus classes, then background.
CLASSES: tuple[str, ...] = ("normal", "lymphocyte", "malignant", "background")
#: The nucleus classes (every channel but background), in channel order.
NUCLEUS_CLASSES: tuple[str, ...] = CLASSES[:3]
#: Channel index of the background.
BACKGROUND: int = 3
#: Channel indices of the nucleus classes, ``(0, 1, 2)``.
NUCLEUS_CHANNELS: tuple[int, ...] = tuple(range(len(NUCLEUS_CLASSES)))

#: Pixel size of the training data in micrometres per pixel: BreastPathQ and BRCA-M2C were scanned
#: at 20x (about 0.5 um/px), and the synthetic generator draws nuclei at that scale. Model files
#: record it (``meta["pixel_size"]``) so that ``cellulib slide`` and ``--mpp`` can resample other
#: scans to it.
MPP: float = 0.5

#: Paper 4.2: patches are downscaled x2 before the segmentation network, where nuclei are drawn as
#: 15 px discs. Model files record both (``meta["params"]``); these are the values when absent.
SEG_DOWNSCALE: float = 2
DISC_DIAMETER: float = 15.0

#: The haematoxylin and eosin stain vectors: optical densities (log10 units) in RGB order, the
#: reference vectors of Macenko et al. (2009). The synthetic generator stains with them and the
#: stain normaliser checks that an image's fitted vectors lie near them.
H_STAIN_VECTOR: tuple[float, float, float] = (0.5626, 0.7201, 0.4062)
E_STAIN_VECTOR: tuple[float, float, float] = (0.2159, 0.8012, 0.5581)

#: Smallest nucleus probability at a detected nucleus centre (``cellulib detect``). On the BRCA-M2C
#: validation split the pooled detection F of the quick-profile FPN (32 epochs) moved by 0.015
#: between thresholds 0.15 and 0.5 (0.819 to 0.834), tumour F by 0.009; 0.3 sits in that plateau.
#: It was not tuned on a test set.
DETECTION_THRESHOLD: float = 0.3

#: The segmentation networks' total stride: their input sides must be multiples of it.
STRIDE: int = 32

#: Pixel normalisations understood by the DataLoaders and the predictors: ``minus_one_one`` maps
#: [0, 255] to [-1, 1] (paper 4.2), ``imagenet`` scales to [0, 1] and standardises with ImageNet's
#: channel mean and std (for torchvision/timm ImageNet weights).
NORMALIZATIONS: tuple[str, ...] = ("minus_one_one", "imagenet")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Paper 4.4: the cellularity classifier predicts one of 101 bins, 0.00, 0.01, ..., 1.00.
N_BINS: int = 101

#: Suffixes of the image files a folder contributes (``cellulib predict DIR``, dataset folders).
IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
#: The first four bytes of a classic or BigTIFF file, little- or big-endian: a TIFF is recognised
#: by these, not by its suffix.
TIFF_MAGIC: tuple[bytes, ...] = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
