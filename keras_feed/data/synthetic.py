"""``synthetic``: a small, learnable toy task for smoke tests. Each of 10 classes
is a smooth random template plus Gaussian noise; the task is fixed (it does not
depend on ``seed``), and its training, test and validation examples are
separate draws from it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

NUM_TRAIN = 512
NUM_TEST = 256
NUM_CLASSES = 10
SIZE = (16, 16)


def synthetic(num_train, num_test, size, num_classes=NUM_CLASSES, num_validation=0):
    """(x_train, y_train, x_test, y_test[, x_validation, y_validation]), uint8 / int32.

    The validation arrays are returned only when ``num_validation`` > 0; they
    are their own draw, so the training and test examples do not change.
    """
    h, w = size
    rng = np.random.RandomState(20240611)
    coarse = rng.uniform(0.0, 1.0, (num_classes, 4, 4, 3)).astype(np.float32)
    templates = tf.image.resize(coarse, (h, w), method="bilinear").numpy()

    def make(n, rs):
        y = np.arange(n) % num_classes
        rs.shuffle(y)
        x = 0.25 + 0.5 * templates[y] + rs.normal(0.0, 0.12, (n, h, w, 3))
        x = np.clip(np.rint(255.0 * x), 0, 255).astype(np.uint8)
        return x, y.astype(np.int32)

    x_train, y_train = make(num_train, np.random.RandomState(1))
    x_test, y_test = make(num_test, np.random.RandomState(2))
    if not num_validation:
        return x_train, y_train, x_test, y_test
    x_val, y_val = make(num_validation, np.random.RandomState(3))
    return x_train, y_train, x_test, y_test, x_val, y_val
