"""tf.distribute: sharded input, mirrored replicas, two workers on 127.0.0.1.

The distributed checks run `distributed_programs.py` in fresh processes:
logical devices and the cluster are fixed when TensorFlow initialises.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_feed import data, distribute, experiment, models

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


def test_shards_split_each_global_batch_exactly():
    dataset = data.load("synthetic", train_examples=48, seed=1)
    whole = list(dataset.train(12, augment=False).take(8))  # two epochs of 4 steps
    shards = [list(dataset.train(12, augment=False, shard=(3, i)).take(8)) for i in range(3)]
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
        with experiment.dtype_policy("float64"):
            pass


def test_mirrored_steps_match_one_device(tmp_path):
    """Two logical CPUs: same per-step logs and weights as one device, same global batch."""
    out = str(tmp_path / "mirrored.json")
    run_programs([["mirrored", out]], [{}])
    with open(out) as handle:
        results = json.load(handle)
    one, mirrored = results["one_device"], results["mirrored"]
    assert (one["replicas"], mirrored["replicas"]) == (1, 2)
    assert len(one["steps"]) == len(mirrored["steps"]) == 4
    for expected, got in zip(one["steps"], mirrored["steps"]):
        assert set(expected) == set(got) == {
            "loss", "student_loss", "feed_loss_0", "feed_loss_1", "kd_loss", "accuracy"
        }
        for name in expected:
            assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-4), name
    for name in one["epochs"]:  # epoch logs: metrics aggregated over the replicas
        np.testing.assert_allclose(mirrored["epochs"][name], one["epochs"][name], rtol=1e-4, atol=1e-4)
    for expected, got in zip(one["weights"], mirrored["weights"]):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # Unsynchronised BatchNorm: its moving statistics still agree on the replicas.
    assert mirrored["replica_spread"] == 0.0
    assert results["mirrored_local_batchnorm"]["replica_spread"] <= 1e-6


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_two_workers_end_identical_and_only_the_chief_writes(tmp_path):
    model_dir = str(tmp_path / "run")
    teacher = str(tmp_path / "teacher.keras")
    models.build("resnet8", input_shape=(16, 16, 3), num_classes=10, seed=5).save(teacher)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    outs = [str(tmp_path / f"worker{i}.json") for i in range(2)]
    run_programs(
        [["multi_worker", out, model_dir, teacher] for out in outs],
        [{"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
         for i in range(2)],
    )
    chief, worker = (json.load(open(out)) for out in outs)
    assert (chief["chief"], worker["chief"]) == (True, False)
    assert chief["replicas"] == worker["replicas"] == 2
    assert chief["wrote_into"] == model_dir
    assert worker["wrote_into"] == model_dir + ".worker1"
    assert os.path.isfile(os.path.join(model_dir, "student.keras"))
    assert os.path.isfile(os.path.join(model_dir, "metrics.json"))
    assert chief["student_accuracy"] == worker["student_accuracy"]
    for ours, theirs in zip(chief["weights"], worker["weights"]):  # BatchNorm statistics too
        np.testing.assert_array_equal(ours, theirs)
