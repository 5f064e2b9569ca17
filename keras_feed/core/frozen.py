"""Frozen graphs: features by layer name or path, logits, and inference twins.

One module serves everyone who reads a network without training it (the
distiller's teachers, Factor Transfer's paraphraser stage, the analysis and
the benchmarks) and everyone who needs more than a model's final output from
ONE forward pass (the distiller's student):

- `extractor(model, layer)`: a functional model giving `(predictions, logits,
  features)`: the model's own output, its pre-softmax logits, and the map of
  the layer named `layer` (or `backbone/layer` inside a nested model). The
  model's layers are shared, not copied.
- `head_kind(model)`: what the model's last layer gives (`"logits"`,
  `"softmax"` or another activation), the one place where that is decided.
- `inference_model(model)` / `refold(twin)`: a twin for inference in which
  each `Conv2D -> BatchNormalization` pair is one convolution with a bias,
  folded from the live weights by `refold` (once per `fit`/`evaluate` call of
  the distiller, not at every step).
- `Untracked`: a holder that keeps models out of Keras' attribute tracking, so
  a frozen teacher is never in a trainer's weights, checkpoints or exports.

Everything that computes is written with `keras.ops`.
"""

import keras
import numpy as np
from keras import ops


class Untracked:
    """Holds a value out of Keras' and TensorFlow's attribute tracking.

    A trainer keeps its frozen teachers (and the graphs built on them) in one
    of these: its weights, checkpoints and exports never contain them.
    """

    def __init__(self, value):
        self.value = value


# -- addressing a functional graph -------------------------------------------


def functional(model, *, role="Model"):
    """`model` as a functional graph (a built `Sequential` qualifies).

    Raises:
      ValueError: for a subclassed or unbuilt model, whose layers' outputs
        cannot be addressed by name.
    """
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ValueError(
            f"{role} '{model.name}' is not a functional Keras model (a subclassed or "
            "unbuilt model): its features cannot be addressed by layer name. Build it "
            "with the functional API or as a Sequential with an Input."
        )
    if isinstance(model, keras.Sequential):
        return keras.Model(inputs, outputs, name=model.name)
    return model


def _producer(tensor):
    """The layer that produced the symbolic `tensor`."""
    return tensor._keras_history.operation


def output_layer(model, *, role="Model"):
    """The layer whose output is `model`'s (first) output."""
    return _producer(functional(model, role=role).outputs[0])


def _activation_name(layer):
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return "linear"
    return getattr(activation, "__name__", str(activation))


def head_kind(model, *, role="Model"):
    """What `model`'s output is: `"logits"`, `"softmax"`, or an activation's name.

    `"logits"`: a last layer without activation (or with `log_softmax`, whose
    softmax is that of its logits). `"softmax"`: a last layer with a softmax
    activation, an `Activation("softmax")` or a `Softmax` layer, as every
    `keras.applications` classifier by default. Anything else (e.g.
    `"sigmoid"`) is returned by name.
    """
    name = _activation_name(output_layer(model, role=role))
    if name in ("linear", "log_softmax"):
        return "logits"
    return name


def _layer(model, name, path, role, owner):
    try:
        return model.get_layer(name)
    except ValueError:
        raise ValueError(
            f"{role} '{owner}' has no layer named '{name}'"
            + (f" (in the path '{path}', inside '{model.name}')" if name != path else "")
            + "; pass the name of its final feature-map layer, or "
            "'<nested model>/<layer>' for a layer inside a nested model."
        ) from None


class _WithoutActivation(keras.layers.Layer):
    """Calls a layer with its activation switched off: its pre-activation output.

    The layer's own weights are used (not copied, not tracked here), so the
    logits come from the same forward pass as the rest of the graph.
    """

    def __init__(self, layer, **kwargs):
        super().__init__(name=f"{layer.name}_logits", dtype=layer.dtype_policy, **kwargs)
        self._layer = Untracked(layer)

    def call(self, inputs):
        layer = self._layer.value
        activation = layer.activation
        layer.activation = keras.activations.linear
        try:
            return layer(inputs)
        finally:
            layer.activation = activation

    def compute_output_shape(self, input_shape):
        return self._layer.value.compute_output_shape(input_shape)


def _tapped(model, path, role, *, logits, full_path=None, owner=None):
    """A functional twin of `model` sharing its layers, with extra outputs.

    Returns `(twin, extra)`: `twin.outputs` is `model.outputs` followed by the
    tensors named in `extra` (`"features"`: the output of the layer at `path`;
    `"logits"`: the pre-activation output of the last layer, when `logits`).
    """
    graph = functional(model, role=role)
    first, _, rest = path.partition("/")
    full_path, owner = full_path or path, owner or graph.name
    target = _layer(graph, first, full_path, role, owner)
    head = output_layer(graph)
    kind = _activation_name(head)
    wants_logits = logits and kind not in ("linear", "log_softmax")
    if target is head:
        raise ValueError(
            f"Layer '{first}' of {role.lower()} '{graph.name}' is its output layer, of shape "
            f"{tuple(graph.outputs[0].shape)}; a feature map (batch, H, W, C) before global "
            "pooling is needed."
        )
    inner = (
        _tapped(target, rest, role, logits=False, full_path=full_path, owner=owner)[0]
        if rest else None
    )

    captured = {}

    def call(layer, *args, **kwargs):
        if layer is target:
            if "features" in captured:
                raise ValueError(
                    f"Layer '{first}' of {role.lower()} '{graph.name}' is called more "
                    "than once in its graph: its feature map is ambiguous."
                )
            if inner is None:
                outputs = layer(*args, **kwargs)
                captured["features"] = outputs
                return outputs
            *outputs, captured["features"] = inner(*args, **kwargs)
            return outputs[0] if len(outputs) == 1 else outputs
        if layer is head and wants_logits:
            if isinstance(layer, (keras.layers.Softmax, keras.layers.Activation)):
                captured["logits"] = args[0]
                return layer(*args, **kwargs)
            captured["logits"] = _WithoutActivation(layer)(*args, **kwargs)
            return keras.layers.Activation(
                layer.activation, dtype=layer.dtype_policy, name=f"{layer.name}_activation"
            )(captured["logits"])
        return layer(*args, **kwargs)

    twin = keras.models.clone_model(graph, clone_function=lambda layer: layer, call_function=call)
    if logits and not wants_logits:
        captured["logits"] = twin.outputs[0]
    extra = ["features"] + (["logits"] if logits else [])
    twin = keras.Model(
        twin.inputs if len(twin.inputs) > 1 else twin.inputs[0],
        [*twin.outputs, *(captured[key] for key in extra)],
        name=graph.name,
    )
    return twin, extra


def extractor(model, layer="features", *, role="Model", name=None):
    """A functional model giving `[predictions, logits, features]` from ONE pass.

    Args:
      model: a functional or Sequential `keras.Model` classifying images;
        nested models (a `keras.applications` backbone inside a transfer
        model) may be addressed through.
      layer: the feature-map layer's name, or a path `outer/inner` whose first
        part names a nested model of `model` and the rest a layer inside it;
        naming the nested model itself gives its output.
      role: how messages name the model ("Student", "Teacher 0", ...).
      name: the extractor's name.

    Returns:
      A functional `keras.Model` sharing `model`'s layers: `predictions` is
      `model`'s own output (probabilities for a softmax head), `logits` its
      pre-softmax logits (the same tensor for a head without activation), and
      `features` the map `(batch, H, W, C)`.

    Raises:
      ValueError: one line naming the model, the layer and the shapes, for a
        subclassed model, a missing layer, or a layer whose output is not a
        feature map.
    """
    twin, _ = _tapped(model, layer, role, logits=True)
    predictions, *_, features, logits = twin.outputs
    if len(features.shape) != 4:
        raise ValueError(
            f"Layer '{layer}' of {role.lower()} '{model.name}' outputs shape "
            f"{tuple(features.shape)}; a feature map (batch, H, W, C) is needed."
        )
    inputs = twin.inputs if len(twin.inputs) > 1 else twin.inputs[0]
    return keras.Model(inputs, [predictions, logits, features], name=name or f"{model.name}_extractor")


def feature_shape(model, layer="features", *, role="Model"):
    """`(H, W, C)` of the feature map `extractor(model, layer)` gives (name or path)."""
    return tuple(extractor(model, layer, role=role).outputs[2].shape[1:])


# -- inference twins: Conv2D + BatchNormalization folded ----------------------


class FoldedConvBatchNorm(keras.layers.Layer):
    """A `Conv2D` and the `BatchNormalization` after it, as one convolution.

    In inference mode the pair is one affine map per output channel:

        BN(conv(x, K) + b) = conv(x, K * s) + (b - mean) * s + beta,
        s = gamma / sqrt(moving_variance + epsilon)

    The folded kernel and bias live in this layer's own (non-trainable)
    variables, written by `refold()` from the pair's live weights.
    """

    def __init__(self, conv, batchnorm, **kwargs):
        super().__init__(name=f"{conv.name}_folded", dtype=conv.dtype_policy, trainable=False, **kwargs)
        self._pair = Untracked((conv, batchnorm))
        self.kernel = self.add_weight(
            shape=tuple(conv.kernel.shape), initializer="zeros", trainable=False,
            dtype="float32", name="kernel",
        )
        self.bias = self.add_weight(
            shape=(conv.filters,), initializer="zeros", trainable=False,
            dtype="float32", name="bias",
        )
        self.refold()

    def refold(self):
        """Folds the pair's current weights into this layer's kernel and bias."""
        conv, batchnorm = self._pair.value
        value = lambda variable: np.asarray(ops.convert_to_numpy(variable), np.float64)  # noqa: E731
        scale = 1.0 / np.sqrt(value(batchnorm.moving_variance) + batchnorm.epsilon)
        if batchnorm.gamma is not None:
            scale *= value(batchnorm.gamma)
        offset = -value(batchnorm.moving_mean) * scale
        if batchnorm.beta is not None:
            offset += value(batchnorm.beta)
        if conv.use_bias:
            offset += value(conv.bias) * scale
        self.kernel.assign((value(conv.kernel) * scale).astype("float32"))
        self.bias.assign(offset.astype("float32"))

    def call(self, inputs):
        conv = self._pair.value[0]
        channels = conv.kernel.shape[-2] * conv.groups
        if inputs.shape[-1] is not None and inputs.shape[-1] != channels:
            raise ValueError(
                f"Layer '{conv.name}' takes {channels} input channels, got "
                f"{inputs.shape[-1]} (input shape {tuple(inputs.shape)})."
            )
        outputs = conv.convolution_op(
            ops.cast(inputs, self.compute_dtype), ops.cast(self.kernel, self.compute_dtype)
        )
        return ops.add(outputs, ops.cast(self.bias, outputs.dtype))

    def compute_output_shape(self, input_shape):
        return self._pair.value[0].compute_output_shape(input_shape)


def _trace(model):
    """Every layer call of `model`'s graph: `[(layer, input tensors, output tensors)]`.

    Read from a clone sharing the layers, so that what a layer does in other
    graphs (an extractor built on the same model, say) does not count.
    """
    calls = []

    def record(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        inputs = [t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)]
        calls.append((layer, inputs, keras.tree.flatten(outputs)))
        return outputs

    clone = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=record)
    return clone, calls


def _foldable_pairs(model):
    """`{id(conv): (conv, batchnorm)}` for the foldable pairs of `model`'s graph."""
    clone, calls = _trace(model)
    times_called, consumers, producer = {}, {}, {}
    for layer, inputs, outputs in calls:
        times_called[id(layer)] = times_called.get(id(layer), 0) + 1
        for tensor in inputs:
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
        for tensor in outputs:
            producer[id(tensor)] = layer
    outputs_of_model = {id(tensor) for tensor in clone.outputs}
    pairs = {}
    for batchnorm, inputs, _ in calls:
        if type(batchnorm) is not keras.layers.BatchNormalization or len(inputs) != 1:
            continue
        conv = producer.get(id(inputs[0]))
        if (
            type(conv) is keras.layers.Conv2D
            and conv.data_format == "channels_last"
            and conv.activation is keras.activations.linear
            and times_called[id(conv)] == 1
            and times_called[id(batchnorm)] == 1
            and consumers[id(inputs[0])] == 1
            and id(inputs[0]) not in outputs_of_model
            and batchnorm.axis in (-1, len(inputs[0].shape) - 1)
        ):
            pairs[id(conv)] = (conv, batchnorm)
    return pairs


def inference_model(model):
    """A twin of the functional `model` for inference, Conv2D+BN pairs folded.

    A frozen network runs in inference mode only, so each `Conv2D ->
    BatchNormalization` pair of its graph is one convolution with a bias
    (`FoldedConvBatchNorm`); every other layer is shared with `model`. The
    folded weights are computed when the twin is built; call `refold(twin)`
    after `model`'s weights change (the distiller does so at the start of
    every `fit`, `evaluate`, `train_on_batch` and `test_on_batch`).

    Only exact `keras.layers.Conv2D` (channels-last, linear activation) feeding
    exactly one exact `keras.layers.BatchNormalization` over the channel axis,
    both called once in `model`'s graph, are folded; a convolution whose own
    output is one of the model's outputs is left alone. Every layer keeps its
    dtype policy.

    Returns:
      A functional `keras.Model` with the same inputs and outputs, or `model`
      itself when nothing can be folded. Call it with `training=False`.
    """
    pairs = _foldable_pairs(model)
    if not pairs:
        return model
    folded_batchnorms = {id(batchnorm) for _, batchnorm in pairs.values()}

    def call(layer, *args, **kwargs):
        if id(layer) in pairs:
            return FoldedConvBatchNorm(*pairs[id(layer)])(*args)
        if id(layer) in folded_batchnorms:
            return args[0]  # folded into the convolution before it
        return layer(*args, **kwargs)

    return keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)


def folded_layers(twin):
    """The `FoldedConvBatchNorm` layers of an inference twin."""
    return [layer for layer in twin.layers if isinstance(layer, FoldedConvBatchNorm)]


def refold(twin):
    """Refolds every Conv+BN pair of `twin` from its network's current weights."""
    for layer in folded_layers(twin):
        layer.refold()
