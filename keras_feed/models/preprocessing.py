"""The input normalisation every keras-feed model carries as its first layer.

keras-feed's data pipelines yield raw pixels (float32 values in [0, 255]) and
every model keras-feed builds or writes normalises them itself, right after its
input, with one built-in layer named `LAYER_NAME`:

    Input (raw pixels) -> Rescaling("preprocessing"): (x / 255 - mean) / std -> ...

so a saved model or an export is served with the images as they are stored
(uint8 or float32 pixels), and the `features` layer stays addressable in the
same functional graph. The layer is a per-channel `keras.layers.Rescaling`
(`x * scale + offset`, computed in float32 under any dtype policy): it has no
variables and its constants live in its config, so it saves to `.keras`,
exports to SavedModel, LiteRT and ONNX, and loads in safe mode without
keras-feed.

- `normalization(mean, std)`: the layer, from per-channel mean and std in
  [0, 1] units (`DatasetInfo.mean`, `.std`).
- `find(model)`: the preprocessing layer a model starts with, or None.
- `add(model, mean, std)`: the same network (its layers shared, not copied)
  with the layer inserted after its input.
- `raw_pixel_model(model, convention, ...)`: a teacher from outside keras-feed
  as a model that takes raw pixels, given what it expects (`CONVENTIONS`,
  `--teacher_preprocessing`).
"""

from typing import Optional, Sequence

import keras
import numpy as np

LAYER_NAME = "preprocessing"

#: What a teacher file without its own preprocessing layer expects, as
#: `--teacher_preprocessing` says it (its choices, checks and help come from
#: here): "auto" (nothing said: such a file is refused), "dataset" (images
#: normalised with the dataset's mean and std: the layer is added) or "none"
#: (raw pixels in [0, 255]: used as it is).
CONVENTIONS = ("auto", "dataset", "none")

#: The layer types that count as a model's own input preprocessing.
_PREPROCESSING_TYPES = (keras.layers.Rescaling, keras.layers.Normalization)


def normalization(mean: Sequence[float], std: Sequence[float], *, name: str = LAYER_NAME):
    """The layer computing `(x / 255 - mean) / std` per channel on pixels `x` in [0, 255].

    Args:
      mean, std: per-channel statistics in [0, 1] pixel units, one value per
        channel (or one value for all channels).
    """
    mean = np.asarray(mean, np.float64).reshape(-1)
    std = np.asarray(std, np.float64).reshape(-1)
    if mean.shape != std.shape or not mean.size:
        raise ValueError(f"mean and std need one value per channel, got {mean.tolist()} and {std.tolist()}.")
    if not np.all(np.isfinite(mean)) or not np.all(std > 0):
        raise ValueError(f"mean must be finite and std > 0, got {mean.tolist()} and {std.tolist()}.")
    return keras.layers.Rescaling(
        scale=[float(s) for s in 1.0 / (255.0 * std)],
        offset=[float(o) for o in -mean / std],
        dtype="float32",
        name=name,
    )


def _sources(structure):
    """The names of the layers whose outputs a serialised call (`inbound_nodes`) takes."""
    if isinstance(structure, dict):
        history = structure.get("config", {}).get("keras_history") if (
            structure.get("class_name") == "__keras_tensor__") else None
        if history:
            return {history[0]}
        return set().union(*(_sources(value) for value in structure.values()))
    if isinstance(structure, (list, tuple)):
        return set().union(*(_sources(value) for value in structure))
    return set()


def _first_layer(model):
    """The one layer that takes `model`'s (single) input, or None.

    Read from the model's config (the graph as `.keras` files store it): the
    first layer of a Sequential model; in a functional model, the layer whose
    calls take the input layer's output, if it is the only one.
    """
    if isinstance(model, keras.Sequential):
        return model.layers[0] if model.layers else None
    try:
        config = model.get_config()
    except NotImplementedError:  # a subclassed model: no graph to read
        return None
    if not isinstance(config, dict) or "layers" not in config or "input_layers" not in config:
        return None
    source = keras.tree.flatten(config["input_layers"])[0]
    consumers = [entry["name"] for entry in config["layers"]
                 if source in _sources(entry.get("inbound_nodes", []))]
    return model.get_layer(consumers[0]) if len(consumers) == 1 else None


def find(model) -> Optional[keras.layers.Layer]:
    """The preprocessing layer right after `model`'s input, or None.

    A `Rescaling` or `Normalization` layer that is the only consumer of the
    model's (single) input counts, also as the first layer of a nested model
    that is itself the input's only consumer (`Input -> backbone -> ...`).
    """
    inputs = getattr(model, "inputs", None)
    if not inputs or len(inputs) != 1:
        return None
    layer = _first_layer(model)
    if isinstance(layer, _PREPROCESSING_TYPES):
        return layer
    if isinstance(layer, keras.Model):
        return find(layer)
    return None


def add(model, mean, std) -> keras.Model:
    """`model` with `normalization(mean, std)` inserted right after its input.

    The result is one functional graph (no nested model) sharing `model`'s
    layers and weights, with the same name, input name and layer names, so
    `features` (or any layer) is still addressed by its name. `model` must be
    a functional or Sequential model with one input.
    """
    inputs = getattr(model, "inputs", None)
    if not inputs or len(inputs) != 1:
        raise ValueError(
            f"Model '{model.name}' needs exactly one input to take a preprocessing layer "
            "(a functional or Sequential model built with an Input)."
        )
    source = inputs[0]
    raw = keras.Input(batch_shape=source.shape, dtype=source.dtype, name=source.name)
    layer = normalization(mean, std)
    normalised = []

    def call(operation, *args, **kwargs):
        def swap(value):
            if value is raw:
                if not normalised:
                    normalised.append(layer(raw))
                return normalised[0]
            return value

        args, kwargs = keras.tree.map_structure(swap, (args, kwargs))
        return operation(*args, **kwargs)

    if isinstance(model, keras.Sequential):
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    return keras.models.clone_model(
        model, clone_function=lambda layer: layer, call_function=call,
        input_tensors=keras.tree.map_structure(lambda _: raw, model.input),
    )


def raw_pixel_model(model, convention, *, statistics, what, flag):
    """A teacher from outside keras-feed as a model that takes raw pixels in [0, 255].

    A model that starts with its own preprocessing layer (`find`) is returned
    as it is, whatever `convention` says. Otherwise `convention`
    (`CONVENTIONS`) says what it expects: `"dataset"`, images normalised with
    the dataset's mean and std, which `statistics()` gives (it is wrapped
    with `add`); `"none"`, raw pixels (returned as it is); `"auto"`, nothing
    was said: `ValueError`, one line naming `what` and `flag`.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown {flag} '{convention}'; choose from {', '.join(CONVENTIONS)}.")
    if find(model) is not None or convention == "none":
        return model
    if convention == "dataset":
        return add(model, *statistics())
    raise ValueError(
        f"{what} has no preprocessing layer after its input, so what it takes is unknown: "
        f"pass {flag}=dataset for a model that expects images normalised with the dataset's "
        f"mean and std, or {flag}=none for one that takes raw pixels in [0, 255]."
    )
