"""``imagenet2012``: streamed from TensorFlow Datasets, JPEG bytes decoded in the
pipeline. TFDS cannot download ImageNet: the archives go in
``<data_dir>/downloads/manual``. The stream has no random access, so the
training subset is a filter over it and no validation split can be held out.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from keras_feed.data import tfds_source
from keras_feed.data.common import subset_indices
from keras_feed.data.idx import DataError


def load_imagenet(data_dir, train_examples, subset_seed):
    """(source dict of kind "stream", train indices, num_classes, test size)."""
    tfds = tfds_source.import_tfds()
    kwargs = {"decoders": {"image": tfds.decode.SkipDecoding()}}
    if data_dir is not None:
        manual_dir = os.path.join(data_dir, "downloads", "manual")
        kwargs["download_and_prepare_kwargs"] = {
            "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)
        }
    train_ds, info = tfds_source.tfds_load(tfds, "imagenet2012", "train", data_dir, **kwargs)
    test_ds, _ = tfds_source.tfds_load(tfds, "imagenet2012", "validation", data_dir, **kwargs)
    n_full = tfds_source.split_size(info, "train", train_ds)
    n_test = tfds_source.split_size(info, "validation", test_ds)
    if n_full == 0 or n_test == 0:
        raise DataError(f"TFDS dataset 'imagenet2012' in {data_dir} has an empty split")
    idx = subset_indices(n_full, train_examples, subset_seed)
    if len(idx) != n_full:
        mask = np.zeros(n_full, bool)
        mask[idx] = True
        mask_t = tf.constant(mask)
        train_ds = train_ds.enumerate().filter(lambda i, el: tf.gather(mask_t, i)).map(
            lambda i, el: el)
    cast = lambda x, y: (x, tf.cast(y, tf.int32))  # noqa: E731
    source = {"kind": "stream", "stream_train": train_ds.map(cast),
              "stream_test": test_ds.map(cast)}
    return source, idx, int(info.features["label"].num_classes), n_test


def no_validation_error(validation_examples):
    return DataError(
        f"validation_examples={validation_examples} (--validation_examples) is not supported "
        "for 'imagenet2012': it is streamed from TFDS without random access; evaluate on "
        "its test split (TFDS 'validation') instead"
    )
