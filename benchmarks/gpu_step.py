"""The compiled training step on one accelerator, on JAX: student, pFEED(k) and keras.distillation.

    python benchmarks/gpu_step.py                        # resnet56, batch 128, mixed_bfloat16,
                                                         # k = 1, 2, 4; writes
                                                         # benchmarks/results/gpu_step.json
    python benchmarks/gpu_step.py --precision=float32 --teachers=1,2 --output=/tmp/f32.json
    python benchmarks/gpu_step.py --model=resnet8 --batch_size=8 --steps=2 --repeats=1 \\
        --warmup=1 --teachers=1,2 --precision=float32   # a rehearsal on the CPU

Needs keras (3), jax, numpy and absl-py, and keras_feed (this checkout's, installed or
not); TensorFlow is never imported. Runs on `KERAS_BACKEND=jax` (set when unset; any
other backend is refused).

Measured, each with its own freshly built models, on one CIFAR-shaped batch
(`--image_size`^2 x 3 random integer pixel values in [0, 255] as float32, `--num_classes`
random labels, seed 0) placed on the device once and fed again at every step, so that
no input pipeline competes with the step. The batch is put on the default device
uncommitted (`jax.device_put(x)`, as Keras' own `fit` does): committed to a device
(`jax.device_put(x, device)`), it commits every output of the train step while the
variables start uncommitted, and Keras' JAX step is compiled three times (the first
step, the first step of a later `fit` and the steps after it). The models carry the
input normalisation layer that keras-feed's training adds (`models.build(..., mean,
std)`), as the models keras-feed trains and exports do.

* `student`: `keras_feed.models.build(--model)` compiled with SGD (lr 0.05, momentum
  0.9), sparse cross-entropy from logits and accuracy;
* `pfeed_k<k>` for each k in `--teachers`: `keras_feed.FEEDDistiller` with k frozen
  teachers of `--teacher_model` (untrained, seeds 100 + n: weights do not change the
  cost), beta 500, the same optimizer, loss and metric;
* `keras_distillation`: `keras.distillation.Distiller` with
  `keras.distillation.FeatureDistillation` (MSE between the layers named "features"),
  student loss weight 0.5, teacher 0, the same optimizer, loss and metric; skipped (and
  said so) if the installed Keras has no `keras.distillation`, or if the student's and
  the teacher's feature maps differ in shape (it has no translator).

Timing: every step runs through Keras' own `fit` (steps_per_epoch steps of a generator
that yields the on-device batch), which is how training runs; `train_on_batch` is not
used because `FEEDDistiller.train_on_batch` refolds and digests the teachers' weights
at every call, a per-call cost that `fit` pays once. For each configuration:

* compile_s: the wall time of a first `fit` of one step (tracing, XLA compilation,
  autotuning, and the step), ended by fetching its loss;
* then `--warmup` untimed steps (one `fit`); its wall time is warmup_s;
* then `--repeats` timed `fit` calls of `--steps` steps each, round-robin over the
  configurations (every repeat times each configuration once). A repeat's time runs from
  the start of its first step (a callback's `on_train_batch_begin`, with nothing of the
  configuration in flight) to the moment the last step's logs have reached the host
  (its `on_train_batch_end`, which Keras calls once they are fetched), divided by
  `--steps`: steps are dispatched asynchronously as in `fit`, and the end is a real
  synchronisation. Fit's own set-up and tear-down are outside it (their wall time is in
  the JSON as fit_s). ms_per_step is the median over repeats; images_per_s is
  batch_size / ms_per_step. XLA compilations (jax.monitoring's backend-compile events)
  are counted in each phase: a compilation in a timed repeat is reported, in the
  JSON (xla_compiles) and on stderr.

Printed: a table, with pFEED(k)/student and keras.distillation/pFEED(k=1) as ratios of
ms per step. Written (atomically, the folder created if needed) to `--output`: the
device (jax.devices()), platform, versions of keras, jax, jaxlib, numpy, python and
keras_feed, the settings, and per configuration ms_per_step, images_per_s, compile_s,
every repeat, and the last loss.
"""

import os
import sys

_BACKEND = os.environ.setdefault("KERAS_BACKEND", "jax")
if _BACKEND != "jax":
    sys.exit(f"gpu_step.py runs on JAX only; KERAS_BACKEND is {_BACKEND!r} (unset it or set it to jax).")

import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import (
    app,  # noqa: E402
    flags,  # noqa: E402
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the checkout's keras_feed, installed or not

import keras_feed  # noqa: E402
from keras_feed import models  # noqa: E402
from keras_feed.core.distiller import FEEDDistiller  # noqa: E402

BETA = 500.0
LEARNING_RATE, MOMENTUM = 0.05, 0.9
STUDENT_LOSS_WEIGHT = 0.5  # keras.distillation's default

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet56", "Student architecture (keras_feed.models name).")
flags.DEFINE_string("teacher_model", None, "Teacher architecture (default: --model).")
flags.DEFINE_integer("batch_size", 128, "Images per step.")
flags.DEFINE_enum("precision", "mixed_bfloat16", ["mixed_bfloat16", "float32"], "Keras dtype policy.")
flags.DEFINE_integer("steps", 20, "Timed steps per repeat.")
flags.DEFINE_integer("repeats", 5, "Timed repeats per configuration (the median is reported).")
flags.DEFINE_integer("warmup", 3, "Untimed steps after the first (compiling) one, in one fit.")
flags.DEFINE_list("teachers", ["1", "2", "4"], "Numbers of pFEED teachers, comma-separated.")
flags.DEFINE_string("output", os.path.join(REPO, "benchmarks", "results", "gpu_step.json"),
                    "JSON file written (atomically).")
flags.DEFINE_integer("num_classes", 100, "Classes of the random labels and of every model.")
flags.DEFINE_integer("image_size", 32, "Height and width of the square RGB images.")


# -- models -----------------------------------------------------------------------


def build(name, seed):
    # With the normalisation layer keras-feed's training adds (CIFAR-100's statistics).
    return models.build(name, input_shape=(FLAGS.image_size, FLAGS.image_size, 3),
                        num_classes=FLAGS.num_classes, seed=seed,
                        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))


def compile_kwargs():
    return {
        "optimizer": keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM),
        "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "metrics": ["accuracy"],
    }


def teacher_seed(index):
    return 100 + index


def student_alone():
    student = build(FLAGS.model, seed=0)
    student.compile(**compile_kwargs())
    return student


def pfeed(k):
    teachers = [build(FLAGS.teacher_model, seed=teacher_seed(n)) for n in range(k)]
    keras.utils.set_random_seed(1)  # the NTLs
    distiller = FEEDDistiller(build(FLAGS.model, seed=0), teachers, beta=BETA)
    distiller.compile(**compile_kwargs())
    return distiller


def keras_distillation():
    """keras.distillation's Distiller with FeatureDistillation, or the reason it cannot run."""
    if not hasattr(keras, "distillation"):
        return f"keras {keras.__version__} has no keras.distillation"
    student, teacher = build(FLAGS.model, seed=0), build(FLAGS.teacher_model, seed=teacher_seed(0))
    student_map = tuple(student.get_layer("features").output.shape[1:])
    teacher_map = tuple(teacher.get_layer("features").output.shape[1:])
    if student_map != teacher_map:
        return f"feature maps differ ({student_map} vs {teacher_map}); FeatureDistillation has no translator"
    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=student,
        distillation_losses=keras.distillation.FeatureDistillation(
            loss="mse", teacher_layer_name="features", student_layer_name="features"
        ),
        student_loss_weight=STUDENT_LOSS_WEIGHT,
    )
    distiller.compile(**compile_kwargs())
    return distiller


# -- timing -----------------------------------------------------------------------


class _StepClock(keras.callbacks.Callback):
    """Start of the first step; the moment the last step's logs reached the host.

    Async-safe: it reads no state, so Keras keeps dispatching steps without waiting
    for each one. Keras fetches a step's logs before calling `on_train_batch_end`
    (in a worker thread under async dispatch), so the last call is a synchronisation.
    """

    async_safe = True

    def __init__(self, steps):
        super().__init__()
        self.steps = steps
        self.start = self.end = None
        self.last_logs = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.steps - 1:
            self.end = time.perf_counter()
            self.last_logs = dict(logs or {})


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) and their seconds."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, *args, **kwargs):
        if event == self.EVENT:
            self.count += 1
            self.seconds += float(duration)

    def mark(self):
        return self.count, self.seconds

    def since(self, mark):
        return self.count - mark[0], self.seconds - mark[1]


def _synchronise(model):
    jax.block_until_ready([variable.value for variable in model.variables])


def batches(images, labels):
    while True:
        yield images, labels


def run_fit(model, data, steps):
    """One `fit` of `steps` steps: (seconds from first step to last logs, fit's wall s, logs)."""
    _synchronise(model)
    clock = _StepClock(steps)
    began = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False, callbacks=[clock])
    _synchronise(model)
    ended = time.perf_counter()
    if clock.end is None:  # a Keras that calls the callback differently: the whole fit
        clock.start, clock.end = began, ended
    return clock.end - clock.start, ended - began, clock.last_logs


def last_loss(logs):
    for name in ("loss", "total_loss"):
        if logs and name in logs:
            return float(logs[name])
    return None


# -- results ------------------------------------------------------------------------


def versions():
    def version(package, module=None):
        if module is not None and getattr(module, "__version__", None):
            return str(module.__version__)
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "keras": version("keras", keras),
        "jax": version("jax", jax),
        "jaxlib": version("jaxlib"),
        "numpy": version("numpy", np),
        "keras_feed": version("keras-feed", keras_feed),
    }


def device_info():
    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device": str(devices[0]),
        "device_count": len(devices),
        "default_backend": jax.default_backend(),
        "host": platform.platform(),
    }


def write_json(path, payload):
    """Writes `payload` to `path` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".gpu_step.", suffix=".json.tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=2)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def ratios(results, teacher_counts):
    """pFEED(k)/student and keras.distillation/pFEED(k=1), as ratios of ms per step."""
    ms = {name: entry["ms_per_step"] for name, entry in results.items() if "ms_per_step" in entry}
    out = {}
    for k in teacher_counts:
        if f"pfeed_k{k}" in ms and "student" in ms:
            out[f"pfeed_k{k}/student"] = ms[f"pfeed_k{k}"] / ms["student"]
    if "keras_distillation" in ms and "pfeed_k1" in ms:
        out["keras_distillation/pfeed_k1"] = ms["keras_distillation"] / ms["pfeed_k1"]
    return out


def table(payload):
    settings, results = payload["settings"], payload["results"]
    lines = [
        f"{payload['device']['device_kind']} ({payload['device']['platform']}), keras "
        f"{payload['versions']['keras']}, jax {payload['versions']['jax']}: student "
        f"{settings['model']}, teachers {settings['teacher_model']}, batch {settings['batch_size']}, "
        f"{settings['precision']}, {settings['repeats']} x {settings['steps']} steps",
        f"{'configuration':<20} {'ms/step':>9} {'images/s':>10} {'compile s':>10} {'warmup s':>9} "
        f"{'min..max ms':>17}",
    ]
    for name, entry in results.items():
        if "skipped" in entry:
            lines.append(f"{name:<20} skipped: {entry['skipped']}")
            continue
        spread = f"{min(entry['repeats_ms_per_step']):.2f}..{max(entry['repeats_ms_per_step']):.2f}"
        lines.append(f"{name:<20} {entry['ms_per_step']:>9.2f} {entry['images_per_s']:>10.1f} "
                     f"{entry['compile_s']:>10.2f} {entry['warmup_s']:>9.2f} {spread:>17}")
    for name, value in payload["ratios"].items():
        lines.append(f"{name:<30} {value:.3f}")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS.teacher_model = FLAGS.teacher_model or FLAGS.model
    teacher_counts = [int(k) for k in FLAGS.teachers]
    if any(k < 1 for k in teacher_counts) or min(FLAGS.steps, FLAGS.repeats, FLAGS.batch_size) < 1:
        raise app.UsageError("--teachers, --steps, --repeats and --batch_size must be >= 1.")
    if FLAGS.warmup < 0:
        raise app.UsageError("--warmup must be >= 0.")
    keras.config.set_dtype_policy(FLAGS.precision)

    rng = np.random.default_rng(0)
    shape = (FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3)
    images = jax.device_put(rng.integers(0, 256, size=shape).astype("float32"))
    labels = jax.device_put(rng.integers(0, FLAGS.num_classes, size=FLAGS.batch_size).astype("int32"))
    jax.block_until_ready((images, labels))

    builders = {"student": student_alone}
    builders.update({f"pfeed_k{k}": (lambda k=k: pfeed(k)) for k in teacher_counts})
    builders["keras_distillation"] = keras_distillation

    compiles = CompileCounter()
    results, prepared = {}, {}
    for name, make in builders.items():
        try:  # one configuration that fails (another Keras, memory) does not end the run
            model = make()
            if isinstance(model, str):
                results[name] = {"skipped": model}
                print(f"{name}: skipped ({model})", flush=True)
                continue
            data = batches(images, labels)
            mark = compiles.mark()
            _, compile_s, _ = run_fit(model, data, 1)  # the whole first fit, set-up included
            first = compiles.since(mark)
            mark = compiles.mark()
            _, warmup_s, _ = run_fit(model, data, FLAGS.warmup) if FLAGS.warmup else (0.0, 0.0, None)
            warmup = compiles.since(mark)
        except Exception as error:  # noqa: BLE001 (reported, in the JSON and on stderr)
            traceback.print_exc()
            results[name] = {"skipped": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"}
            print(f"{name}: {results[name]['skipped']}", flush=True)
            model = None
            gc.collect()
            continue
        prepared[name] = (model, data)
        results[name] = {
            "compile_s": compile_s, "warmup_s": warmup_s,
            "xla_compiles": {"first_step": first[0], "warmup": warmup[0], "timed": 0},
            "xla_compile_s": {"first_step": first[1], "warmup": warmup[1], "timed": 0.0},
            "repeats_ms_per_step": [], "repeats_fit_s": [],
        }
        print(f"{name}: first step {compile_s:.2f} s ({first[0]} XLA compilations), warmup "
              f"{warmup_s:.2f} s ({warmup[0]})", flush=True)

    last_logs = {}
    for _ in range(FLAGS.repeats):
        for name, (model, data) in prepared.items():
            mark = compiles.mark()
            step_s, fit_s, logs = run_fit(model, data, FLAGS.steps)
            count, seconds = compiles.since(mark)
            results[name]["repeats_ms_per_step"].append(1000.0 * step_s / FLAGS.steps)
            results[name]["repeats_fit_s"].append(fit_s)
            results[name]["xla_compiles"]["timed"] += count
            results[name]["xla_compile_s"]["timed"] += seconds
            last_logs[name] = logs
            if count:
                print(f"warning: {name}: {count} XLA compilation(s) ({seconds:.2f} s) in a timed repeat",
                      file=sys.stderr, flush=True)
    for name, (model, _) in prepared.items():
        entry = results[name]
        entry["ms_per_step"] = statistics.median(entry["repeats_ms_per_step"])
        entry["images_per_s"] = FLAGS.batch_size / (entry["ms_per_step"] / 1000.0)
        entry["last_loss"] = last_loss(last_logs.get(name))
        entry["parameters"] = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    prepared.clear()
    gc.collect()

    payload = {
        "benchmark": "gpu_step",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device_info(),
        "versions": versions(),
        "settings": {
            "model": FLAGS.model, "teacher_model": FLAGS.teacher_model, "batch_size": FLAGS.batch_size,
            "precision": FLAGS.precision, "steps": FLAGS.steps, "repeats": FLAGS.repeats,
            "warmup": FLAGS.warmup, "teachers": teacher_counts, "num_classes": FLAGS.num_classes,
            "image_size": FLAGS.image_size, "beta": BETA,
            "optimizer": f"SGD({LEARNING_RATE}, momentum={MOMENTUM})",
            "keras_distillation": "FeatureDistillation(mse, features), "
                                  f"student_loss_weight={STUDENT_LOSS_WEIGHT}",
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "timing": "fit on one on-device batch; first step's start to last step's fetched logs, / steps",
        },
        "results": results,
        "ratios": ratios(results, teacher_counts),
    }
    for name, entry in results.items():
        for value in entry.get("repeats_ms_per_step", []) + [entry.get("compile_s", 1.0)]:
            if not (math.isfinite(value) and value > 0):
                raise RuntimeError(f"{name}: a timing is not a positive number ({value}).")
    write_json(FLAGS.output, payload)
    print(table(payload))
    print(f"written: {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
