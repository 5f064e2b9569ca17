"""The `Data` class: a loaded dataset's deterministic ``tf.data`` pipelines.

Training order, augmentation ("cifar" per global batch, "imagenet" per
example), sharding across workers, and the finite evaluation pipelines of the
test split, the training subset and the held-out validation split. The
sources (:mod:`.idx_source`, :mod:`.folder`, :mod:`.tfds_source`,
:mod:`.imagenet`, :mod:`.synthetic`) hand it a ``source`` dict of in-memory
arrays ("array"), image file paths ("files") or TFDS streams ("stream").
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_feed.data.common import SALT as _SALT
from keras_feed.data.common import check_int as _check_int
from keras_feed.data.idx import DataError

AUTOTUNE = tf.data.AUTOTUNE


def _no_autograph(fn):
    return tf.autograph.experimental.do_not_convert(fn)


def _derive(key, value):
    """Mixes integer ``value`` into a [2] int64 stateless seed."""
    return tf.random.fold_in(key, tf.cast(value, tf.int64), alg="philox")


class Data:
    """A loaded dataset: metadata plus deterministic ``tf.data`` pipelines.

    Attributes:
      info: :class:`DatasetInfo`.
      train_indices: int64 array, the indices (into the full training split) of
        the training examples used, sorted.  ``arange(num_train)`` without
        ``train_examples`` (and without ``validation_examples``).
      validation_indices: int64 array, the indices (into the full training
        split) of the held-out validation examples, sorted; empty without
        ``validation_examples``.  For ``synthetic``, whose validation examples
        are a draw of their own, ``arange(num_validation)``.
      seed: seed of the epoch order and augmentation (``load``'s ``seed``;
        the subset uses ``subset_seed``, which defaults to it).
      flip: whether "cifar"/"imagenet" augmentation includes a horizontal flip.
      class_names: class folder names for ``folder``, else ``None``.
    """

    #: imagenet2012 streams are shuffled within blocks of this many examples.
    stream_block = 10000

    def __init__(self, info, *, seed, train_indices, flip, source, class_names=None,
                 channels=None, validation_indices=None):
        self.info = info
        self.seed = int(seed)
        self.train_indices = train_indices
        self.validation_indices = (
            np.zeros(0, np.int64) if validation_indices is None else validation_indices
        )
        self.flip = bool(flip)
        self.class_names = class_names
        self._source = source  # dict, see load()
        self._kind = source["kind"]  # "array" | "files" | "stream"
        h, w, c = info.image_shape
        self._size = (h, w)
        self._channels = c if channels is None else channels
        self._pad = 4 if min(h, w) >= 32 else 2
        self._base_key = tf.constant([self.seed, _SALT], tf.int64)
        if self._kind == "array":
            self._x_train = tf.constant(source["x_train"])
            self._y_train = tf.constant(source["y_train"])
            self._x_test = tf.constant(source["x_test"])
            self._y_test = tf.constant(source["y_test"])
            if "y_val" in source:
                self._x_val = tf.constant(source["x_val"])
                self._y_val = tf.constant(source["y_val"])
        elif self._kind == "files":
            self._p_train = tf.constant(source["p_train"])
            self._y_train = tf.constant(source["y_train"])
            self._p_test = tf.constant(source["p_test"])
            self._y_test = tf.constant(source["y_test"])
            if "y_val" in source:
                self._p_val = tf.constant(source["p_val"])
                self._y_val = tf.constant(source["y_val"])

    def __repr__(self):
        return f"Data({self.info!r}, seed={self.seed}, flip={self.flip})"

    # ------------------------------------------------------------ public API

    @property
    def num_validation(self):
        """Examples held out of the training split (``info.num_validation``)."""
        return self.info.num_validation

    def steps_per_epoch(self, batch_size):
        """Full batches per training epoch (``num_train // batch_size``)."""
        batch_size = _check_int(batch_size, "batch_size", 1)
        if batch_size > self.info.num_train:
            raise DataError(
                f"batch_size={batch_size} exceeds the {self.info.num_train} "
                f"training examples of '{self.info.name}'"
            )
        return self.info.num_train // batch_size

    def train(self, batch_size, *, seed=None, start_epoch=0, skip_batches=0, augment=True,
              shard=None):
        """Infinite, shuffled, augmented training batches (drop_remainder).

        ``Dataset.counter(start_epoch).flat_map(one epoch)``: every epoch holds
        exactly ``steps_per_epoch`` full batches and is fully determined by
        ``(seed, epoch)``.  ``skip_batches`` drops the first batches of
        ``start_epoch`` (values >= steps_per_epoch roll over into later
        epochs), so ``train(b, start_epoch=e, skip_batches=k)`` continues an
        interrupted run exactly. ``seed`` replaces the dataset's seed for this
        pipeline (e.g. one seed per teacher over the same subset).

        ``shard=(count, index)`` gives one of ``count`` workers its share of
        every global batch of ``batch_size`` (which ``count`` must divide):
        batches of ``batch_size // count`` holding the elements at positions
        ``index, index + count, ...`` of the epoch's order. The shards of a
        step together hold exactly that step's unsharded batch, so no example
        is used twice in an epoch; each worker gathers and augments only its
        own examples.
        """
        steps = self.steps_per_epoch(batch_size)
        if shard is not None:
            count, index = (_check_int(value, "shard", 0) for value in shard)
            if not 0 <= index < count or batch_size % count:
                raise DataError(
                    f"shard={tuple(shard)} must be (count, index) with 0 <= index < "
                    f"count and count dividing batch_size={batch_size}"
                )
        start_epoch = _check_int(start_epoch, "start_epoch", 0)
        skip_batches = _check_int(skip_batches, "skip_batches", 0)
        start_epoch += skip_batches // steps
        skip_batches %= steps
        per_epoch = steps * batch_size
        base_key = (
            self._base_key if seed is None else tf.constant([int(seed), _SALT], tf.int64)
        )

        if self._kind in ("array", "files"):
            n = tf.constant(self.info.num_train - 1, tf.int64)

            def one_epoch(epoch):
                epoch_key = _derive(base_key, epoch)
                order_key, aug_key = _derive(epoch_key, 0), _derive(epoch_key, 1)
                pos = tf.range(per_epoch, dtype=tf.int64)
                order = tf.random.experimental.index_shuffle(pos, order_key, n)
                keys = tf.tile(aug_key[None, :], [per_epoch, 1])
                return tf.data.Dataset.from_tensor_slices((keys, pos, order))
        else:
            block = int(self.stream_block)
            stream = self._stream("train")

            def one_epoch(epoch):
                epoch_key = _derive(base_key, epoch)
                order_key, aug_key = _derive(epoch_key, 0), _derive(epoch_key, 1)

                def permute(block_no, elems):
                    contents, labels = elems
                    size = tf.shape(labels, out_type=tf.int64)[0]
                    perm = tf.random.experimental.index_shuffle(
                        tf.range(size), _derive(order_key, block_no), size - 1)
                    return tf.gather(contents, perm), tf.gather(labels, perm)

                ds = stream.batch(block).enumerate().map(permute).unbatch()
                ds = ds.take(per_epoch).enumerate()
                return ds.map(lambda p, el: (aug_key, p, el[0], el[1]))

        ds = tf.data.Dataset.counter(start_epoch).flat_map(_no_autograph(one_epoch))
        if skip_batches:
            ds = ds.skip(skip_batches * batch_size)
        global_batch = batch_size
        if shard is not None:
            ds = ds.shard(count, index)
            batch_size //= count
        do_augment = augment and self.info.augment != "none"
        imagenet = self.info.augment == "imagenet"

        if self._kind == "array":
            # Gather whole batches from the in-memory arrays: no per-element work.
            ds = ds.batch(batch_size, drop_remainder=True)

            def gather(aug_key, pos, idx):
                images = self._ensure_size(tf.gather(self._x_train, idx))
                return aug_key, pos, images, tf.gather(self._y_train, idx)

            ds = ds.map(_no_autograph(gather), num_parallel_calls=AUTOTUNE,
                        deterministic=True)
        else:
            def element(aug_key, pos, *payload):
                image, label = self._fetch("train", *payload)
                if do_augment and imagenet:
                    image = self._imagenet_augment(image, _derive(aug_key, pos))
                else:
                    image = self._eval_transform(image)
                return aug_key, pos, image, label

            ds = ds.map(_no_autograph(element), num_parallel_calls=AUTOTUNE,
                        deterministic=True)
            ds = ds.batch(batch_size, drop_remainder=True)

        def finish(aug_key, pos, images, labels):
            if do_augment and not imagenet:
                # One stateless draw per global batch, keyed by (seed, epoch,
                # position of the global batch's first element in the epoch);
                # each example takes the row of its position in the global
                # batch, so a shard is augmented as in the unsharded batch.
                start = pos[0] - tf.math.floormod(pos[0], global_batch)
                images = self._cifar_augment(
                    images, _derive(aug_key[0], start), positions=pos - start,
                    num_draws=global_batch,
                )
            return images, labels

        ds = ds.map(_no_autograph(finish), num_parallel_calls=AUTOTUNE, deterministic=True)
        ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
        return ds.prefetch(AUTOTUNE)

    def test(self, batch_size):
        """Finite test batches in file order, unaugmented; keeps the partial batch."""
        return self._finite("test", batch_size)

    def train_eval(self, batch_size):
        """The training subset, finite, in index order, unaugmented."""
        return self._finite("train", batch_size)

    def validation(self, batch_size):
        """The held-out validation examples, like ``test()``: finite, in index
        order, unaugmented, keeping the partial batch.

        Only with ``load(..., validation_examples=N)``; otherwise a one-line
        :class:`DataError`.
        """
        if not self.info.num_validation:
            raise DataError(
                f"'{self.info.name}' was loaded without a validation split: pass "
                "validation_examples= to load (--validation_examples)"
            )
        return self._finite("validation", batch_size)

    # ------------------------------------------------------------ internals

    def _split(self, split, prefix):
        """The "train" / "test" / "validation" tensor named ``prefix`` ("x", "y", "p")."""
        suffix = {"train": "train", "test": "test", "validation": "val"}[split]
        return getattr(self, f"_{prefix}_{suffix}")

    def _finite(self, split, batch_size):
        batch_size = _check_int(batch_size, "batch_size", 1)
        if self._kind == "array":
            x, y = self._split(split, "x"), self._split(split, "y")
            ds = tf.data.Dataset.range(int(y.shape[0])).batch(batch_size)

            def make_batch(idx):
                images = self._ensure_size(tf.gather(x, idx))
                return images, tf.gather(y, idx)

            ds = ds.map(_no_autograph(make_batch), num_parallel_calls=AUTOTUNE,
                        deterministic=True)
            return ds.prefetch(AUTOTUNE)
        if self._kind == "files":
            y = self._split(split, "y")
            ds = tf.data.Dataset.range(int(y.shape[0])).map(lambda i: (i,))
        else:
            ds = self._stream(split)

        def make_example(*payload):
            image, label = self._fetch(split, *payload)
            return self._eval_transform(image), label

        ds = ds.map(_no_autograph(make_example), num_parallel_calls=AUTOTUNE,
                    deterministic=True)
        return ds.batch(batch_size).prefetch(AUTOTUNE)

    def _stream(self, split):
        """imagenet2012: dataset of (encoded image bytes, int32 label)."""
        return self._source["stream_train" if split == "train" else "stream_test"]

    def _fetch(self, split, *payload):
        """files / stream payload -> (uint8 image (h, w, C), int32 label)."""
        if self._kind == "files":
            (idx,) = payload
            p, y = self._split(split, "p"), self._split(split, "y")
            return self._decode(tf.io.read_file(tf.gather(p, idx))), tf.gather(y, idx)
        contents, label = payload
        return self._decode(contents), tf.cast(label, tf.int32)

    def _decode(self, contents):
        image = tf.io.decode_image(contents, channels=self._channels, expand_animations=False)
        image.set_shape([None, None, self._channels])
        return image

    def _ensure_size(self, images):
        """float32 image(s) (..., H, W, C) resized to the model size if needed."""
        images = tf.cast(images, tf.float32)
        h, w = self._size
        static = images.shape[-3:-1]
        if static.is_fully_defined() and tuple(static) == (h, w):
            return images
        shape = tf.shape(images)
        same = tf.logical_and(tf.equal(shape[-3], h), tf.equal(shape[-2], w))
        images = tf.cond(
            same,
            lambda: images,
            lambda: tf.image.resize(images, (h, w), method="bilinear", antialias=True),
        )
        images.set_shape(images.shape[:-3].concatenate([h, w, self._channels]))
        return images

    def _cifar_augment(self, images, key, *, positions=None, num_draws=None):
        """Zero-pad P, random crop back to H x W, random flip; batched.

        ``images`` is float32 (B, H, W, C) in [0, 255]; ``key`` a [2] int64
        stateless seed.  Row ``i`` of one ``stateless_uniform`` draw of
        ``num_draws`` rows (default B) gives example ``i`` (or ``positions[i]``)
        its crop offsets and flip bit.
        """
        h, w = self._size
        p = self._pad
        n = tf.shape(images)[0] if num_draws is None else num_draws
        draws = tf.random.stateless_uniform(
            tf.stack([n, 3]), seed=key, minval=None, maxval=None, dtype=tf.int32,
            alg="philox")
        if positions is not None:
            draws = tf.gather(draws, positions)
        offsets = tf.math.floormod(draws[:, :2], 2 * p + 1)
        padded = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]])
        rows = offsets[:, :1] + tf.range(h)[None, :]
        cols = offsets[:, 1:2] + tf.range(w)[None, :]
        out = tf.gather(padded, rows, axis=1, batch_dims=1)
        out = tf.gather(out, cols, axis=2, batch_dims=1)
        if self.flip:
            flip = tf.equal(tf.math.floormod(draws[:, 2], 2), 1)
            out = tf.where(flip[:, None, None, None], tf.reverse(out, axis=[2]), out)
        return out

    def _imagenet_augment(self, image, key):
        """Random resized crop (scale 0.08-1, ratio 3/4-4/3) + flip; one example."""
        h, w = self._size
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=_derive(key, 0),
            min_object_covered=0.0,
            aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, size)
        image = tf.image.resize(tf.cast(image, tf.float32), (h, w), method="bilinear")
        image.set_shape([h, w, self._channels])
        if self.flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=_derive(key, 1))
        return image

    def _eval_transform(self, image):
        """Unaugmented float32 (H, W, C) view of one decoded example."""
        if self.info.augment != "imagenet":
            return self._ensure_size(image)
        h, w = self._size
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = tf.maximum((h / 0.875) / shape[0], (w / 0.875) / shape[1])
        new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), [h, w])
        image = tf.image.resize(tf.cast(image, tf.float32), new, method="bilinear",
                                antialias=True)
        top = (new[0] - h) // 2
        left = (new[1] - w) // 2
        image = tf.slice(image, [top, left, 0], [h, w, -1])
        image.set_shape([h, w, self._channels])
        return image
