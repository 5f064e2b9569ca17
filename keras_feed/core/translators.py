"""FEED's non-linear transformation layer (NTL) and Factor Transfer's paraphraser.

(A run's NTLs are saved and read back by `keras_feed.run.storage.save_translators`
and `load_translators`.)"""

import keras

_LEAKY_SLOPE = 0.1


def _conv_block(filters, *, strides=1, batchnorm=False, transpose=False, name):
    """3x3 conv (same padding, bias) [+ BatchNorm] + LeakyReLU(0.1)."""
    conv_class = keras.layers.Conv2DTranspose if transpose else keras.layers.Conv2D
    block = [
        conv_class(
            filters,
            3,
            strides=strides,
            padding="same",
            use_bias=True,
            kernel_initializer="he_normal",
            name=f"{name}_conv",
        )
    ]
    if batchnorm:
        block.append(
            keras.layers.BatchNormalization(
                momentum=0.9, epsilon=1e-5, name=f"{name}_bn"
            )
        )
    block.append(keras.layers.LeakyReLU(negative_slope=_LEAKY_SLOPE, name=f"{name}_act"))
    return block


def spatial_adapter(student_shape, teacher_shape):
    """How an NTL maps the student's spatial size onto the teacher's.

    Args:
      student_shape: the student map's shape `(H, W, C)` (batch dim excluded).
      teacher_shape: the teacher map's shape `(H, W, C)`.

    Returns:
      `(strides, upsample)`: the first convolution's stride when the student's
      map is an integer multiple larger, or the bilinear upsampling factor when
      it is an integer multiple smaller (1 and 1 when the sizes match).

    Raises:
      ValueError: when neither is an integer multiple of the other, naming both.
    """
    student_hw = tuple(student_shape[:2])
    teacher_hw = tuple(teacher_shape[:2])
    if student_hw == teacher_hw:
        return 1, 1
    ratios = set()
    for s, t in zip(student_hw, teacher_hw):
        if s is None or t is None:
            break
        if s % t == 0:
            ratios.add((s // t, 1))
        elif t % s == 0:
            ratios.add((1, t // s))
        else:
            ratios.add(None)
    else:
        if len(ratios) == 1 and None not in ratios:
            return ratios.pop()
    raise ValueError(
        f"An NTL cannot map the student feature map {tuple(student_shape)} onto "
        f"the teacher feature map {tuple(teacher_shape)}: their spatial sizes "
        "must be equal or integer multiples of each other."
    )


@keras.saving.register_keras_serializable(package="keras_feed")
class Translator(keras.layers.Layer):
    """FEED's non-linear transformation layer (NTL), Factor Transfer's translator.

    Three 3x3 convolutions (stride 1, same padding, with bias), each followed
    by LeakyReLU(0.1), the last one included: `in -> in -> out -> out` channels,
    as in the reference Factor Transfer code. It maps the student's final
    feature map `(batch, H, W, C_student)` to `(batch, H', W', out_channels)`,
    the shape of one teacher's map.

    Args:
      out_channels: channels of the teacher's map (or of FT's factor).
      strides: stride of the first convolution, to shrink a larger student map.
      upsample: bilinear upsampling factor applied first, to grow a smaller one.
      batchnorm: add BatchNormalization after each convolution (the reference
        FEED code has none).
    """

    def __init__(self, out_channels, *, strides=1, upsample=1, batchnorm=False, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = int(out_channels)
        self.strides = int(strides)
        self.upsample = int(upsample)
        self.batchnorm = bool(batchnorm)
        self._blocks = []

    def build(self, input_shape):
        in_channels = int(input_shape[-1])
        blocks = []
        if self.upsample > 1:
            blocks.append(
                keras.layers.UpSampling2D(
                    self.upsample, interpolation="bilinear", name="upsample"
                )
            )
        plan = [
            (in_channels, self.strides),
            (self.out_channels, 1),
            (self.out_channels, 1),
        ]
        for index, (filters, strides) in enumerate(plan):
            blocks += _conv_block(
                filters, strides=strides, batchnorm=self.batchnorm, name=f"ntl{index}"
            )
        shape = input_shape
        for layer in blocks:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self._blocks = blocks

    def call(self, inputs, training=None):
        x = inputs
        for layer in self._blocks:
            x = layer(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        shape = input_shape
        for layer in self._blocks:
            shape = layer.compute_output_shape(shape)
        return shape

    def get_config(self):
        config = super().get_config()
        config.update(
            out_channels=self.out_channels,
            strides=self.strides,
            upsample=self.upsample,
            batchnorm=self.batchnorm,
        )
        return config


def translator_for(student_shape, teacher_shape, *, out_channels=None, batchnorm=False, name=None):
    """Builds a `Translator` from the student's map to the teacher's, eagerly.

    Args:
      student_shape: `(H, W, C)` of the student's feature map.
      teacher_shape: `(H, W, C)` of the teacher's feature map.
      out_channels: channels to end at (default: the teacher's).
      batchnorm: see `Translator`.
      name: layer name.

    Raises:
      ValueError: if the spatial sizes cannot be bridged (names both shapes).
    """
    strides, upsample = spatial_adapter(student_shape, teacher_shape)
    translator = Translator(
        out_channels or teacher_shape[-1],
        strides=strides,
        upsample=upsample,
        batchnorm=batchnorm,
        name=name,
    )
    translator.build((None,) + tuple(student_shape))
    return translator


def factor_channels(channels, rate):
    """Channels of a paraphraser's factor: `rate * channels`, rounded, at least 1."""
    return max(1, int(round(rate * channels)))


@keras.saving.register_keras_serializable(package="keras_feed")
class Paraphraser(keras.Model):
    """Factor Transfer's paraphraser: an autoencoder of a teacher's feature map.

    The encoder is three 3x3 convolutions `C -> C -> k*C -> k*C` (k = `rate`),
    the decoder three 3x3 transposed convolutions back to `C`, each followed by
    LeakyReLU(0.1). It is trained to reconstruct the (frozen) teacher's map,
    then frozen; its encoder's output is the teacher's *factor*, which the
    student's translator learns to match.

    Args:
      channels: channels C of the teacher's map.
      rate: the paraphrase rate k in (0, 1]; the factor has `max(1, round(k*C))`
        channels.
      batchnorm: BatchNorm after each convolution.
    """

    def __init__(self, channels, *, rate=0.5, batchnorm=False, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"The paraphrase rate must lie in (0, 1], got {rate}.")
        self.channels = int(channels)
        self.rate = float(rate)
        self.batchnorm = bool(batchnorm)
        self.factor_channels = factor_channels(self.channels, rate)
        encoder_plan = (self.channels, self.factor_channels, self.factor_channels)
        decoder_plan = (self.factor_channels, self.channels, self.channels)
        self.encoder = keras.Sequential(
            [
                layer
                for index, filters in enumerate(encoder_plan)
                for layer in _conv_block(filters, batchnorm=batchnorm, name=f"encoder{index}")
            ],
            name="encoder",
        )
        self.decoder = keras.Sequential(
            [
                layer
                for index, filters in enumerate(decoder_plan)
                for layer in _conv_block(
                    filters, batchnorm=batchnorm, transpose=True, name=f"decoder{index}"
                )
            ],
            name="decoder",
        )

    def build(self, input_shape):
        self.encoder.build(input_shape)
        self.decoder.build(self.encoder.compute_output_shape(input_shape))
        self.built = True

    def call(self, inputs, training=None):
        """The reconstruction of `inputs` (a teacher map)."""
        return self.decoder(self.encoder(inputs, training=training), training=training)

    def get_config(self):
        return {
            "name": self.name,
            "channels": self.channels,
            "rate": self.rate,
            "batchnorm": self.batchnorm,
        }
