"""The Wan world of the distillation job on tiny real parts: a tiny teacher, AutoencoderKLWan, umT5 and VP9 clips.

In-process: the negative prompt in the text cache, the source adapter's resume, the config checks, the sampler.
Launched: 2-rank gloo ZeRO-3 jobs through launcher/run.py itself, from the cache and online.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.config import ConfigError, load_config, model_preset
from engine.data.cache import negative_path, read_negative
from engine.data.mp4 import probe
from engine.data.source import build_source
from engine.data.text import UMT5TextEncoder
from engine.data.vae import WanVAE
from engine.distill.samples import sample_name, world_sampler
from engine.models.checkpoint import load_weights, save_weights
from engine.models.wan import WanModel
from engine.worlds.source import SplitSource
from engine.worlds.wan import StreamSource, check_wan_config, wan_world
from launcher import precompute as precompute_cli
from tests.data.clips import write_clip
from tests.data.tiny_models import SENTENCES, save_text_encoder, save_vae

REPO = Path(__file__).resolve().parents[2]
NUM_CLIPS = 4
LATENT = (16, 3, 2, 2)  # (C, F, H, W) of 9 frames at 16x16; 81 x 480 x 832 gives (16, 21, 60, 104)
NEGATIVE = "blurry, static"

RUN_YAML = """
model: {{preset: tiny, in_dim: 16, out_dim: 16, checkpoint: {teacher}}}
text_encoder: {{kind: umt5, path: {models}, max_length: 8, negative_prompt: "{negative}"}}
vae: {{kind: wan, path: {models}, tiling: false}}
data: {{source: cache, manifest: {manifest}, cache_dir: {cache}, num_frames: 9, fps: 16.0, height: 16, width: 16,
        reader: pyav, num_workers: 1, prefetch: 1}}
diffusion: {{guidance_scale: 3.0}}
optim: {{lr: 1.0e-3, critic_lr: 1.0e-3, micro_batch_size: 1}}
train: {{max_steps: 2}}
checkpoint: {{every_steps: 1, keep_last: 2}}
logging: {{run_dir: {run_dir}, log_every: 1, progress_bar: false, tensorboard: false}}
deepspeed: {{param_persistence_threshold: 0}}
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny models, clips, a manifest, a run config and its precomputed cache (through launcher/precompute.py)."""
    root = tmp_path_factory.mktemp("wan")
    models = save_vae(save_text_encoder(root / "models"))
    torch.manual_seed(0)
    model_cfg = model_preset("tiny", in_dim=16, out_dim=16)  # text_dim 16 = the tiny umT5's d_model
    teacher = WanModel(model_cfg)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.1)
    save_weights(teacher, model_cfg, root / "teacher")
    rows = []
    for i in range(NUM_CLIPS):
        path = write_clip(root / "clips" / f"clip{i}", codec="vp9", num_frames=30, width=64, height=48, seed=i)
        rows.append({"path": path, "caption": SENTENCES[i]})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = root / "run.yaml"
    yaml.write_text(RUN_YAML.format(teacher=root / "teacher", models=models, negative=NEGATIVE, manifest=manifest,
                                    cache=root / "cache", run_dir=root / "run"))  # fmt: skip
    precompute_cli.main(["--config", str(yaml), "--no-progress", "--device", "cpu", "--batch-size", "2"])
    return SimpleNamespace(root=root, models=models, teacher=root / "teacher", yaml=yaml, cache=root / "cache")


def config(parts, *overrides, run_dir=None):
    return load_config(parts.yaml, [f"logging.run_dir={run_dir or parts.root / 'run'}", *overrides])


# ---------------------------------------------------------------------------------------------------------------------
# The negative prompt in the text cache
# ---------------------------------------------------------------------------------------------------------------------


def test_precompute_stores_the_negative_prompt_and_adds_it_to_an_old_cache(parts, tmp_path):
    emb, prompt, max_length = read_negative(parts.cache)
    encoder = UMT5TextEncoder.from_pretrained(parts.models, max_length=8, negative_prompt=NEGATIVE)
    ref, length = encoder.negative()
    assert prompt == NEGATIVE and max_length == 8 and emb.shape == (1, 8, 16)
    torch.testing.assert_close(emb, ref, rtol=1e-2, atol=1e-2)  # stored in bf16, like the prompt shards
    assert torch.count_nonzero(emb[0, int(length[0]) :]) == 0

    cache = tmp_path / "cache"  # an old cache: shards and indexes, no negative prompt
    shutil.copytree(parts.cache, cache)
    negative_path(cache).unlink()
    shards = sorted(cache.rglob("shard-*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    with pytest.raises(ConfigError, match="--kinds text"):
        check_wan_config(config(parts, f"data.cache_dir={cache}"))
    argv = ["--config", str(parts.yaml), "--no-progress", f"data.cache_dir={cache}", "--kinds", "text"]
    precompute_cli.main(argv)
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # only the negative prompt was encoded
    assert torch.equal(read_negative(cache)[0], emb)
    precompute_cli.main(["text_encoder.negative_prompt=jerky motion", *argv])  # a new negative prompt replaces it
    assert read_negative(cache)[1] == "jerky motion" and [p.stat().st_mtime_ns for p in shards] == stamps


# ---------------------------------------------------------------------------------------------------------------------
# The source adapter
# ---------------------------------------------------------------------------------------------------------------------


def _adapter(cfg, kind):
    codec = encoder = None
    if kind == "online":
        codec = WanVAE.from_config(cfg.vae)
        encoder = UMT5TextEncoder.from_config(cfg.text_encoder)
    d = cfg.data
    stream = build_source(d, batch_size=1, rank=1, world_size=2, seed=3, codec=codec, text_encoder=encoder)
    return StreamSource(stream, LATENT, "cpu", kind=kind)


@pytest.mark.parametrize("kind", ["cache", "online"])
def test_stream_source_resume_continues_the_same_stream(parts, kind):
    cfg = config(parts, f"data.source={kind}")
    first = _adapter(cfg, kind)
    head = [first.next_batch() for _ in range(3)]  # runs past the epoch: 2 clips per rank
    state = first.state_dict()
    tail = [first.next_batch() for _ in range(3)]
    first.close()
    resumed = _adapter(cfg, kind)
    resumed.next_batch()  # a running iterator (and its prefetch thread) must give way to the loaded position
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the trainer stores it; it must survive serialization
    for want, got in zip(tail, [resumed.next_batch() for _ in range(3)]):
        assert torch.equal(want.real_latents, got.real_latents) and torch.equal(want.prompts, got.prompts)
    resumed.close()
    b = head[0]
    assert b.real_latents.shape == (1, *LATENT) and b.prompts.shape == (1, 8, 16)
    assert b.prompts is b.real_context  # DMD prompts are the regression pair's captions
    assert not torch.equal(head[0].real_latents, head[1].real_latents)
    with pytest.raises(ValueError, match="data.source"):
        resumed.load_state_dict({**state, "kind": "cache" if kind == "online" else "online"})


# ---------------------------------------------------------------------------------------------------------------------
# Config checks (no model loaded, no process launched)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.cache_dir=/nonexistent/cache"], "data.cache_dir"),
        (["text_encoder.max_length=16"], "text_encoder.max_length"),
        (["text_encoder.negative_prompt=other"], "text_encoder.negative_prompt"),
        (["data.num_frames=13"], "data.num_frames"),
        (["data.height=32"], "data.height"),
        (["model.in_dim=4"], "model.in_dim"),
        (["vae.path=/nonexistent/vae"], "vae.path"),
        (["text_encoder.path=null", "logging.sample_prompts=[a cat]"], "logging.sample_prompts"),
        (["text_encoder.path=/nonexistent/umt5", "logging.sample_prompts=[a cat]"], "text_encoder.path"),
        (["data.source=online", "data.manifest=null"], "data.manifest"),
        (["data.source=online", "data.manifest=/nonexistent.jsonl"], "data.manifest"),
        (["data.source=online", "vae.path=null"], "vae.path"),
        (["data.source=online", "text_encoder.path=null"], "text_encoder.path"),
    ],
)
def test_config_errors_name_the_key(parts, overrides, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        check_wan_config(config(parts, *overrides))


def test_a_directory_without_caches_names_the_fix(parts, tmp_path):
    with pytest.raises(ConfigError, match="index.json not found: run `python -m launcher.precompute"):
        wan_world(config(parts, f"data.cache_dir={tmp_path}"), torch.device("cpu"), training=True)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _pad(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 16)


def _garble_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"\xff" * 12 + data[20:])


@pytest.mark.parametrize("damage", [Path.unlink, _truncate, _pad, _garble_header], ids=lambda f: f.__name__)
@pytest.mark.parametrize("shard", ["latents/shard-00000.safetensors", "text/shard-00000.safetensors",
                                   "text/negative.safetensors"])  # fmt: skip
def test_a_missing_or_damaged_shard_stops_the_start_naming_the_file(parts, tmp_path, damage, shard):
    """Every shard the index lists is checked (present, header readable, size right) before training starts: not
    found by a step that reads it hours in."""
    cache = tmp_path / "cache"
    shutil.copytree(parts.cache, cache)
    check_wan_config(config(parts, f"data.cache_dir={cache}"))  # intact
    damage(cache / shard)
    with pytest.raises(ConfigError, match=r"config key `data.cache_dir`: .*") as err:
        check_wan_config(config(parts, f"data.cache_dir={cache}"))
    assert str(cache / shard) in str(err.value) and len(str(err.value).splitlines()) == 1


def test_valid_configs_pass_the_checks(parts):
    check_wan_config(config(parts))
    check_wan_config(config(parts, "data.source=online"))
    check_wan_config(config(parts, "text_encoder.path=/nonexistent/umt5"))  # a cache run without prompts never loads it


# ---------------------------------------------------------------------------------------------------------------------
# The world in one process (rank 0 of 1)
# ---------------------------------------------------------------------------------------------------------------------


def test_cache_world_samples_the_first_captions_and_skips_without_a_vae(parts, tmp_path, caplog):
    cfg = config(parts, run_dir=tmp_path)
    world = wan_world(cfg, torch.device("cpu"), training=True)
    assert world.latent_shape == LATENT
    torch.testing.assert_close(world.uncond, read_negative(parts.cache)[0])
    model = WanModel(model_preset("tiny", in_dim=16, out_dim=16))
    load_weights(model, parts.teacher)
    world_sampler(cfg, world, torch.device("cpu"))(model, 7)
    videos = sorted((tmp_path / "samples").glob("*.mp4"))
    # the cache's first captions, in manifest order
    assert [v.name for v in videos] == [sample_name(7, 0, i, SENTENCES[i]) for i in range(NUM_CLIPS)]
    assert videos[0].name == "step0000007_seed0_00_a_red_ball_rolls_to_the_left_across_a_wooden_tab.mp4"
    assert probe(videos[0]) == {"codec": "h264", "frames": 9, "width": 16, "height": 16, "fps": 16.0}
    with caplog.at_level(logging.INFO, logger="vidistill.train"):
        cfg = config(parts, "vae.path=null", run_dir=tmp_path)
        world = wan_world(cfg, torch.device("cpu"), training=True)
    assert world_sampler(cfg, world, torch.device("cpu")) is None and "sample videos skipped" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Launched: 2 ranks, gloo, ZeRO-3, through launcher/run.py
# ---------------------------------------------------------------------------------------------------------------------


def launch(parts, run_dir, *overrides):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*torchrun, str(REPO / "launcher" / "run.py"), "--config", str(parts.yaml), f"logging.run_dir={run_dir}"]
    cmd += overrides
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def _check_export_trained(run_dir, teacher):
    export = run_dir / "export" / "transformer"
    student, ref = (WanModel(model_preset("tiny", in_dim=16, out_dim=16)) for _ in range(2))
    load_weights(student, export)  # a complete consolidated checkpoint: every key present, shapes right
    load_weights(ref, teacher)
    assert not torch.equal(student.head.head.weight, ref.head.head.weight)  # the generator was trained


@pytest.fixture(scope="module")
def cache_run(parts, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cache-run") / "run"
    return launch(parts, run_dir), run_dir


def logged_losses(run_dir, step):
    """The losses logged at ``step`` in train.log, as text (4 significant digits)."""
    lines = [ln for ln in (run_dir / "train.log").read_text().splitlines() if f" step {step} loss" in ln]
    assert len(lines) == 1, lines
    return lines[0].split(f" step {step} ", 1)[1].split(" mfu=")[0]


@pytest.mark.distributed
def test_distill_from_the_cache_through_the_launcher(parts, cache_run):
    proc, run_dir = cache_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished at step 2" in proc.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    _check_export_trained(run_dir, parts.teacher)
    videos = sorted((run_dir / "samples").glob("step0000002_*.mp4"))
    assert len(videos) == NUM_CLIPS
    assert all(probe(v)["frames"] == 9 and probe(v)["width"] == 16 for v in videos)


@pytest.mark.distributed
def test_distill_online_through_the_launcher(parts, tmp_path):
    run_dir = tmp_path / "run"
    prompts = ["a red ball rolls", "two dogs run"]
    proc = launch(parts, run_dir, "data.source=online", "train.max_steps=1", f"logging.sample_prompts={prompts}",
                  "logging.sample_seeds=[0,1]")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished at step 1" in proc.stdout
    names = sorted(p.name for p in (run_dir / "samples").glob("*.mp4"))
    assert names == sorted(f"step0000001_seed{s}_{i:02d}_{p.replace(' ', '_')}.mp4" for s in (0, 1)
                           for i, p in enumerate(prompts))  # fmt: skip
    assert (run_dir / "checkpoints" / "step_00000001").is_dir()
    _check_export_trained(run_dir, parts.teacher)


@pytest.mark.distributed
@pytest.mark.slow
def test_rerunning_the_command_resumes_the_same_stream(parts, cache_run, tmp_path):
    straight_proc, straight = cache_run
    assert straight_proc.returncode == 0, straight_proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    first = launch(parts, run_dir, "train.max_steps=1")
    assert first.returncode == 0 and "finished at step 1" in first.stdout, first.stderr[-3000:]
    again = launch(parts, run_dir)  # the same command with the recipe's 2 steps
    assert again.returncode == 0 and "finished at step 2" in again.stdout, again.stderr[-3000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    # step 2 reads the second batch of each rank's stream: the same losses as the uninterrupted run
    assert logged_losses(run_dir, 2) == logged_losses(straight, 2)
    assert logged_losses(run_dir, 1) == logged_losses(straight, 1)


# ---------------------------------------------------------------------------------------------------------------------
# DMD prompts of their own (distillation and fine-tuning in one stage): a prompt file or a prompt text cache
# ---------------------------------------------------------------------------------------------------------------------

BROAD = [SENTENCES[4], SENTENCES[5], "a dog sits on the table", "the cat runs on the sand", "a red cat at sunset"]


@pytest.fixture(scope="module")
def prompt_sets(parts):
    """A prompt file of captions the data does not have, and its text cache through launcher/precompute.py."""
    path = parts.root / "broad.txt"
    path.write_text("# broad prompts\n" + "\n".join(BROAD) + "\n")
    cache = parts.root / "broad-cache"
    argv = ["--config", str(parts.yaml), "--no-progress", "--device", "cpu", "--dmd-prompts", "--batch-size", "2",
            "--text-shard-size", "2", "data.dmd_prompts.source=cache", f"data.dmd_prompts.path={path}",
            f"data.dmd_prompts.cache_dir={cache}"]  # fmt: skip
    assert precompute_cli.main(argv) == 0
    return SimpleNamespace(path=path, cache=cache)


def dmd_overrides(prompt_sets, prompts):
    if prompts == "file":
        return ["data.dmd_prompts.source=file", f"data.dmd_prompts.path={prompt_sets.path}"]
    return ["data.dmd_prompts.source=cache", f"data.dmd_prompts.cache_dir={prompt_sets.cache}"]


@pytest.mark.parametrize("prompts", ["file", "cache"])
@pytest.mark.parametrize("kind", ["cache", "online"])
def test_dmd_prompts_come_from_the_prompt_set_and_pairs_from_the_data(parts, prompt_sets, kind, prompts, tmp_path):
    encoder = UMT5TextEncoder.from_pretrained(parts.models, max_length=8, negative_prompt=NEGATIVE)
    ref = {"broad": encoder.encode(BROAD)[0], "data": encoder.encode(SENTENCES[:NUM_CLIPS])[0]}
    tol = 2e-2  # text caches store bf16 (the data's in a cache run, the prompts' with source=cache)

    def which(row):  # the index of the one prompt of a set whose embedding this row is, else None
        hits = {s: [i for i, e in enumerate(ref[s]) if torch.allclose(row, e, rtol=tol, atol=tol)] for s in ref}
        assert len(hits["broad"]) + len(hits["data"]) == 1, hits
        return ("broad", hits["broad"][0]) if hits["broad"] else ("data", hits["data"][0])

    cfg = config(parts, f"data.source={kind}", *dmd_overrides(prompt_sets, prompts), run_dir=tmp_path)
    plain = wan_world(config(parts, f"data.source={kind}", run_dir=tmp_path), torch.device("cpu"), training=True)
    source = wan_world(cfg, torch.device("cpu"), training=True).source
    assert isinstance(source, SplitSource)
    batches = [source.next_batch() for _ in range(10)]  # two epochs of the 5 prompts, 2.5 of the 4 clips
    want = [plain.source.next_batch() for _ in range(10)]
    for b, w in zip(batches, want):  # the pairs are the data's, in the same order as without a prompt set
        assert torch.equal(b.real_latents, w.real_latents) and torch.equal(b.real_context, w.real_context)
        assert which(b.real_context[0])[0] == "data" and which(b.prompts[0])[0] == "broad"
    order = [which(b.prompts[0])[1] for b in batches]
    assert sorted(order[:5]) == sorted(order[5:]) == list(range(5))  # each epoch: every prompt once, shuffled
    assert order[:5] != order[5:]
    state = json.loads(json.dumps(source.state_dict()))
    tail = [source.next_batch() for _ in range(4)]
    source.close()
    resumed = wan_world(cfg, torch.device("cpu"), training=True).source
    resumed.next_batch()  # a running stream must give way to the loaded position
    resumed.load_state_dict(state)
    for w, g in zip(tail, [resumed.next_batch() for _ in range(4)]):
        assert torch.equal(w.prompts, g.prompts) and torch.equal(w.real_latents, g.real_latents)
    resumed.close()
    plain.source.close()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["text_encoder.path=null", "data.dmd_prompts.source=file", "data.dmd_prompts.path={path}"],
         "text_encoder.path"),
        (["data.dmd_prompts.source=file", "data.dmd_prompts.path=/nonexistent/prompts.txt"], "data.dmd_prompts.path"),
        (["optim.micro_batch_size=6", "data.dmd_prompts.source=file", "data.dmd_prompts.path={path}"],
         "data.dmd_prompts.path"),  # 5 prompts cannot fill a micro-batch of 6
        (["data.dmd_prompts.source=cache", "data.dmd_prompts.cache_dir={root}"], "data.dmd_prompts.cache_dir"),
        (["data.dmd_prompts.source=cache", "data.dmd_prompts.cache_dir=/nonexistent"], "data.dmd_prompts.cache_dir"),
        (["data.dmd_prompts.source=toy"], "data.dmd_prompts.source"),
        (["data.filter.kinds=[texture]"], "data.filter"),
    ],
)  # fmt: skip
def test_dmd_prompt_config_errors_name_the_key(parts, prompt_sets, overrides, key):
    subs = {"path": prompt_sets.path, "root": parts.root}
    with pytest.raises(ConfigError, match=f"`{key}`"):
        check_wan_config(config(parts, *(o.format(**subs) for o in overrides)))


def test_a_prompt_cache_of_another_max_length_is_refused(parts, prompt_sets, tmp_path):
    cache = tmp_path / "short"
    argv = ["--config", str(parts.yaml), "--no-progress", "--device", "cpu", "--dmd-prompts",
            "text_encoder.max_length=6", "data.dmd_prompts.source=cache", f"data.dmd_prompts.path={prompt_sets.path}",
            f"data.dmd_prompts.cache_dir={cache}"]  # fmt: skip
    assert precompute_cli.main(argv) == 0
    with pytest.raises(ConfigError, match="`data.dmd_prompts.cache_dir`: built with text_encoder.max_length=6"):
        check_wan_config(config(parts, "data.dmd_prompts.source=cache", f"data.dmd_prompts.cache_dir={cache}"))


@pytest.mark.distributed
def test_distill_with_a_prompt_file_through_the_launcher(parts, prompt_sets, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(parts, run_dir, "train.max_steps=1", *dmd_overrides(prompt_sets, "file"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished at step 1" in proc.stdout
    _check_export_trained(run_dir, parts.teacher)
