"""Data: offline datasets, image files, preprocessing for a model, and tuple sampling.

Nothing here downloads anything:

* :func:`make_shapes` and :func:`make_scenes` generate images with exact ground truth;
* :func:`load_fashion_mnist` reads Fashion-MNIST's IDX files from a local folder (the
  Debian package ``dataset-fashion-mnist`` installs them in
  ``/usr/share/datasets/fashion-mnist``);
* :func:`load_split` reads the class splits of CUB-200-2011, Cars196 and Stanford Online
  Products from their standard folders;
* :func:`square_photos` and :func:`read_photo` read scikit-image's bundled photographs;
* :func:`list_labelled_images` finds image files with labels from class folders, and
  :func:`resolve_preprocessing` turns them into the inputs a model expects;
* :func:`sample_tuples` draws index tuples (pairs, triplets, quadruplets) from labels.
"""

from . import (
    photo_scenes,
    photos,
    fashion_mnist,
    image_files,
    preprocessing,
    retrieval_benchmarks,
    scenes,
    shapes,
    tuples,
)
from .shapes import *  # noqa: F403
from .scenes import *  # noqa: F403
from .photo_scenes import *  # noqa: F403
from .photos import *  # noqa: F403
from .fashion_mnist import *  # noqa: F403
from .retrieval_benchmarks import *  # noqa: F403
from .image_files import *  # noqa: F403
from .preprocessing import *  # noqa: F403
from .tuples import *  # noqa: F403

__all__ = [
    *shapes.__all__,
    *scenes.__all__,
    *photo_scenes.__all__,
    *photos.__all__,
    *fashion_mnist.__all__,
    *retrieval_benchmarks.__all__,
    *image_files.__all__,
    *preprocessing.__all__,
    *tuples.__all__,
]
