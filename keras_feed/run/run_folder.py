"""A run's `--model_dir`: its lock and its record of the settings a rerun must match.

While a run trains, the folder holds `.lock` (held by the one process writing
the run) and `run.json` (its settings); `RunDirectory` takes the lock, refuses
a rerun with other settings in one line, and tells a finished run (its
`metrics.json`) from one to resume (`keras_feed.run.checkpointing` resumes its
stages).
"""

import dataclasses
import json
import os

from keras_feed.run import files

RUN_RECORD = "run.json"
RECORD_FORMAT = 2  # the layout of run.json: {"format", "config"}


def comparable_settings(config):
    """The config as JSON values, without the settings a resumption may change.

    Those are the fields marked `resumable` (`keras_feed.run.config.setting`): they
    change neither what is trained nor how, only where and how it is reported
    (a pre-empted job may come back on other hardware, e.g. a TPU of a new name).
    """
    values = json.loads(json.dumps(dataclasses.asdict(config)))
    resumable = resumable_settings(config)
    return {k: v for k, v in values.items() if k not in resumable}


def resumable_settings(config):
    """The names of the settings of `config` (a dataclass or its class) that a rerun
    may change and still resume its run: the fields marked `resumable`."""
    return {field.name for field in dataclasses.fields(config)
            if field.metadata.get("resumable")}


def setting_differences(recorded, config):
    """`["--name: <recorded> there, <now> now", ...]` for every setting that differs.

    Settings missing from `recorded` (an older version) count as their default.
    """
    defaults = comparable_settings(type(config)())
    differences = []
    for name, value in comparable_settings(config).items():
        before = recorded.get(name, defaults.get(name))
        if before != value:
            differences.append(f"--{name}: {before!r} there, {value!r} now")
    return differences


class RunDirectory:
    """The `--model_dir` of a run, held for the duration of a `with` block.

    On entry it compares the settings recorded there (`run.json`, or the
    `config` of a finished run's `metrics.json`) with `config`:

    - the settings differ: `ValueError`, one line naming them (a run is never
      silently continued with other settings), and nothing is written;
    - the run there is finished with the same settings: `finished` holds its
      metrics, nothing should be trained, and nothing is written;
    - otherwise it creates the folder and takes its lock (one writer at a
      time, released on exit or when the process dies); `resuming` says
      whether an earlier attempt left work there; what killed writers left
      half-written is removed and `run.json` written.
    """

    def __init__(self, config):
        self.config = config
        self.path = config.model_dir
        self.finished = None
        self.resuming = False
        self._lock = None

    def __enter__(self):
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"--model_dir {self.path} exists and is not a folder.")
        if self._check_record():  # read-only: a finished run is left untouched
            return self
        os.makedirs(self.path, exist_ok=True)
        self._take_lock()
        try:
            if not self._check_record():  # again: another process may have finished it
                self.resuming = os.path.isfile(os.path.join(self.path, RUN_RECORD))
                files.remove_partial_files(self.path)
                files.write_json(
                    os.path.join(self.path, RUN_RECORD),
                    {"format": RECORD_FORMAT, "config": comparable_settings(self.config)},
                )
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, *exc_info):
        self._release_lock()

    def _take_lock(self):
        lock = files.folder_lock(self.path, wait=False)
        try:
            lock.__enter__()
        except files.FolderLocked:
            raise ValueError(
                f"Another process is writing to --model_dir {self.path}; wait for it "
                "to finish or choose another --model_dir."
            ) from None
        self._lock = lock

    def _release_lock(self):
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def _read_json(self, name):
        path = os.path.join(self.path, name)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Cannot read {path} ({files.first_line(error)}); remove it or "
                "choose another --model_dir."
            ) from None

    def _check_record(self):
        """Raises if the recorded settings differ; returns whether the run is finished."""
        metrics = self._read_json("metrics.json")
        recorded = (self._read_json(RUN_RECORD) or {}).get("config")
        if recorded is None and metrics is not None:
            recorded = metrics.get("config")
        if recorded is not None:
            differences = setting_differences(recorded, self.config)
            if differences:
                raise ValueError(
                    f"--model_dir {self.path} holds a run with other settings "
                    f"({'; '.join(differences)}); rerun with its settings to resume "
                    "it, or choose another --model_dir."
                )
        self.finished = metrics
        return metrics is not None
