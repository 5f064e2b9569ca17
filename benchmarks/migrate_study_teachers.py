"""One-time migration: the committed study teachers re-saved with their normalisation layer.

    python benchmarks/migrate_study_teachers.py            # migrate (refuses if done)
    python benchmarks/migrate_study_teachers.py --check    # compare, write nothing

The Fashion-MNIST study's teachers (`benchmarks/results/fashion_mnist_teachers/`)
were written by keras-feed 0.1.0: networks without a preprocessing layer, that
expect images normalised with the mean and std of the study's training split.
This script puts that normalisation inside each file (`preprocessing.add`, the
layer every model of keras-feed now starts with), so that the files take raw
pixels as every other model does and need no `teacher_preprocessing="dataset"`.

For each teacher it checks, on the full 10,000-image test split, that the
migrated file, reloaded, gives on raw images the logits the study took from the
old file (wrapped as `teacher_preprocessing="dataset"` wraps it: largest
difference at most 1e-5, identical predictions), and reports how far both are
from the old network on images normalised in NumPy float64 (the float32
rounding of the normalisation, ~1e-5 on these logits). The new file is
written atomically beside the old and swapped in; the old one stays in git.
The comparison is recorded in `fashion_mnist.json` (`teachers[i]["migration"]`).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fashion_mnist_study as study_lib  # noqa: E402
import study_common as common  # noqa: E402

TOLERANCE = 1e-5


def _sha256(path):
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def compare(before, after):
    """`(largest |logit difference|, predictions that differ)` between two logit arrays."""
    import numpy as np

    return (float(np.max(np.abs(before - after))),
            int(np.sum(np.argmax(before, 1) != np.argmax(after, 1))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Compare only; write nothing.")
    parser.add_argument("--teachers_dir", default=os.path.join(
        common.REPO, "benchmarks", "results", "fashion_mnist_teachers"))
    parser.add_argument("--results", default=os.path.join(
        common.REPO, "benchmarks", "results", "fashion_mnist.json"),
        help="The study's record, where each teacher's migration is noted.")
    args = parser.parse_args()

    import keras
    import numpy as np

    from keras_feed.models import preprocessing
    from keras_feed.run import files

    data = common.load_data(study_lib.RECIPE)
    statistics = (data.info.mean, data.info.std)
    images = np.concatenate([x.numpy() for x, _ in data.test(500)]).astype(np.float32)
    report = []
    for index in range(study_lib.NUM_TEACHERS):
        path = os.path.join(args.teachers_dir, f"teacher_{index}.keras")
        old_sha256 = _sha256(path)
        old = keras.models.load_model(path, compile=False)
        if preprocessing.find(old) is not None:
            sys.exit(f"{path} already has its normalisation layer: nothing to migrate.")
        new = preprocessing.add(old, *statistics)  # what the study's runs used
        used = new.predict(images, batch_size=500, verbose=0)
        mean, std = (np.asarray(value, np.float64) for value in statistics)
        numpy_normalised = old.predict(((images / 255.0 - mean) / std).astype(np.float32),
                                       batch_size=500, verbose=0)
        if not args.check:
            with files.atomic_path(path) as temporary:
                new.save(temporary)
        written = new if args.check else keras.models.load_model(path, compile=False)
        difference, changed = compare(used, written.predict(images, batch_size=500, verbose=0))
        if difference > TOLERANCE or changed:
            sys.exit(f"{path}: the migrated file differs from the teacher the study used "
                     f"(logits up to {difference:.3g}, {changed} predictions).")
        numpy_difference, numpy_changed = compare(numpy_normalised, used)
        report.append({"index": index, "max_abs_logit_difference": difference,
                       "changed_predictions": changed, "test_images": len(images),
                       "max_abs_logit_difference_to_numpy_normalisation": numpy_difference,
                       "sha256_before": old_sha256, "sha256_after": _sha256(path),
                       "changed_predictions_to_numpy_normalisation": numpy_changed,
                       "mean": [float(v) for v in np.ravel(statistics[0])],
                       "std": [float(v) for v in np.ravel(statistics[1])]})
        print(f"teacher {index}: logits within {difference:.2e} of the teacher the study used on "
              f"{len(images)} test images, {changed} predictions changed (to the old network on "
              f"NumPy-normalised images: {numpy_difference:.2e}, {numpy_changed} changed)"
              + ("" if args.check else f"; {path} replaced"))
    if not args.check:
        import json

        results_path = args.results
        with open(results_path, encoding="utf-8") as handle:
            results = json.load(handle)
        for teacher, entry in zip(results["teachers"], report):
            teacher["migration"] = dict(entry, to="normalisation layer inside the file "
                                        "(keras_feed.models.preprocessing.add)")
        common.save_results(results_path, results)


if __name__ == "__main__":
    main()
