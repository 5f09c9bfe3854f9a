"""The toy world: a video domain small enough to train and distill on a laptop CPU (docs/toy-world.md).

Modules, in reading order:

- ``captions``: vocabulary, per-clip parameters (:class:`ClipParams`) and the caption grammar (parseable both ways);
- ``render``: seeded parameter sampling and drawing of clips (uint8 RGB frames);
- ``videos``: VP9 files (PyAV) and the two pixel forms (uint8 ``(T, H, W, 3)`` / float ``(B, 3, T, H, W)``);
- ``world``: :class:`ToyWorldConfig` and ``ensure_dataset(cfg) -> manifest path`` (generated on first use, repaired);
- ``text``: :class:`ToyTextEncoder` (the umT5 role); ``codec``: :class:`ToyCodec` (the VAE role);
- ``vision`` and ``metrics``: what a clip shows, and the metrics of the paper's failure modes; ``evaluate``: the
  real-clip reference and comparison tables.
"""
