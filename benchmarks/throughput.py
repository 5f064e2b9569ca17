"""Throughput and memory of FEED against the cost of its parts and against keras.distillation.

    python benchmarks/throughput.py              # writes benchmarks/results/throughput.json
    python benchmarks/throughput.py --quick      # a short rehearsal (not written unless --out)

On a shared machine, pause a background job for the run with
`benchmarks/paused.sh python benchmarks/throughput.py` (see that script).

Setting: CIFAR-shaped data (32x32x3, 100 classes): 50,000 random uint8 images
held in memory and fed through keras-feed's own tf.data training pipeline
(`keras_feed.data.Data`: seeded order, 4-pixel pad + random crop + flip,
per-channel normalisation), batch 128; student `resnet20`, teachers `resnet32`
(different seeds), beta 500, SGD with momentum 0.9, weight decay 5e-4.

Measured in this one process, round-robin (every repeat times each candidate
once, so background noise hits them alike), medians over `--repeats`:

* FEED: `FEEDDistiller.fit` with k = 1, 2, 4 teachers, images/s;
* its parts alone: the student's plain Keras train step (`compile` with
  cross-entropy, `fit`), each teacher's Keras inference step (`predict`), and
  the k NTLs' train step on fixed inputs (their FEED loss against fixed
  teacher maps); limit = 1 / (t_student + sum t_teacher + t_ntl);
* `keras.distillation.Distiller` with `FeatureDistillation` (MSE between the
  `features` maps, equal shapes) from teacher 0, student loss weight 0.5;
* the teacher forward pass three ways: Keras' own, the folded inference twin
  that FEED runs, and XLA (`jit_compile`) on Keras' own;
* the input pipeline alone (with augmentation), images/s.

All steps run on one fixed, augmented batch repeated (`Dataset.from_tensors`),
so that step costs are compared without the input pipeline competing for the
same cores; the pipeline is timed on its own. A step time is the wall time
between the ends of the first and the last of `--steps + 1` steps of one
`fit`/`predict` call, divided by `--steps`.

Peak resident memory of a FEED run for each k (and for the student alone,
k = 0) is measured in a fresh child process each (`--memory_probe=k`), from
the kernel's high-water mark (VmHWM) after a few FEED steps.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the checkout's keras_feed, installed or not

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_feed import FEEDDistiller, data, losses, models  # noqa: E402
from keras_feed import translators as translators_lib  # noqa: E402
from keras_feed.distiller import feature_extractor, inference_model  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results", "throughput.json")
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 100
NUM_IMAGES = 50_000
STUDENT, TEACHER = "resnet20", "resnet32"
BETA, WEIGHT_DECAY = 500.0, 5e-4


# -- data and models --------------------------------------------------------------


def cifar_shaped_data(seed=0):
    """`Data` over random CIFAR-100-shaped uint8 images, with CIFAR augmentation."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(NUM_IMAGES,) + IMAGE_SHAPE, dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=NUM_IMAGES).astype(np.int32)
    info = data.DatasetInfo(
        name="cifar100_shaped_random", num_classes=NUM_CLASSES, image_shape=IMAGE_SHAPE,
        num_train=NUM_IMAGES, num_test=1000, mean=data.CIFAR100_MEAN, std=data.CIFAR100_STD,
        augment="cifar",
    )
    source = {"kind": "array", "x_train": images, "y_train": labels,
              "x_test": images[:1000], "y_test": labels[:1000]}
    return data.Data(info, seed=seed, train_indices=np.arange(NUM_IMAGES), flip=True,
                     source=source)


def build(name, seed):
    return models.build(name, input_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES, seed=seed)


def sgd():
    return keras.optimizers.SGD(0.1, momentum=0.9)


def feed_distiller(teachers, seed=0):
    distiller = FEEDDistiller(build(STUDENT, seed), teachers, beta=BETA, weight_decay=WEIGHT_DECAY)
    distiller.compile(optimizer=sgd())
    return distiller


def plain_student(seed=0):
    student = build(STUDENT, seed)
    student.compile(
        optimizer=sgd(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return student


def ntl_bank(teachers, student_shape):
    """The NTLs of k teachers as one model, trained on their FEED loss alone."""
    inputs = keras.Input(student_shape)
    outputs = []
    for index, teacher in enumerate(teachers):
        target_shape = tuple(teacher.get_layer("features").output.shape[1:])
        translator = translators_lib.translator_for(student_shape, target_shape, name=f"ntl_{index}")
        outputs.append(translator(inputs))
    bank = keras.Model(inputs, outputs, name=f"ntl_bank_{len(teachers)}")
    bank.compile(
        optimizer=sgd(),
        loss=[losses.per_example_feed_loss] * len(teachers),
        loss_weights=[BETA] * len(teachers),
    )
    return bank


def keras_feature_distiller(teacher, seed=0):
    """keras.distillation.Distiller on the same maps, with its documented FeatureDistillation."""
    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=build(STUDENT, seed),
        distillation_losses=keras.distillation.FeatureDistillation(
            loss="mse", teacher_layer_name="features", student_layer_name="features"
        ),
        student_loss_weight=0.5,
    )
    distiller.compile(
        optimizer=sgd(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return distiller


# -- timing -----------------------------------------------------------------------


class _BatchEnds(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())

    on_predict_batch_end = on_train_batch_end


class KerasLoop:
    """Times `steps` train (or predict) steps of a compiled model on a fixed dataset."""

    def __init__(self, name, model, dataset, *, predict=False):
        self.name, self.model, self.dataset, self.predict = name, model, dataset, predict

    def _run(self, steps):
        ends = _BatchEnds()
        if self.predict:
            self.model.predict(self.dataset, steps=steps, callbacks=[ends], verbose=0)
        else:
            self.model.fit(self.dataset, steps_per_epoch=steps, epochs=1, callbacks=[ends],
                           verbose=0)
        return ends.times

    def warm_up(self):
        self._run(2)  # traces and runs the step function

    def step_time(self, steps):
        times = self._run(steps + 1)
        return (times[-1] - times[0]) / steps


class FunctionLoop:
    """Times `steps` calls of a `tf.function` on a fixed batch (each synchronised)."""

    def __init__(self, name, function, batch):
        self.name, self.function, self.batch = name, function, batch

    def warm_up(self):
        self.function(self.batch).numpy()

    def step_time(self, steps):
        self.function(self.batch).numpy()
        start = time.perf_counter()
        for _ in range(steps):
            self.function(self.batch).numpy()
        return (time.perf_counter() - start) / steps


def grouped_convolution_loops(batch_size, count):
    """`count` same-architecture teachers' 3x3 convolutions, separate or fused.

    One convolution per stage of a CIFAR ResNet (32x32x16, 16x16x32, 8x8x64):
    `count` separate ones, or one grouped convolution over the teachers' maps
    side by side (what fusing the teachers into one network would run).
    """
    shapes = ((32, 16), (16, 32), (8, 64))
    maps = [[tf.random.stateless_normal((batch_size, size, size, width), (3, size * count + i))
             for i in range(count)] for size, width in shapes]
    kernels = [[tf.random.stateless_normal((3, 3, width, width), (4, size * count + i))
                for i in range(count)] for size, width in shapes]
    fused_maps = [tf.concat(stage, axis=-1) for stage in maps]
    fused_kernels = [tf.concat(stage, axis=-1) for stage in kernels]  # groups = count

    def separate(_):
        return tf.add_n([tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME"))
                         for stage_maps, stage_kernels in zip(maps, kernels)
                         for x, kernel in zip(stage_maps, stage_kernels)])

    def grouped(_):
        return tf.add_n([tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME"))
                         for x, kernel in zip(fused_maps, fused_kernels)])

    return [FunctionLoop(f"convs_{count}_separate", tf.function(separate), tf.constant(0)),
            FunctionLoop(f"convs_{count}_grouped", tf.function(grouped), tf.constant(0))]


def time_round_robin(loops, repeats, steps, log):
    """`{name: [step seconds per repeat]}`, every repeat timing each loop once.

    Odd repeats go through the loops in reverse order, so that a slow drift of
    the background load does not favour the loops timed first.
    """
    for loop in loops:
        started = time.perf_counter()
        loop.warm_up()
        log(f"  warmed up {loop.name} ({time.perf_counter() - started:.0f} s)")
    times = {loop.name: [] for loop in loops}
    for repeat in range(repeats):
        for loop in loops[::-1] if repeat % 2 else loops:
            times[loop.name].append(loop.step_time(steps))
        log(f"  repeat {repeat + 1}/{repeats}: "
            + ", ".join(f"{name} {values[-1]:.3f}s" for name, values in times.items()))
    return times


def pipeline_rate(dataset_fn, batch_size, repeats, batches):
    """Images/s of the training pipeline alone, one median over `repeats`."""
    rates = []
    for _ in range(repeats):
        iterator = iter(dataset_fn())
        for _ in range(5):  # fill the prefetch buffers
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)[0].numpy()
        rates.append(batches * batch_size / (time.perf_counter() - start))
    return rates


# -- memory -----------------------------------------------------------------------


def peak_rss_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_probe(num_teachers, batch_size, steps):
    """Peak RSS of a FEED run with `num_teachers` teachers, in this fresh process."""
    # One random batch: the 50,000-image source would dominate the peak.
    images = tf.random.stateless_normal((batch_size,) + IMAGE_SHAPE, seed=(0, 1))
    labels = tf.random.stateless_uniform((batch_size,), (0, 2), maxval=NUM_CLASSES, dtype=tf.int32)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    teachers = [build(TEACHER, seed=1 + index) for index in range(num_teachers)]
    distiller = feed_distiller(teachers)
    distiller.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    return {"num_teachers": num_teachers, "peak_rss_bytes": peak_rss_bytes()}


def measure_memory(ks, batch_size, steps, log):
    """One child process per k (and k = 0, the student alone); their peak RSS."""
    results = {}
    for k in [0, *ks]:
        command = [sys.executable, os.path.abspath(__file__), f"--memory_probe={k}",
                   f"--batch_size={batch_size}", f"--steps={steps}"]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[k] = json.loads(output.strip().splitlines()[-1])["peak_rss_bytes"]
        log(f"  k={k}: peak RSS {results[k] / 2**20:.0f} MiB")
    return results


def forward_activation_bytes(model, batch_size):
    """Bytes of every layer output of one forward pass of `model` at `batch_size`."""
    total = 0
    for layer in model.layers:
        for tensor in keras.tree.flatten(layer.output):
            total += int(np.prod(tensor.shape[1:])) * batch_size * 4
    return total


# -- the run ----------------------------------------------------------------------


def background_state():
    """What else ran: the load average and the process group paused by paused.sh."""
    state = {"load_average_1min": round(os.getloadavg()[0], 2)}
    group = os.environ.get("BENCHMARK_PAUSED_PGID")
    if group:
        stopped = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[2] == group:
                stopped.append(fields[0] == "T")
        state["paused_process_group"] = int(group)
        state["paused_group_stopped"] = bool(stopped) and all(stopped)
    return state


def median(values):
    return statistics.median(values)


def run(args, log):
    ks = sorted(int(k) for k in args.teachers.split(","))
    batch_size, repeats, steps = args.batch_size, args.repeats, args.steps
    started = time.time()
    background = {"start": background_state()}
    log(f"Background: {background['start']}")

    dataset = cifar_shaped_data()
    batch = next(iter(dataset.train(batch_size)))  # augmented and normalised
    images, labels = batch
    fixed = tf.data.Dataset.from_tensors(batch).repeat()
    fixed_images = tf.data.Dataset.from_tensors(images).repeat()

    teachers = [build(TEACHER, seed=1 + index) for index in range(max(ks))]
    student_shape = tuple(build(STUDENT, 0).get_layer("features").output.shape[1:])
    teacher_maps = [
        feature_extractor(t, "features", name=f"maps_{i}")(images, training=False)[1]
        for i, t in enumerate(teachers)
    ]
    student_maps = tf.nn.relu(tf.random.stateless_normal((batch_size,) + student_shape, (1, 2)))

    loops = [KerasLoop("student", plain_student(), fixed)]
    loops += [
        KerasLoop(f"teacher_{i}", teacher, fixed_images, predict=True)
        for i, teacher in enumerate(teachers)
    ]
    for k in ks:
        ntl_data = tf.data.Dataset.from_tensors((student_maps, tuple(teacher_maps[:k]))).repeat()
        loops.append(KerasLoop(f"ntl_{k}", ntl_bank(teachers[:k], student_shape), ntl_data))
        loops.append(KerasLoop(f"feed_{k}", feed_distiller(teachers[:k]), fixed))
        if k == 1:  # timed next to FEED with one teacher
            loops.append(KerasLoop("keras_distiller_1", keras_feature_distiller(teachers[0]), fixed))
            xla = FEEDDistiller(build(STUDENT, 0), teachers[:1], beta=BETA, weight_decay=WEIGHT_DECAY)
            xla.compile(optimizer=sgd(), jit_compile=True)
            loops.append(KerasLoop("feed_1_xla", xla, fixed))
    # The teacher forward pass three ways (features and logits, inference mode).
    extractor = feature_extractor(teachers[0], "features", name="teacher_forward")
    twin = inference_model(extractor)
    loops += [
        FunctionLoop("forward_keras", tf.function(lambda x: extractor(x, training=False)[1]), images),
        FunctionLoop("forward_folded", tf.function(lambda x: twin(x, training=False)[1]), images),
        FunctionLoop(
            "forward_xla",
            tf.function(lambda x: extractor(x, training=False)[1], jit_compile=True),
            images,
        ),
    ]
    loops += grouped_convolution_loops(batch_size, max(ks))
    log(f"Timing {len(loops)} loops: {repeats} repeats x {steps} steps, batch {batch_size}")
    times = time_round_robin(loops, repeats, steps, log)
    background["after_timing"] = background_state()

    log("Input pipeline alone")
    pipeline = pipeline_rate(lambda: dataset.train(batch_size), batch_size, repeats, args.pipeline_batches)

    log("Peak memory, one child process per k")
    memory = measure_memory(ks, batch_size, steps, log)
    background["end"] = background_state()

    seconds = {name: median(values) for name, values in times.items()}
    rate = lambda s: batch_size / s  # noqa: E731

    def parts(k):  # per repeat: student + teachers + NTLs, timed alone
        return [
            sum(values)
            for values in zip(times["student"], times[f"ntl_{k}"], *(times[f"teacher_{i}"] for i in range(k)))
        ]

    def paired_ratio(numerators, denominators):
        """Median over repeats of numerator / denominator, both timed in the same repeat."""
        return round(median([n / d for n, d in zip(numerators, denominators)]), 3)

    teacher_bytes = int(sum(w.numpy().nbytes for w in teachers[0].weights))
    activation_bytes = forward_activation_bytes(teachers[0], batch_size)
    rows = []
    for k in ks:
        row = {
            "teachers": k,
            "feed_images_per_s": round(rate(seconds[f"feed_{k}"]), 1),
            "limit_images_per_s": round(rate(median(parts(k))), 1),
            "feed_over_limit": paired_ratio(parts(k), times[f"feed_{k}"]),
            "peak_rss_mib": round(memory[k] / 2**20, 1),
        }
        if k == 1:
            row["keras_distiller_images_per_s"] = round(rate(seconds["keras_distiller_1"]), 1)
            row["feed_over_keras_distiller"] = paired_ratio(times["keras_distiller_1"], times["feed_1"])
        rows.append(row)
    pipeline_rate_median = median(pipeline)
    increments = {
        f"{a}->{b}": round((memory[b] - memory[a]) / (b - a) / 2**20, 1)
        for a, b in zip(ks, ks[1:])
    }
    results = {
        "what": "FEED train-step throughput vs the limit from its parts, keras.distillation, "
                "input pipeline, peak memory (see benchmarks/throughput.py)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
        "wall_s": None,
        "setting": {
            "data": f"{NUM_IMAGES} random uint8 images {IMAGE_SHAPE}, {NUM_CLASSES} classes, "
                    "keras_feed.data pipeline with CIFAR augmentation; steps on one fixed "
                    "augmented batch",
            "student": STUDENT, "teacher": TEACHER, "batch_size": batch_size,
            "beta": BETA, "weight_decay": WEIGHT_DECAY, "optimizer": "SGD(0.1, momentum=0.9)",
            "repeats": repeats, "steps_per_repeat": steps,
            "statistic": "images/s from the median step time over repeats; ratios are medians "
                         "over repeats of the ratio within a repeat (paired, robust to load "
                         "that changes between repeats)",
        },
        "environment": {
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "gpus": len(tf.config.list_physical_devices("GPU")),
        },
        "background": background,
        "table": rows,
        "input_pipeline_images_per_s": round(pipeline_rate_median, 1),
        "input_pipeline_over_feed_1": round(pipeline_rate_median / rows[0]["feed_images_per_s"], 2),
        "memory": {
            "peak_rss_mib": {str(k): round(v / 2**20, 1) for k, v in memory.items()},
            "per_added_teacher_mib": increments,
            "bound_per_teacher_mib": round((teacher_bytes + activation_bytes) / 2**20, 1),
            "teacher_weights_mib": round(teacher_bytes / 2**20, 2),
            "teacher_forward_activations_mib": round(activation_bytes / 2**20, 1),
        },
        "teacher_forward_ms": {
            "keras_predict_step": round(1000 * seconds["teacher_0"], 1),
            "keras_inference": round(1000 * seconds["forward_keras"], 1),
            "folded_twin_used_by_feed": round(1000 * seconds["forward_folded"], 1),
            "xla_jit_compile": round(1000 * seconds["forward_xla"], 1),
        },
        "tried": {
            "feed_1_xla_over_feed_1_step_time": paired_ratio(times["feed_1_xla"], times["feed_1"]),
            f"teacher_convs_grouped_over_separate_{max(ks)}": paired_ratio(
                times[f"convs_{max(ks)}_grouped"], times[f"convs_{max(ks)}_separate"]
            ),
        },
        "step_seconds_median": {name: round(value, 4) for name, value in seconds.items()},
        "step_seconds_all": {name: [round(v, 4) for v in values] for name, values in times.items()},
    }
    results["wall_s"] = round(time.time() - started)
    return results


def print_table(results):
    print(f"\nbatch {results['setting']['batch_size']}, {results['setting']['student']} student, "
          f"{results['setting']['teacher']} teachers, medians of {results['setting']['repeats']} repeats")
    print(f"{'k':>2} {'FEED img/s':>11} {'limit img/s':>12} {'FEED/limit':>11} "
          f"{'keras.distillation':>19} {'FEED/keras':>11} {'peak RSS MiB':>13}")
    for row in results["table"]:
        print(f"{row['teachers']:>2} {row['feed_images_per_s']:>11} {row['limit_images_per_s']:>12} "
              f"{row['feed_over_limit']:>11} {row.get('keras_distiller_images_per_s', ''):>19} "
              f"{row.get('feed_over_keras_distiller', ''):>11} {row['peak_rss_mib']:>13}")
    print(f"input pipeline alone: {results['input_pipeline_images_per_s']} img/s "
          f"({results['input_pipeline_over_feed_1']}x FEED k=1)")
    memory = results["memory"]
    print(f"memory per added teacher: {memory['per_added_teacher_mib']} MiB "
          f"(bound {memory['bound_per_teacher_mib']} MiB = weights + one forward's activations)")
    print(f"teacher forward (ms): {results['teacher_forward_ms']}")
    print(f"tried (time ratios, > 1: slower): {results['tried']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", default="1,2,4", help="numbers of teachers k")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--pipeline_batches", type=int, default=100)
    parser.add_argument("--out", default=None, help=f"results file (default {RESULTS}; "
                        "with --quick: none)")
    parser.add_argument("--quick", action="store_true", help="1,2 teachers, 3 repeats x 2 steps")
    parser.add_argument("--memory_probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(args.memory_probe, args.batch_size, args.steps)))
        return
    if args.quick:
        args.teachers, args.repeats, args.steps, args.pipeline_batches = "1,2", 3, 2, 20
    out = args.out or (None if args.quick else RESULTS)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    results = run(args, log)
    print_table(results)
    if out:
        with open(out + ".tmp", "w") as handle:
            json.dump(results, handle, indent=1)
            handle.write("\n")
        os.replace(out + ".tmp", out)
        log(f"Wrote {out}")


if __name__ == "__main__":
    main()
