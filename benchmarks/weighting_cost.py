"""What per-example teacher weighting costs a FEED training step, against `equal`.

    python benchmarks/weighting_cost.py            # writes benchmarks/results/weighting_cost.json
    python benchmarks/weighting_cost.py --quick    # a short rehearsal, nothing written

On a shared machine, pause a background job for the run with
`benchmarks/paused.sh python benchmarks/weighting_cost.py`.

Setting: CIFAR-shaped random data (32x32x3, 100 classes), student `resnet20`,
K teachers `resnet20` (different seeds), beta 500 with KD (kd_weight 0.5, T 4),
so that every weighting has what it needs; SGD with momentum, weight decay
5e-4. For each batch size and K, one `FEEDDistiller` per weighting (`equal`,
`confidence`, `entropy`, `agreement`), each compiled and warmed up, then timed
round-robin: every repeat times each weighting's `train_on_batch` once on the
same batch, so background load hits them alike; the ratio to `equal` is the
median over repeats of the per-repeat ratios.
"""

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
WEIGHTINGS = ("equal", "confidence", "entropy", "agreement")


def distillers(batch_size, teachers, seed=0):
    import keras
    import numpy as np

    from keras_feed import FEEDDistiller, models

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch_size, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 100, size=batch_size).astype("int32")
    build = lambda index: models.build("resnet20", input_shape=(32, 32, 3), num_classes=100,  # noqa: E731
                                       seed=index)
    frozen = [build(100 + index) for index in range(teachers)]
    made = {}
    for name in WEIGHTINGS:
        distiller = FEEDDistiller(build(0), frozen, beta=500.0, kd_weight=0.5, temperature=4.0,
                                  weight_decay=5e-4, teacher_weighting=name)
        distiller.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
        for _ in range(3):  # trace, compile, settle
            distiller.train_on_batch(images, labels)
        made[name] = distiller
    return made, images, labels


def measure(batch_size, teachers, repeats):
    made, images, labels = distillers(batch_size, teachers)
    times = {name: [] for name in WEIGHTINGS}
    for _ in range(repeats):
        for name, distiller in made.items():
            start = time.perf_counter()
            distiller.train_on_batch(images, labels)
            times[name].append(time.perf_counter() - start)
    ratios = {
        name: statistics.median(t / e for t, e in zip(times[name], times["equal"]))
        for name in WEIGHTINGS
    }
    return {
        "batch_size": batch_size, "teachers": teachers, "repeats": repeats,
        "median_step_s": {name: statistics.median(values) for name, values in times.items()},
        "ratio_to_equal": ratios,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short rehearsal, nothing written")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    import keras

    cases = [(64, 2)] if args.quick else [(64, 2), (64, 4), (128, 2), (128, 4)]
    results = []
    for batch_size, teachers in cases:
        result = measure(batch_size, teachers, 3 if args.quick else args.repeats)
        results.append(result)
        ratios = ", ".join(f"{name} {value:.3f}" for name, value in result["ratio_to_equal"].items())
        print(f"batch {batch_size}, K={teachers}: step {result['median_step_s']['equal']:.3f} s "
              f"(equal); ratio to equal: {ratios}", flush=True)
    if args.quick:
        return
    record = {"backend": keras.backend.backend(), "keras": keras.__version__,
              "paused_group": os.environ.get("BENCHMARK_PAUSED_PGID"),
              "load_average": os.getloadavg(), "results": results}
    path = os.path.join(REPO, "benchmarks", "results", "weighting_cost.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
