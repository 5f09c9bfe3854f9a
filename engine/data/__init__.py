"""Data: manifests, video readers (DALI, PyAV), the Wan VAE and umT5 wrappers, caches, curation.

Read in this order: ``manifest`` (what to read) -> ``probe`` (what a file holds, which frames make a clip) ->
``sampler`` (order, sharding, resume) -> ``decoders`` + ``transforms`` -> ``reader`` (the batches) -> ``vae`` and
``text`` (the codec and text encoder of ``interfaces``) -> ``cache`` + ``precompute`` -> ``source`` (what the trainer
iterates) -> ``curation`` + ``curation_stats`` (offline filtering). Bad inputs: ``skips``.

Nothing is imported here, so importing one piece does not pull in DALI, transformers or diffusers.
"""
