"""Throughput and memory of FEED against the cost of its parts and against keras.distillation.

    python benchmarks/throughput.py                       # batch 64 and 128; writes
                                                          # benchmarks/results/throughput.json
    python benchmarks/throughput.py --batch_sizes=128     # one batch size; the other's
                                                          # results in the file are kept
    python benchmarks/throughput.py --quick               # a short rehearsal (not written
                                                          # unless --out)
    python benchmarks/throughput.py --rederive            # the tables again, from the
                                                          # timings recorded in the file

On a shared machine, pause a background job for the run with
`benchmarks/paused.sh python benchmarks/throughput.py` (see that script), or
run it under `nice`. Ratios are timed round-robin and paired within a repeat,
which makes them far more robust to background load than absolute images/s
(the load is recorded in the results), though heavy load still widens their
quartiles (recorded too); the CPU-time ratios are a second check.

Setting: CIFAR-shaped data (32x32x3, 100 classes): 50,000 random uint8 images
held in memory and fed through keras-feed's own tf.data training pipeline
(`keras_feed.data.Data`: seeded order, 4-pixel pad + random crop + flip,
per-channel normalisation); student `resnet20`, teachers `resnet32`
(different seeds), beta 500, SGD with momentum 0.9, weight decay 5e-4,
accuracy as the compiled metric. Each batch size (`--batch_sizes`, default
64 and 128) is measured on its own, with models built afresh.

Measured in this one process, round-robin (every repeat times each candidate
once, so background noise hits them alike), medians over `--repeats`:

* FEED: `FEEDDistiller.fit` with k = 1, 2, 4 teachers, images/s;
* its parts alone, timed the way FEED runs them: the student's train step
  (`FEEDDistiller` without teachers: the same one student pass, compiled loss,
  metric and weight decay; `fit`), each teacher's forward pass as FEED runs it
  (the folded inference twin, `keras_feed.core.frozen.inference_model`, giving the
  feature map only, no logits, in inference mode, in a `tf.function`), and the
  k NTLs' train step on fixed inputs (their FEED loss against fixed teacher
  maps, `fit`); "the limit of its parts" is
  1 / (t_student + sum t_teacher + t_ntl);
* a second, looser limit from Keras' own teacher inference: the same with each
  teacher's Keras `predict` step instead (unfolded BatchNorm, and the logits,
  which FEED does not compute without KD); it does more work than FEED's
  teachers do, so FEED looks better against it: it is reported, labelled, and
  not used for the goal;
* `keras.distillation.Distiller` with `FeatureDistillation` (MSE between the
  `features` maps, equal shapes) from teacher 0, student loss weight 0.5;
* the teacher forward pass (feature map only) four ways: Keras' own (no
  folding), the folded twin that FEED runs (folded once per `fit` call), the
  twin folding Conv+BN in the graph at every call (what FEED did before
  0.2.0), and XLA (`jit_compile`) on Keras' own; plus the cost of one
  `frozen.refold` (once per `fit`/`evaluate` call);
* the student's plain Keras train step (`student.compile`/`fit`), for the
  distiller's own overhead at k = 0;
* every ratio also from this process's CPU time (`_cpu`), which other
  processes' load changes far less than the wall time;
* the input pipeline alone (with augmentation), images/s.

With `--tried`, also what was tried and is not used on CPU: XLA for the whole
FEED step, and teachers of one architecture fused into grouped convolutions.

All steps run on one fixed, augmented batch repeated (`Dataset.from_tensors`),
so that step costs are compared without the input pipeline competing for the
same cores; the pipeline is timed on its own. A step time is the wall time
between the ends of the first and the last of `--steps + 1` steps of one
`fit`/`predict` call (or calls of a `tf.function`), divided by `--steps`.

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
from keras import ops  # noqa: E402

from keras_feed import (
    FEEDDistiller,  # noqa: E402
    data,  # noqa: E402
    models,  # noqa: E402
)
from keras_feed.core import (
    frozen,  # noqa: E402
    losses,  # noqa: E402
)
from keras_feed.core import translators as translators_lib  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results", "throughput.json")
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 100
NUM_IMAGES = 50_000
STUDENT, TEACHER = "resnet20", "resnet32"
BETA, WEIGHT_DECAY = 500.0, 5e-4
# What the project asks of FEED, at every batch size.
GOALS = {"feed_over_parts": 1.1, "feed_over_keras_distiller": 1.8}


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


def feed_distiller(teachers, seed=0, **compile_kwargs):
    """FEED with `teachers`; with none, the student's train step as FEED runs it."""
    distiller = FEEDDistiller(build(STUDENT, seed), teachers, beta=BETA, weight_decay=WEIGHT_DECAY)
    distiller.compile(optimizer=sgd(), metrics=["accuracy"], **compile_kwargs)
    return distiller


def plain_student(seed=0):
    student = build(STUDENT, seed)
    student.compile(
        optimizer=sgd(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return student


def feature_model(teacher, name):
    """Keras' own graph of `teacher` up to its feature map (no logits, no folding)."""
    extractor = frozen.extractor(teacher, "features", name=f"{name}_extractor")
    return keras.Model(extractor.inputs[0], [extractor.outputs[2]], name=name)


def folded_features(teacher, name):
    """The teacher as FEED runs it without KD: folded twin, feature map only."""
    return frozen.inference_model(feature_model(teacher, name))


class _FoldEveryCall(frozen.FoldedConvBatchNorm):
    """A folded pair that recomputes its kernel and bias in the graph at every call.

    What FEED's teachers did before 0.2.0 (the fold ran inside every step).
    """

    def call(self, inputs):
        conv, batchnorm = self._pair.value
        scale = ops.rsqrt(ops.cast(batchnorm.moving_variance, "float32") + batchnorm.epsilon)
        if batchnorm.gamma is not None:
            scale = scale * ops.cast(batchnorm.gamma, "float32")
        offset = -ops.cast(batchnorm.moving_mean, "float32") * scale
        if batchnorm.beta is not None:
            offset = offset + ops.cast(batchnorm.beta, "float32")
        if conv.use_bias:
            offset = offset + ops.cast(conv.bias, "float32") * scale
        kernel = ops.cast(conv.kernel, "float32") * scale
        outputs = conv.convolution_op(
            ops.cast(inputs, self.compute_dtype), ops.cast(kernel, self.compute_dtype)
        )
        return ops.add(outputs, ops.cast(offset, outputs.dtype))


def fold_every_call(twin):
    """`twin` with each folded pair refolded in the graph at every call."""
    def clone(layer):
        if isinstance(layer, frozen.FoldedConvBatchNorm):
            return _FoldEveryCall(*layer._pair.value)  # the pair the twin folded
        return layer

    return keras.models.clone_model(twin, clone_function=clone)


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
        optimizer=sgd(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return distiller


# -- timing -----------------------------------------------------------------------


class _BatchEnds(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append((time.perf_counter(), time.process_time()))

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
        """`(wall seconds, process CPU seconds)` per step."""
        times = self._run(steps + 1)
        return tuple((last - first) / steps for first, last in zip(times[0], times[-1]))


class FunctionLoop:
    """Times `steps` calls of a `tf.function` on a fixed batch (each synchronised)."""

    def __init__(self, name, function, batch):
        self.name, self.function, self.batch = name, function, batch

    def _call(self):
        for value in tf.nest.flatten(self.function(self.batch)):
            value.numpy()

    def warm_up(self):
        self._call()

    def step_time(self, steps):
        """`(wall seconds, process CPU seconds)` per step."""
        self._call()
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self._call()
        return (time.perf_counter() - start) / steps, (time.process_time() - start_cpu) / steps


def forward_loop(name, model, images, *, jit_compile=False):
    """A model's inference-mode forward pass as a `tf.function` loop."""
    return FunctionLoop(
        name,
        tf.function(lambda x: model(x, training=False), jit_compile=jit_compile, autograph=False),
        images,
    )


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
    """Every repeat times each loop once: wall and CPU step seconds per repeat.

    Odd repeats go through the loops in reverse order, so that a slow drift of
    the background load does not favour the loops timed first.

    Returns:
      `(wall, cpu)`: `{name: [seconds per step, one per repeat]}` each; `cpu`
      is this process's CPU time (all its threads), which other processes'
      load changes far less than the wall time.
    """
    for loop in loops:
        started = time.perf_counter()
        loop.warm_up()
        log(f"  warmed up {loop.name} ({time.perf_counter() - started:.0f} s)")
    times = {loop.name: [] for loop in loops}
    cpu = {loop.name: [] for loop in loops}
    for repeat in range(repeats):
        started = time.perf_counter()
        for loop in loops[::-1] if repeat % 2 else loops:
            wall, cpu_seconds = loop.step_time(steps)
            times[loop.name].append(wall)
            cpu[loop.name].append(cpu_seconds)
        log(f"  repeat {repeat + 1}/{repeats} ({time.perf_counter() - started:.0f} s, load "
            f"{os.getloadavg()[0]:.1f}): "
            + ", ".join(f"{name} {values[-1]:.3f}s" for name, values in times.items()))
    return times, cpu


def refold_seconds(twin, calls=5):
    """Median seconds of one `frozen.refold(twin)` (once per fit/evaluate call)."""
    values = []
    for _ in range(calls):
        start = time.perf_counter()
        frozen.refold(twin)
        values.append(time.perf_counter() - start)
    return statistics.median(values)


def pipeline_rate(dataset_fn, batch_size, repeats, batches):
    """Images/s of the training pipeline alone, one value per repeat."""
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
                   f"--batch_sizes={batch_size}", f"--steps={steps}"]
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
    """What else ran: the load average, and the process group paused by paused.sh."""
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


def ratios(numerators, denominators):
    """numerator / denominator per repeat, both timed in the same repeat."""
    return [n / d for n, d in zip(numerators, denominators)]


def paired_ratio(numerators, denominators):
    """The median over repeats of the ratio within a repeat."""
    return round(median(ratios(numerators, denominators)), 3)


def quartiles(numerators, denominators):
    """The first and third quartiles over repeats of the ratio within a repeat."""
    values = ratios(numerators, denominators)
    if len(values) < 2:
        return [round(values[0], 3)] * 2
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return [round(first, 3), round(third, 3)]


def summarise(times, memory_mib, ks, batch_size, cpu_times=None):
    """The table and the goals, from the step times of every repeat and the peak memory.

    Args:
      times: `{loop name: [step seconds per repeat]}` (`step_seconds_all`).
      cpu_times: the same in process CPU seconds (`step_cpu_seconds_all`), or
        None; gives the `_cpu` ratios, a check that load hits less.
      memory_mib: `{k: peak RSS MiB}`.
      ks: the numbers of teachers timed.
      batch_size: images per step.

    Returns:
      `(rows, goals)`.
    """
    rate = lambda seconds: round(batch_size / seconds, 1)  # noqa: E731

    def parts(k, teacher, times=times):  # per repeat: student + k teachers + NTLs, timed alone
        return [
            sum(values)
            for values in zip(times["student"], times[f"ntl_{k}"],
                              *(times[f"{teacher}_{i}"] for i in range(k)))
        ]

    rows = []
    for k in ks:
        feed = times[f"feed_{k}"]
        folded, predict = parts(k, "teacher_folded"), parts(k, "teacher_keras_predict")
        row = {
            "teachers": k,
            "feed_images_per_s": rate(median(feed)),
            "parts_limit_images_per_s": rate(median(folded)),
            "feed_over_parts": paired_ratio(folded, feed),
            "feed_over_parts_quartiles": quartiles(folded, feed),
            "parts_keras_predict_limit_images_per_s": rate(median(predict)),
            "feed_over_parts_keras_predict": paired_ratio(predict, feed),
            "peak_rss_mib": memory_mib[k],
        }
        if cpu_times:
            row["feed_over_parts_cpu"] = paired_ratio(
                parts(k, "teacher_folded", cpu_times), cpu_times[f"feed_{k}"])
        if k == 1:
            keras_distiller = times["keras_distiller_1"]
            row["keras_distiller_images_per_s"] = rate(median(keras_distiller))
            row["feed_over_keras_distiller"] = paired_ratio(keras_distiller, feed)
            row["feed_over_keras_distiller_quartiles"] = quartiles(keras_distiller, feed)
            if cpu_times:
                row["feed_over_keras_distiller_cpu"] = paired_ratio(
                    cpu_times["keras_distiller_1"], cpu_times["feed_1"])
        rows.append(row)
    goals = {
        "feed_over_parts_at_least": GOALS["feed_over_parts"],
        "feed_over_parts_met": {
            str(row["teachers"]): row["feed_over_parts"] >= GOALS["feed_over_parts"] for row in rows
        },
        "feed_over_keras_distiller_at_least": GOALS["feed_over_keras_distiller"],
        "feed_over_keras_distiller_met": (
            rows[0]["feed_over_keras_distiller"] >= GOALS["feed_over_keras_distiller"]
            if ks[0] == 1 else None
        ),
    }
    return rows, goals


def rederive(path):
    """Recomputes every entry's table and goals in `path` from its recorded timings."""
    with open(path) as handle:
        results = json.load(handle)
    for entry in results["by_batch_size"].values():
        ks = [row["teachers"] for row in entry["table"]]
        memory_mib = {int(k): value for k, value in entry["memory"]["peak_rss_mib"].items()}
        entry["table"], entry["goals"] = summarise(
            entry["step_seconds_all"], memory_mib, ks, entry["batch_size"],
            entry.get("step_cpu_seconds_all"),
        )
        print_table(entry)
    write_results(path, results)


def write_results(path, results):
    with open(path + ".tmp", "w") as handle:
        json.dump(results, handle, indent=1)
        handle.write("\n")
    os.replace(path + ".tmp", path)


def run(args, dataset, batch_size, log):
    """Every measurement at one batch size: the results entry for that size."""
    ks = sorted(int(k) for k in args.teachers.split(","))
    repeats, steps = args.repeats, args.steps
    started = time.time()
    background = {"start": background_state()}
    log(f"Batch {batch_size}. Background: {background['start']}")

    batch = next(iter(dataset.train(batch_size)))  # augmented and normalised
    images, labels = batch
    fixed = tf.data.Dataset.from_tensors(batch).repeat()
    fixed_images = tf.data.Dataset.from_tensors(images).repeat()

    teachers = [build(TEACHER, seed=1 + index) for index in range(max(ks))]
    student_shape = tuple(build(STUDENT, 0).get_layer("features").output.shape[1:])
    twins = [folded_features(t, f"teacher_{i}_features") for i, t in enumerate(teachers)]
    teacher_maps = [keras.tree.flatten(twin(images, training=False))[0] for twin in twins]
    student_maps = tf.nn.relu(tf.random.stateless_normal((batch_size,) + student_shape, (1, 2)))

    # The parts, as FEED runs them, next to the same with Keras' own teacher
    # inference (unfolded, with logits: the looser limit), then FEED.
    loops = [KerasLoop("student", feed_distiller([]), fixed),
             KerasLoop("student_plain_keras", plain_student(), fixed)]
    for i, (teacher, twin) in enumerate(zip(teachers, twins)):
        loops.append(forward_loop(f"teacher_folded_{i}", twin, images))
        loops.append(KerasLoop(f"teacher_keras_predict_{i}", teacher, fixed_images, predict=True))
    for k in ks:
        ntl_data = tf.data.Dataset.from_tensors((student_maps, tuple(teacher_maps[:k]))).repeat()
        loops.append(KerasLoop(f"ntl_{k}", ntl_bank(teachers[:k], student_shape), ntl_data))
        loops.append(KerasLoop(f"feed_{k}", feed_distiller(teachers[:k]), fixed))
        if k == 1:  # timed next to FEED with one teacher
            loops.append(KerasLoop("keras_distiller_1", keras_feature_distiller(teachers[0]), fixed))
            if args.tried:
                loops.append(KerasLoop("feed_1_xla", feed_distiller(teachers[:1], jit_compile=True),
                                       fixed))
    # The teacher forward pass (feature map only) other ways; teacher_folded_0
    # is the folded twin that FEED runs.
    unfolded = feature_model(teachers[0], "teacher_0_unfolded")
    loops += [
        forward_loop("forward_keras", unfolded, images),
        forward_loop("forward_fold_every_call", fold_every_call(twins[0]), images),
        forward_loop("forward_xla", unfolded, images, jit_compile=True),
    ]
    if args.tried:
        loops += grouped_convolution_loops(batch_size, max(ks))
    log(f"Timing {len(loops)} loops: {repeats} repeats x {steps} steps, batch {batch_size}")
    times, cpu_times = time_round_robin(loops, repeats, steps, log)
    refold_s = refold_seconds(twins[0])
    background["after_timing"] = background_state()

    log("Input pipeline alone")
    pipeline = pipeline_rate(lambda: dataset.train(batch_size), batch_size, repeats,
                             args.pipeline_batches)

    log("Peak memory, one child process per k")
    memory = measure_memory(ks, batch_size, steps, log)
    background["end"] = background_state()

    seconds = {name: median(values) for name, values in times.items()}
    memory_mib = {k: round(value / 2**20, 1) for k, value in memory.items()}
    rows, goals = summarise(times, memory_mib, ks, batch_size, cpu_times)
    teacher_bytes = int(sum(w.numpy().nbytes for w in teachers[0].weights))
    activation_bytes = forward_activation_bytes(teachers[0], batch_size)
    pipeline_rate_median = median(pipeline)
    increments = {
        f"{a}->{b}": round((memory[b] - memory[a]) / (b - a) / 2**20, 1)
        for a, b in zip(ks, ks[1:])
    }
    feed_1 = seconds.get("feed_1")
    results = {
        "batch_size": batch_size,
        "wall_s": None,
        "background": background,
        "table": rows,
        "goals": goals,
        "input_pipeline_images_per_s": round(pipeline_rate_median, 1),
        "input_pipeline_over_feed_1": round(pipeline_rate_median * feed_1 / batch_size, 2)
        if feed_1 else None,
        "memory": {
            "peak_rss_mib": {str(k): value for k, value in memory_mib.items()},
            "per_added_teacher_mib": increments,
            "bound_per_teacher_mib": round((teacher_bytes + activation_bytes) / 2**20, 1),
            "teacher_weights_mib": round(teacher_bytes / 2**20, 2),
            "teacher_forward_activations_mib": round(activation_bytes / 2**20, 1),
        },
        "teacher_forward_ms": {
            "keras_predict_step_with_logits": round(1000 * seconds["teacher_keras_predict_0"], 1),
            "keras_unfolded_features": round(1000 * seconds["forward_keras"], 1),
            "folded_twin_features_as_feed_runs_it": round(1000 * seconds["teacher_folded_0"], 1),
            "folded_in_graph_every_call_features_before_0_2": round(
                1000 * seconds["forward_fold_every_call"], 1),
            "xla_jit_compile_unfolded_features": round(1000 * seconds["forward_xla"], 1),
            "refold_once_per_fit_call": round(1000 * refold_s, 1),
        },
        "student_step_ms": {
            "feed_distiller_without_teachers": round(1000 * seconds["student"], 1),
            "plain_keras": round(1000 * seconds["student_plain_keras"], 1),
        },
        "step_seconds_median": {name: round(value, 4) for name, value in seconds.items()},
        "step_seconds_all": {name: [round(v, 4) for v in values] for name, values in times.items()},
        "step_cpu_seconds_all": {
            name: [round(v, 4) for v in values] for name, values in cpu_times.items()
        },
    }
    if args.tried:
        results["tried"] = {
            "feed_1_xla_over_feed_1_step_time": paired_ratio(times["feed_1_xla"], times["feed_1"]),
            f"teacher_convs_grouped_over_separate_{max(ks)}": paired_ratio(
                times[f"convs_{max(ks)}_grouped"], times[f"convs_{max(ks)}_separate"]
            ),
        }
    results["wall_s"] = round(time.time() - started)
    return results


def print_table(entry):
    print(f"\nbatch {entry['batch_size']}: FEED against the limit of its parts (teachers as "
          "FEED runs them: folded twin, feature map only), against the looser limit with "
          "Keras' own teacher predict, and against keras.distillation")
    print(f"{'k':>2} {'FEED img/s':>11} {'parts img/s':>12} {'FEED/parts':>11} {'(quartiles)':>16} "
          f"{'parts(predict)':>15} {'FEED/parts(predict)':>20} {'keras.distillation':>19} "
          f"{'FEED/keras':>11} {'peak RSS MiB':>13} {'FEED/parts CPU':>15} "
          f"{'FEED/keras CPU':>15}")
    for row in entry["table"]:
        print(f"{row['teachers']:>2} {row['feed_images_per_s']:>11} "
              f"{row['parts_limit_images_per_s']:>12} {row['feed_over_parts']:>11} "
              f"{str(row.get('feed_over_parts_quartiles', '')):>16} "
              f"{row['parts_keras_predict_limit_images_per_s']:>15} "
              f"{row['feed_over_parts_keras_predict']:>20} "
              f"{row.get('keras_distiller_images_per_s', ''):>19} "
              f"{row.get('feed_over_keras_distiller', ''):>11} {row['peak_rss_mib']:>13}"
              f"{row.get('feed_over_parts_cpu', ''):>15} "
              f"{row.get('feed_over_keras_distiller_cpu', ''):>15}")
    print(f"goals: {entry['goals']}")
    print(f"input pipeline alone: {entry['input_pipeline_images_per_s']} img/s "
          f"({entry['input_pipeline_over_feed_1']}x FEED k=1)")
    memory = entry["memory"]
    print(f"memory per added teacher: {memory['per_added_teacher_mib']} MiB "
          f"(bound {memory['bound_per_teacher_mib']} MiB = weights + one forward's activations)")
    print(f"teacher forward (ms): {entry['teacher_forward_ms']}")
    print(f"student step (ms): {entry['student_step_ms']}")
    if "tried" in entry:
        print(f"tried (time ratios, > 1: slower): {entry['tried']}")


def load_previous(path):
    """The per-batch-size entries of an earlier results file in this format, or {}."""
    try:
        with open(path) as handle:
            previous = json.load(handle)
    except (OSError, ValueError):
        return {}
    return previous.get("by_batch_size", {})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", default="1,2,4", help="numbers of teachers k")
    parser.add_argument("--batch_sizes", default="64,128",
                        help="batch sizes, each measured on its own")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--pipeline_batches", type=int, default=100)
    parser.add_argument("--tried", action="store_true",
                        help="also time XLA for the whole FEED step and grouped convolutions")
    parser.add_argument("--out", default=None, help=f"results file (default {RESULTS}; "
                        "with --quick: none)")
    parser.add_argument("--quick", action="store_true", help="1,2 teachers, 3 repeats x 2 steps")
    parser.add_argument("--rederive", action="store_true",
                        help="recompute the tables of the results file from its recorded "
                             "timings; measure nothing")
    parser.add_argument("--memory_probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rederive:
        rederive(args.out or RESULTS)
        return
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(args.memory_probe, batch_sizes[0], args.steps)))
        return
    if args.quick:
        args.teachers, args.repeats, args.steps, args.pipeline_batches = "1,2", 3, 2, 20
    out = args.out or (None if args.quick else RESULTS)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    started = time.time()
    dataset = cifar_shaped_data()
    entries = load_previous(out) if out else {}
    for batch_size in batch_sizes:
        entry = run(args, dataset, batch_size, log)
        entry["command"] = "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
        entry["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        entry["nice"] = os.nice(0)
        entries[str(batch_size)] = entry
        print_table(entry)
        if out:  # after each batch size, so that a later failure loses nothing
            results = {
                "what": "FEED train-step throughput vs the limit from its parts (timed as FEED "
                        "runs them, and with Keras' own teacher predict), keras.distillation, "
                        "teacher forward passes, input pipeline, peak memory, per batch size "
                        "(see benchmarks/throughput.py)",
                "setting": {
                    "data": f"{NUM_IMAGES} random uint8 images {IMAGE_SHAPE}, {NUM_CLASSES} "
                            "classes, keras_feed.data pipeline with CIFAR augmentation; steps "
                            "on one fixed augmented batch",
                    "student": STUDENT, "teacher": TEACHER, "beta": BETA,
                    "weight_decay": WEIGHT_DECAY, "optimizer": "SGD(0.1, momentum=0.9)",
                    "metrics": ["accuracy"],
                    "repeats": args.repeats, "steps_per_repeat": args.steps,
                    "parts": "student: FEEDDistiller without teachers (same pass, loss, metric, "
                             "weight decay), fit; teacher: frozen.inference_model twin giving "
                             "the feature map only, tf.function, inference mode; NTLs: their "
                             "FEED loss on fixed maps, fit. parts_keras_predict: the teacher "
                             "as Keras' own predict step instead (unfolded, with logits)",
                    "statistic": "images/s from the median step time over repeats; ratios are "
                                 "medians over repeats of the ratio within a repeat (paired, "
                                 "robust to load that changes between repeats; absolute "
                                 "images/s are not)",
                },
                "environment": {
                    "tensorflow": tf.__version__, "keras": keras.__version__,
                    "python": platform.python_version(), "cpus": os.cpu_count(),
                    "machine": platform.machine(), "processor": _cpu_model(),
                    "gpus": len(tf.config.list_physical_devices("GPU")),
                },
                "goals": GOALS,
                "by_batch_size": dict(sorted(entries.items(), key=lambda item: int(item[0]))),
            }
            write_results(out, results)
            log(f"Wrote {out} (batch {batch_size})")
    log(f"Done in {time.time() - started:.0f} s")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
