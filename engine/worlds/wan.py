"""The Wan world: AutoencoderKLWan and umT5 from local paths (loaded on first use); for training, per-rank batches of
VAE latents and umT5 embeddings (precomputed caches or encoded online), the negative prompt for CFG, and the prompts
of the sample videos.

By default (``data.dmd_prompts.source=same``) DMD prompts come from the same draw as the regression pair. Algorithm 1
writes ``c ~ D`` and ``(c_y, y) ~ D``; one draw serves both because each branch still sees captions distributed as the
data. A second draw from the data would, online, decode and VAE-encode clips only to throw their latents away (the
costliest part of the data path). The price: a step conditions on B distinct captions instead of 2B. With
``data.dmd_prompts.source=file`` (umT5 encodes B prompts of a prompt file per step) or ``cache`` (a text cache of a
prompt manifest) the DMD branch has a prompt set of its own: broad prompts for distillation while ``data.*`` holds the
target domain's clips for the regression branch (docs/method.md#prompts-and-pairs); both positions are resumed.

Sample prompts: ``logging.sample_prompts`` when set, encoded once at start (by the online encoder; from a cache, by
umT5 loaded for that and freed, so they need ``text_encoder.path``); otherwise the first captions of the data (their
cached embeddings, or encoded online). Configured prompts are never replaced silently. A cache run without
``vae.path`` cannot decode, so it skips samples with one logged line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ConfigError, RunConfig
from engine.data.cache import CacheError, negative_path, read_index, read_negative, safetensors_header, verify_shards
from engine.data.source import CacheDataset, build_source
from engine.train import dist
from engine.worlds.base import VIEW_SCALE, World, latent_shape, world_latent_shape
from engine.worlds.prompts import CachedPrompts, EncodedPrompts, check_prompt_count, prompt_seed, read_prompt_file
from engine.worlds.source import Batch, SplitSource

log = logging.getLogger("vidistill.train")
PRECOMPUTE = "python -m launcher.precompute --config <this config>"


# ---------------------------------------------------------------------------------------------------------------------
# Checks before anything heavy: every error names its key
# ---------------------------------------------------------------------------------------------------------------------


def _need_path(value: str | None, key: str, why: str) -> None:
    if not value:
        raise ConfigError(f"config key `{key}`: required ({why})")
    if not Path(value).exists():
        raise ConfigError(f"config key `{key}`: {value} does not exist ({why})")


def _cached_latent_shape(cache_dir: str, index: dict) -> tuple[int, ...]:
    """(C, F, H, W) of the first non-empty latent shard (read from its header, no tensor loaded)."""
    shard = next(s for s in index["shards"] if s["index"])  # write_index guarantees one exists
    with safe_open(str(Path(cache_dir) / "latents" / shard["file"]), "pt") as f:
        return tuple(f.get_slice("latents").get_shape()[1:])


def _check_cache(cfg: RunConfig) -> None:
    """Both indexes and the negative prompt exist, and the cache was built with this config's sizes."""
    d, te = cfg.data, cfg.text_encoder
    _need_path(d.cache_dir, "data.cache_dir", f"data.source=cache reads the caches written by `{PRECOMPUTE}`")
    index = {kind: read_index(d.cache_dir, kind) for kind in ("text", "latents")}
    for kind, idx in index.items():
        if idx is None:
            raise ConfigError(
                f"config key `data.cache_dir`: {Path(d.cache_dir) / kind / 'index.json'} not found: run `{PRECOMPUTE}`"
                " first (re-running it resumes)"
            )
        try:  # every shard now, so a missing or truncated one stops the start, not a step hours in
            verify_shards(d.cache_dir, kind, idx)
        except CacheError as exc:
            raise ConfigError(
                f"config key `data.cache_dir`: {exc}; delete that file and re-run `{PRECOMPUTE}` (it rebuilds only "
                "missing shards)"
            ) from exc
    built = index["latents"]["fingerprint"]
    for key in ("num_frames", "height", "width", "fps"):
        if key in built and built[key] != getattr(d, key):
            raise ConfigError(
                f"config key `data.{key}`: {getattr(d, key)}, but the latent cache in {d.cache_dir} was built with "
                f"{built[key]}; train with the config the cache was built with, or build a new cache"
            )
    cached = _cached_latent_shape(d.cache_dir, index["latents"])
    if cached != world_latent_shape(cfg):
        raise ConfigError(
            f"config key `model.in_dim`: the latent cache in {d.cache_dir} holds {cached} latents, this config expects"
            f" {world_latent_shape(cfg)} (model.in_dim, vae.temporal_stride, vae.spatial_stride)"
        )
    try:
        if negative_path(d.cache_dir).exists():
            safetensors_header(negative_path(d.cache_dir))
        negative, prompt, max_length = read_negative(d.cache_dir)
    except CacheError as exc:
        raise ConfigError(f"config key `data.cache_dir`: {exc}") from exc
    if max_length != te.max_length:
        raise ConfigError(
            f"config key `text_encoder.max_length`: {te.max_length}, but the text cache was built with {max_length}"
        )
    if prompt != te.negative_prompt:
        raise ConfigError(
            f"config key `text_encoder.negative_prompt`: {te.negative_prompt!r}, but the text cache holds {prompt!r};"
            f" re-run `{PRECOMPUTE} --kinds text` to encode this one (finished shards are skipped)"
        )
    if negative.shape[-1] != cfg.model.text_dim:
        raise ConfigError(
            f"config key `model.text_dim`: {cfg.model.text_dim}, but the cached embeddings have {negative.shape[-1]}"
        )


def _check_prompt_cache(cfg: RunConfig, world_size: int) -> None:
    """A DMD prompt text cache: indexed, every shard whole, built with this max_length and embedding width."""
    p, te = cfg.data.dmd_prompts, cfg.text_encoder
    key = "data.dmd_prompts.cache_dir"
    _need_path(p.cache_dir, key, "the DMD prompts' text cache")
    index = read_index(p.cache_dir, "text")
    if index is None:
        raise ConfigError(
            f"config key `{key}`: {Path(p.cache_dir) / 'text' / 'index.json'} not found: run `{PRECOMPUTE} "
            "--dmd-prompts` first (it encodes data.dmd_prompts.path into data.dmd_prompts.cache_dir; a re-run resumes)"
        )
    try:
        verify_shards(p.cache_dir, "text", index)
    except CacheError as exc:
        raise ConfigError(f"config key `{key}`: {exc}") from exc
    built = index.get("max_length")
    if built is not None and int(built) != te.max_length:
        raise ConfigError(
            f"config key `{key}`: built with text_encoder.max_length={built}, this run has {te.max_length}"
        )
    shard = next(s for s in index["shards"] if s["index"])
    with safe_open(str(Path(p.cache_dir) / "text" / shard["file"]), "pt") as f:
        dim = f.get_slice("emb").get_shape()[-1]
    if dim != cfg.model.text_dim:
        raise ConfigError(
            f"config key `{key}`: its embeddings have {dim} channels, model.text_dim is {cfg.model.text_dim}"
        )
    check_prompt_count(sum(len(s["index"]) for s in index["shards"]), cfg.optim.micro_batch_size, world_size,
                       "cached prompts", key)  # fmt: skip


def _check_dmd_prompts(cfg: RunConfig) -> None:
    p = cfg.data.dmd_prompts
    if p.source == "file":
        _need_path(cfg.text_encoder.path, "text_encoder.path", "umT5 encodes data.dmd_prompts.path's prompts each step")
        n = len(read_prompt_file(p.path))
        check_prompt_count(n, cfg.optim.micro_batch_size, dist.data_world_size(), "prompts", "data.dmd_prompts.path")
    elif p.source == "cache":
        _check_prompt_cache(cfg, dist.data_world_size())


def check_wan_config(cfg: RunConfig) -> None:
    """Raise ConfigError naming the key when the Wan world cannot be built (paths, caches), before loading anything."""
    _check_dmd_prompts(cfg)
    if cfg.data.source == "online":
        _need_path(cfg.data.manifest, "data.manifest", "data.source=online decodes the videos it lists")
        _need_path(cfg.vae.path, "vae.path", "data.source=online encodes videos with the Wan VAE")
        _need_path(cfg.text_encoder.path, "text_encoder.path", "data.source=online encodes captions with umT5")
        return
    _check_cache(cfg)
    if not cfg.vae.path:
        return  # no samples, so neither model is loaded
    _need_path(cfg.vae.path, "vae.path", "rank 0 decodes sample videos with it")
    if cfg.logging.sample_prompts and not cfg.text_encoder.path:
        raise ConfigError(
            "config key `logging.sample_prompts`: a cache run encodes configured sample prompts with umT5, so it needs"
            " text_encoder.path; set it, or leave sample_prompts empty to sample the cache's first captions"
        )
    if cfg.logging.sample_prompts:
        _need_path(cfg.text_encoder.path, "text_encoder.path", "umT5 encodes logging.sample_prompts once at start")


def _check_online_parts(cfg: RunConfig, codec, encoder_dim: int, shape: tuple) -> None:
    d = cfg.data
    try:
        got = latent_shape(
            d.num_frames, d.height, d.width,
            channels=codec.z_dim, temporal_stride=codec.temporal_stride, spatial_stride=codec.spatial_stride,
        )  # fmt: skip
    except ValueError as exc:
        raise ConfigError(f"config key `vae`: the VAE at {cfg.vae.path}: {exc}") from exc
    if got != shape:
        raise ConfigError(
            f"config key `vae`: the VAE at {cfg.vae.path} gives latents {got} for {d.num_frames}x{d.height}x"
            f"{d.width}, the config expects {shape} (model.in_dim, vae.temporal_stride, vae.spatial_stride)"
        )
    if encoder_dim != cfg.model.text_dim:
        raise ConfigError(f"config key `model.text_dim`: {cfg.model.text_dim}, but umT5 gives {encoder_dim}")


# ---------------------------------------------------------------------------------------------------------------------
# The trainer's source
# ---------------------------------------------------------------------------------------------------------------------


class StreamSource:
    """A :class:`~engine.worlds.source.TrainSource` over an endless stream of data dicts (``CacheDataset`` or
    ``OnlineSource``): ``latents`` (B, C, F, H, W) and ``text_emb`` (B, L, D) become one :class:`Batch` whose DMD
    prompts are the regression pair's captions (module docstring). The stream's position is the resumable state."""

    def __init__(self, stream, shape: tuple[int, int, int, int], device: torch.device | str, kind: str):
        self.stream, self.shape, self.device, self.kind = stream, tuple(shape), device, kind
        self._it = None  # started on the first batch, so a resume never races a prefetcher

    def next_batch(self) -> Batch:
        if self._it is None:
            self._it = iter(self.stream)
        item = next(self._it, None)
        if item is None:
            raise RuntimeError(f"the {self.kind} data stream ended; it should be endless")
        latents = item["latents"].to(self.device, non_blocking=True)  # (B, C, F, H, W)
        if tuple(latents.shape[1:]) != self.shape:
            raise ValueError(f"{self.kind} latents have shape {tuple(latents.shape[1:])}, the job expects {self.shape}")
        text = item["text_emb"].to(self.device, non_blocking=True)  # (B, L, D)
        return Batch(prompts=text, real_latents=latents, real_context=text)

    def next_pairs(self) -> Batch:
        """The same single draw (a :class:`~engine.worlds.source.SplitSource` replaces its prompts)."""
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"data state saved from data.source={state.get('kind')}, this run has {self.kind}")
        self.close()
        self.stream.load_state_dict(state["stream"])

    def close(self) -> None:
        """Stop the running iterator (and any prefetch thread behind it); the next batch restarts at the position."""
        if self._it is not None:
            self._it.close()
            self._it = None


# ---------------------------------------------------------------------------------------------------------------------
# The two data sources
# ---------------------------------------------------------------------------------------------------------------------


def _first_cached_captions(cache_dir: str, n: int) -> tuple[list[str], torch.Tensor]:
    """The first ``n`` captions of the text cache (manifest order) and their (n, L, D) embeddings."""
    rows = sum(len(s["index"]) for s in read_index(cache_dir, "text")["shards"])
    batch = next(iter(CacheDataset(cache_dir, kinds=("text",), batch_size=min(n, rows), shuffle=False)))
    return batch["caption"], batch["text_emb"]


def _text_loader(cfg: RunConfig, device):
    def load():
        from engine.data.text import UMT5TextEncoder

        return UMT5TextEncoder.from_config(cfg.text_encoder, device)

    return load


def _codec_loader(cfg: RunConfig, device):
    def load():
        from engine.data.vae import WanVAE

        return WanVAE.from_config(cfg.vae, device)

    return load


def _from_cache(cfg: RunConfig, world: World) -> None:
    """The stream, the negative prompt and the sample prompts from the precomputed caches; the VAE is loaded only
    where sample videos are decoded (rank 0), umT5 only to encode configured sample prompts (then freed)."""
    d = cfg.data
    stream = build_source(
        d,
        batch_size=cfg.optim.micro_batch_size,
        rank=dist.data_rank(),
        world_size=dist.data_world_size(),
        seed=cfg.train.seed,
    )
    world.source = StreamSource(stream, world.latent_shape, world.device, kind="cache")
    world.uncond = read_negative(d.cache_dir)[0].to(world.device)
    if not cfg.vae.path:
        world.load_codec = None
        if dist.is_main():
            log.info("sample videos skipped: vae.path is not set (a cache run loads the VAE only to decode samples)")
        return
    if cfg.logging.sample_prompts:
        prompts = list(cfg.logging.sample_prompts)
        encoder = world.load_text()  # not kept: only these prompts need it
        world.sample_prompts, world.sample_context = prompts, encoder.encode(prompts)[0]
        del encoder
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        world.sample_prompts, world.sample_context = _first_cached_captions(d.cache_dir, cfg.logging.sample_count)


def _online(cfg: RunConfig, world: World) -> None:
    """The stream with the VAE and umT5 encoding in the loop on every rank."""
    codec, encoder = world.codec, world.text
    _check_online_parts(cfg, codec, encoder.dim, world.latent_shape)
    stream = build_source(
        cfg.data,
        batch_size=cfg.optim.micro_batch_size,
        rank=dist.data_rank(),
        world_size=dist.data_world_size(),
        seed=cfg.train.seed,
        codec=codec,
        text_encoder=encoder,
        device=world.device,
    )
    world.source = StreamSource(stream, world.latent_shape, world.device, kind="online")
    world.uncond = encoder.negative()[0].to(world.device)
    prompts = list(cfg.logging.sample_prompts) or [e.caption for e in stream.reader.entries[: cfg.logging.sample_count]]
    world.sample_prompts, world.sample_context = prompts, encoder.encode(prompts)[0]


def _dmd_prompts(cfg: RunConfig, world: World):
    """The DMD branch's own prompt stream (data.dmd_prompts.source file or cache), or None for the pairs' captions."""
    p = cfg.data.dmd_prompts
    if p.source == "same":
        return None
    shard = dict(rank=dist.data_rank(), world_size=dist.data_world_size(), seed=prompt_seed(cfg.train.seed))
    if p.source == "file":  # umT5 is loaded on first use: already there online, loaded for this in a cache run
        prompts = read_prompt_file(p.path)
        return EncodedPrompts(prompts, world.encode_text, cfg.optim.micro_batch_size, **shard, device=world.device)
    dataset = CacheDataset(p.cache_dir, kinds=("text",), batch_size=cfg.optim.micro_batch_size, **shard)
    return CachedPrompts(dataset, world.device)


def wan_world(cfg: RunConfig, device: torch.device | str = "cpu", *, training: bool = False) -> World:
    """The Wan world; ``training`` checks the data config first, then builds this rank's source, the negative prompt
    and the sample prompts (before any model is built)."""
    world = World(
        latent_shape=world_latent_shape(cfg),
        kind="wan",
        view_scale=VIEW_SCALE["wan"],
        negative_prompt=cfg.text_encoder.negative_prompt,
        device=device,
        load_text=_text_loader(cfg, device),
        load_codec=_codec_loader(cfg, device),
    )
    if training:
        check_wan_config(cfg)
        (_from_cache if cfg.data.source == "cache" else _online)(cfg, world)
        prompts = _dmd_prompts(cfg, world)
        if prompts is not None:
            world.source = SplitSource(world.source, prompts)
    return world
