"""Datasets and deterministic input pipelines for keras-feed.

Entry point: :func:`load` returns a :class:`Data` object whose ``train()``,
``test()``, ``train_eval()`` and ``validation()`` methods build ``tf.data`` pipelines of
``(images float32 (B, H, W, C), labels int32 (B,))``: raw pixels, values in
[0, 255] as the dataset stores them (after augmentation and resizing), never
normalised -- the models normalise their own inputs (see below).

Sources (``dataset_names()``):

* ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist`` -- TensorFlow
  Datasets, loaded into memory.  ``mnist`` / ``fashion_mnist`` are read
  locally instead when ``data_dir`` holds the four standard IDX files
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
  ``.gz``; the ``train-images.idx3-ubyte`` spelling is accepted too).
* ``imagenet2012`` -- TensorFlow Datasets, streamed (JPEG bytes are decoded in
  the pipeline).  TFDS cannot download ImageNet: put ``ILSVRC2012_img_train.tar``
  and ``ILSVRC2012_img_val.tar`` in ``<data_dir>/downloads/manual`` (the
  manual dir passed to TFDS) and the first ``load`` prepares it.  The test
  split is TFDS's ``validation`` split.
* ``idx`` -- any folder holding the four IDX files above;
  ``num_classes = max label + 1`` over train and test.
* ``folder`` -- ``data_dir/train/<class>/*.png|jpg|jpeg`` and
  ``data_dir/test/<class>/...`` (``val`` or ``validation`` are accepted in
  place of ``test``).  Classes are the sorted sub-folder names of ``train``;
  other files (e.g. ``.DS_Store``) are ignored.  Folders with at most
  ``FOLDER_VERIFY_LIMIT`` (20000) images are fully decoded at load time (an
  undecodable file raises :class:`DataError`); larger folders only get their
  magic bytes checked (PNG / JPEG signature) and are decoded while streaming.
  If every image has the same size <= 64 px (or ``image_size <= 64`` is
  given), the folder is treated like CIFAR ("cifar" augmentation, small folders
  are held in memory); otherwise images are streamed from disk with "imagenet"
  augmentation at ``image_size`` (default 224).  Small images of several
  sizes (e.g. 28x28 and 32x32) raise :class:`DataError` naming the sizes
  unless ``image_size`` says which size the model sees.
* ``synthetic`` -- a small, learnable toy task for smoke tests: 10 classes,
  16x16x3 images (``image_size`` overrides), each class a smooth random
  template plus Gaussian noise; 512 training examples (or ``train_examples``)
  and 256 test examples.  The task itself is fixed (it does not depend on
  ``seed``); it is only ever used when asked for by name.

Normalisation: ``DatasetInfo.mean`` and ``.std`` are the per-channel
statistics, in [0, 1] units, of the normalisation ``(x / 255 - mean) / std``
that every model keras-feed builds for the dataset carries as its first layer
(``keras_feed.models.build(..., mean=info.mean, std=info.std)``); the
pipelines themselves yield raw pixels, so a saved model is served with images
as they are stored.  CIFAR-10/100 use the usual per-channel constants,
``imagenet2012`` and ``folder`` ImageNet's; IDX, MNIST, Fashion-MNIST and
synthetic data compute mean/std over the *full* training split (not the
``train_examples`` subset, so models trained on different subsets normalise
their inputs identically), less the held-out validation examples if any.

Validation split: ``load(..., validation_examples=N)`` holds out N examples of
the training split -- the last N of ``RandomState(subset_seed).permutation``
of the full split, whatever ``train_examples`` is -- and ``Data.validation()``
gives them like ``test()`` (finite, unaugmented, in index order);
``DatasetInfo.num_validation`` / ``Data.num_validation`` count them.  The
training subset is drawn from the rest.  ``synthetic`` draws its validation
examples separately from its task; ``imagenet2012`` (a stream) has none.

Augmentation (``DatasetInfo.augment``):

* ``"cifar"``: zero-pad P pixels (P = 4 if the image is at least 32 px, else 2),
  random crop back to H x W, and a random horizontal flip -- except for
  ``mnist``, ``idx`` and ``synthetic`` which get the crop only (digits and
  unknown IDX data are not mirror-symmetric); see ``Data.flip``.
* ``"imagenet"``: random resized crop (scale 0.08-1, aspect ratio 3/4-4/3) to
  ``image_size`` plus a horizontal flip; evaluation resizes the shorter side to
  ``image_size / 0.875`` and takes the central crop.
* ``"none"``: no augmentation (what ``train(augment=False)`` does; ``load``
  itself never picks it).

Determinism: ``train()`` is ``Dataset.counter(start_epoch).flat_map(epoch)``.
Epoch ``e``'s order and augmentation depend only on ``(seed, e)`` (never on
TensorFlow's global seed): in-memory and file-list sources are permuted with
``tf.random.experimental.index_shuffle`` keyed by ``(seed, e)``.  "imagenet"
augmentation uses stateless ops keyed by ``(seed, e, position in epoch)``;
"cifar" augmentation is vectorised per batch: one ``stateless_uniform`` draw
keyed by ``(seed, e, position of the batch's first element)`` gives each
example its crop offsets and flip bit (so it also depends on the batch size).
Results are bitwise reproducible, parallel ``map`` is safe, and
``train(b, start_epoch=e, skip_batches=k)`` reproduces the uninterrupted run.
``imagenet2012`` cannot be accessed randomly, so its epochs permute consecutive
blocks of ``Data.stream_block`` (10000) examples instead (TFDS already shuffled
the examples when it prepared the dataset).
Modules: :mod:`.common` (``DatasetInfo``, constants, checks, subset and split),
:mod:`.idx_source`, :mod:`.folder`, :mod:`.tfds_source`, :mod:`.imagenet`,
:mod:`.synthetic` (the sources), :mod:`.pipeline` (``Data``) and
:mod:`.loader` (``load``, ``describe``).
"""

from keras_feed import lazy

# Loaded on first use: `data.idx` and `data.arrays` (and DataError, read_idx)
# need no TensorFlow; the pipelines do.
__getattr__, __dir__, __all__ = lazy.exports(
    __name__,
    ("arrays", "common", "folder", "idx", "idx_source", "imagenet", "loader", "pipeline",
     "synthetic", "tfds_source"),
    {
        **{name: ("keras_feed.data.common", name) for name in (
            "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
            "IMAGENET_GRAY_MEAN", "IMAGENET_GRAY_STD", "IMAGENET_MEAN", "IMAGENET_STD",
            "DatasetInfo", "dataset_names")},
        **{name: ("keras_feed.data.folder", name)
           for name in ("FOLDER_VERIFY_LIMIT", "SMALL_IMAGE_MAX")},
        **{name: ("keras_feed.data.loader", name)
           for name in ("describe", "describe_augmentation", "load")},
        "Data": ("keras_feed.data.pipeline", "Data"),
        "DataError": ("keras_feed.data.idx", "DataError"),
        "read_idx": ("keras_feed.data.idx", "read_idx"),
    },
)
