"""tf.distribute: sharded input, mirrored replicas, two workers on 127.0.0.1.

The distributed checks run `distributed_programs.py` in fresh processes:
logical devices and the cluster are fixed when TensorFlow initialises.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_feed import data, models
from keras_feed.run import distribute, runner
from keras_feed.run.config import TrainConfig

pytestmark = pytest.mark.slow  # end to end, in subprocesses (outside the fast tier)

PROGRAMS = os.path.join(os.path.dirname(__file__), "distributed_programs.py")


def run_programs(arguments, envs, timeout=400):
    """Runs one program process per environment; fails with their output if one fails."""
    processes = [
        subprocess.Popen(
            [sys.executable, PROGRAMS, *args],
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for args, env in zip(arguments, envs)
    ]
    try:
        outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]


@pytest.mark.parametrize("augment", [False, True])
def test_shards_split_each_global_batch_exactly(augment):
    """The shards of a step hold the step's batch, augmented as it is unsharded."""
    dataset = data.load("synthetic", train_examples=48, seed=1)
    whole = list(dataset.train(12, augment=augment).take(8))  # two epochs of 4 steps
    shards = [list(dataset.train(12, augment=augment, shard=(3, i)).take(8)) for i in range(3)]
    for step, (images, labels) in enumerate(whole):
        parts = [shard[step] for shard in shards]
        assert all(part[0].shape[0] == 4 for part in parts)
        merged = np.concatenate([part[0].numpy() for part in parts])
        order = lambda batch: np.lexsort(batch.reshape(len(batch), -1).T)  # noqa: E731
        np.testing.assert_array_equal(merged[order(merged)], images.numpy()[order(images.numpy())])
        assert sorted(np.concatenate([part[1] for part in parts])) == sorted(labels.numpy())
    with pytest.raises(data.DataError, match="shard"):
        dataset.train(12, shard=(5, 0))
    with pytest.raises(data.DataError, match="shard"):
        dataset.train(12, shard=(2, 2))


def test_strategy_names_and_one_device_defaults():
    default = distribute.make_strategy("default")
    assert default is tf.distribute.get_strategy()
    assert distribute.is_chief(default)
    assert distribute.worker_path(default, "runs/x") == "runs/x"
    dataset = data.load("synthetic", train_examples=32)
    assert isinstance(distribute.train_dataset(default, dataset, 8), tf.data.Dataset)
    with pytest.raises(ValueError, match="Unknown strategy"):
        distribute.make_strategy("parameter_server")
    with pytest.raises(ValueError, match="mixed_precision"):
        with runner.dtype_policy("float64"):
            pass


def test_the_dry_run_names_the_strategy_and_its_devices(tmp_path):
    config = TrainConfig(
        method="ce", dataset="synthetic", model="resnet8", train_examples=32, batch_size=16,
        epochs=1, dry_run=True, model_dir=str(tmp_path / "run"),
    )
    plan = runner.run(config)["plan"]
    devices = [line for line in plan if line.startswith("devices: ")]
    assert len(devices) == 1 and re.fullmatch(
        r"devices: default, one (CPU|GPU) device \((cpu|gpu):0\), batch 16", devices[0]), plan
    assert not (tmp_path / "run").exists()


def test_mirrored_steps_match_one_device(tmp_path):
    """Two logical CPUs: same per-step logs and weights as one device, same global batch."""
    out = str(tmp_path / "mirrored.json")
    run_programs([["mirrored", out]], [{}])
    with open(out) as handle:
        results = json.load(handle)
    one, mirrored = results["one_device"], results["mirrored"]
    assert results["devices"] == (
        "devices: mirrored over 2 CPU devices (cpu:0, cpu:1), global batch 16 = 8 per device"
    )
    assert (one["replicas"], mirrored["replicas"]) == (1, 2)
    assert len(one["steps"]) == len(mirrored["steps"]) == 4
    for expected, got in zip(one["steps"], mirrored["steps"]):
        assert set(expected) == set(got) == {
            "loss", "accuracy", "student_loss", "feed_loss_0", "feed_loss_1", "kd_loss", "weight_decay_loss"
        }
        for name in expected:
            assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-4), name
    for name in one["epochs"]:  # epoch logs: metrics aggregated over the replicas
        np.testing.assert_allclose(mirrored["epochs"][name], one["epochs"][name], rtol=1e-4, atol=1e-4)
    for expected, got in zip(one["weights"], mirrored["weights"]):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # Unsynchronised BatchNorm: after a step, each replica holds the mean over the
    # replicas of the statistics of its own slice (NumPy's moments of each shard).
    assert results["mirrored_local_batchnorm"]["replica_spread"] <= 1e-6
    one_step = results["batchnorm_one_step"]
    shard_means = np.array(one_step["shard_means"])
    assert np.max(np.abs(shard_means[0] - shard_means[1])) > 1e-2  # the shards differ: the check bites
    for replica in range(2):
        np.testing.assert_allclose(one_step["moving_mean"][replica], one_step["expected_mean"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            one_step["moving_variance"][replica], one_step["expected_variance"], rtol=1e-4, atol=1e-6
        )
    # Coupled weight decay over two replicas: one plain SGD step with decay 0.01
    # differs from one without by exactly -lr * wd * w.
    plain, decayed = results["decay"]["0.0"], results["decay"]["0.01"]
    for before, without, with_decay in zip(plain["before"], plain["after"], decayed["after"]):
        np.testing.assert_allclose(
            np.subtract(with_decay, without), -0.1 * 0.01 * np.array(before), rtol=2e-3, atol=1e-8
        )


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_two_workers_end_identical_and_only_the_chief_writes(tmp_path):
    """Two workers match each other and a one-device run at the same global batch."""
    model_dir = str(tmp_path / "run")
    teacher = str(tmp_path / "teacher.keras")
    models.build("resnet8", input_shape=(16, 16, 3), num_classes=10, seed=5).save(teacher)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    outs = [str(tmp_path / f"worker{i}.json") for i in range(2)]
    single = str(tmp_path / "single.json")
    run_programs(
        [["multi_worker", out, model_dir, teacher] for out in outs]
        + [["single_process", single, str(tmp_path / "single_run"), teacher]],
        [{"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
         for i in range(2)] + [{}],
    )
    chief, worker, reference = (json.load(open(out)) for out in outs + [single])
    assert (chief["chief"], worker["chief"]) == (True, False)
    assert chief["replicas"] == worker["replicas"] == 2 and reference["replicas"] == 1
    assert chief["wrote_into"] == model_dir
    assert worker["wrote_into"] == model_dir + ".worker1"
    assert os.path.isfile(os.path.join(model_dir, "student.keras"))
    assert os.path.isfile(os.path.join(model_dir, "metrics.json"))
    assert chief["student_accuracy"] == worker["student_accuracy"]
    for ours, theirs in zip(chief["weights"], worker["weights"]):
        np.testing.assert_array_equal(ours, theirs)
    # The workers' examples are disjoint and together are the one-device epoch.
    ours, theirs = set(chief["epoch_images"]), set(worker["epoch_images"])
    assert len(ours) == len(chief["epoch_images"]) == 32 and not ours & theirs
    assert sorted(chief["epoch_images"] + worker["epoch_images"]) == sorted(reference["epoch_images"])
    # The same weights as one device on the global batch (a BatchNorm-free student).
    assert len(chief["weights"]) == len(reference["weights"]) == 4
    for ours, expected in zip(chief["weights"], reference["weights"]):
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
