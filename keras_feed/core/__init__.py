"""The distillation core, backend-neutral (`keras.ops`): no run, no files, no flags.

- `losses`: `feed_loss`, `kd_loss`, `ensemble_soft_targets`: pure functions.
- `frozen`: feature maps by layer name or path, logits of softmax heads,
  inference twins of frozen networks.
- `translators`: the NTL (`Translator`) and Factor Transfer's `Paraphraser`.
- `distiller`: `FEEDDistiller`, the `keras.Model` that trains a student from
  frozen teachers through its NTLs.
- `factor_transfer`: `ParaphraserTrainer`, Factor Transfer's first stage.
- `trainer`: what Keras' trainers lack for FEED, per backend (`Trainer`).
- `terms`: the distillation terms as objects (`FeatureTerm`, `KDTerm`, `Term`).
- `weighting`: per-example weights of the teachers (`equal`, `confidence`,
  `entropy`, `agreement`), from their logits and the labels.
"""

from keras_feed import lazy

__getattr__, __dir__, __all__ = lazy.exports(
    __name__, ("distiller", "factor_transfer", "frozen", "losses", "terms", "trainer",
                 "translators", "weighting"))
