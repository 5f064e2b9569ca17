"""In-memory image data without TensorFlow: IDX folders and augmented NumPy batches.

For Keras backends other than TensorFlow, and machines without it: `fit` takes
an `AugmentedBatches` (a `keras.utils.PyDataset`) as it takes a tf.data
pipeline.

    (x_train, y_train), (x_test, y_test) = arrays.load_idx("/usr/share/datasets/fashion-mnist")
    batches = arrays.AugmentedBatches(x_train, y_train, 128, pad=2, flip=True, seed=0)
    distiller.fit(batches, epochs=30)

Like `keras_feed.data`'s pipelines, the batches hold raw pixels (float32 in
[0, 255]: models keras-feed builds normalise them themselves), reshuffled
every epoch from `(seed, epoch)`, and augmented the CIFAR way: zero-pad
`pad` pixels, random crop back to the image size, random horizontal flip.
"""

import keras
import numpy as np

from keras_feed.data import idx_source


def load_idx(data_dir, name="idx"):
    """`(x_train, y_train), (x_test, y_test)` from a folder of the four IDX files.

    The same reader and checks as the tf.data path
    (`keras_feed.data.idx_source.load_idx_dir`): images come back as uint8
    `(N, H, W, C)` (a channel axis is added to grayscale files), labels as
    int32 `(N,)` in [0, classes) (10 for `name` "mnist" or "fashion_mnist").

    Raises:
      keras_feed.data.idx.DataError: one line naming a missing, corrupt or
        inconsistent file.
    """
    x_train, y_train, x_test, y_test, _ = idx_source.load_idx_dir(data_dir, name)
    return (x_train, y_train), (x_test, y_test)


def augment(images, rng, *, pad, flip):
    """Zero-pad `pad` pixels, crop back to the image size at random, flip at random.

    Args:
      images: `(B, H, W, C)` array.
      rng: a `numpy.random.Generator`: one crop offset pair and flip bit per image.
      pad: padding on each side (0: no crop).
      flip: whether to flip each image left-right with probability 1/2.

    Returns:
      A float32 `(B, H, W, C)` array.
    """
    images = np.asarray(images, dtype=np.float32)
    count, height, width, _ = images.shape
    if pad:
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        rows, cols = rng.integers(0, 2 * pad + 1, size=(2, count))
        images = np.stack(
            [padded[i, r:r + height, c:c + width] for i, (r, c) in enumerate(zip(rows, cols))]
        )
    if flip:
        flipped = rng.integers(0, 2, size=count).astype(bool)
        images[flipped] = images[flipped, :, ::-1]
    return images


class AugmentedBatches(keras.utils.PyDataset):
    """Shuffled, augmented batches of in-memory images, for `fit` on any backend.

    Each epoch has `len(images) // batch_size` full batches in an order drawn
    from `(seed, epoch)`; batch `i` of an epoch is augmented from
    `(seed, epoch, i)`, so a run is reproducible and `batch(epoch, i)` can be
    rebuilt at any position (e.g. by `checkpointing.fit_resumable`).

    Args:
      images: `(N, H, W, C)` raw pixels (uint8 or float).
      labels: `(N,)` integer labels (or `(N, classes)` one-hot).
      batch_size: examples per batch.
      pad: zero padding before the random crop (4 on 32x32 CIFAR images, 2 on
        28x28 ones); 0 turns cropping off.
      flip: random horizontal flips (off for digits).
      augment: False gives the shuffled batches unaugmented.
      seed: the order and augmentation seed.
      **kwargs: `keras.utils.PyDataset`'s (`workers`, ...).
    """

    def __init__(self, images, labels, batch_size, *, pad=4, flip=True, augment=True, seed=0, **kwargs):
        super().__init__(**kwargs)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        if not 0 < batch_size <= len(images):
            raise ValueError(f"batch_size={batch_size} must lie in [1, {len(images)}] (the examples).")
        self.images, self.labels = images, np.asarray(labels)
        self.batch_size, self.pad, self.flip = int(batch_size), int(pad), bool(flip)
        self.augment, self.seed = bool(augment), int(seed)
        self.epoch = 0

    def __len__(self):
        return len(self.images) // self.batch_size

    def batch(self, epoch, index):
        """Batch `index` of epoch `epoch`: `(float32 images, labels)`."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
        chosen = order[index * self.batch_size:(index + 1) * self.batch_size]
        images = np.asarray(self.images[chosen], dtype=np.float32)
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, index])
            images = augment(images, rng, pad=self.pad, flip=self.flip)
        return images, self.labels[chosen]

    def __getitem__(self, index):
        return self.batch(self.epoch, index)

    def on_epoch_end(self):
        self.epoch += 1
