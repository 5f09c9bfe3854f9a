"""The memory planner (engine/plan.py, launcher/plan.py) against independent references: DeepSpeed's own parameter
count and ZeRO-3 estimator, autograd's saved tensors, the DMD method's FLOP counter, and peak memory measured on 2
gloo ranks (benchmarks/memory_plan_check.py)."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params

from engine.config import LoraConfig, load_config, model_preset
from engine.models.adapters import add_adapters
from engine.models.rope import rope_tables
from engine.models.wan import WanModel
from engine.plan import (
    Layout,
    block_saved_bytes,
    count_adapter_params,
    count_params,
    cycle_forwards,
    fit,
    plan,
    role_states,
)
from launcher import plan as plan_cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"1.3b": ROOT / "configs/wan2.1-1.3b-24gpu.yaml", "14b": ROOT / "configs/wan2.1-14b-24gpu.yaml"}


@pytest.mark.parametrize("preset", ["tiny", "toy"])
def test_parameter_count_matches_deepspeed(preset):
    cfg = model_preset(preset)
    total, largest = model_to_params(WanModel(cfg))  # DeepSpeed's walk of a real model
    pc = count_params(cfg, 100_000)
    assert (pc.total, pc.largest_layer) == (total, largest)
    small = sum(p.numel() for p in WanModel(cfg).parameters() if p.numel() < 100_000)
    assert pc.persistent == small


@pytest.mark.parametrize("preset, rank", [("tiny", 4), ("toy", 16)])
def test_lora_adapter_count_matches_the_adapted_model(preset, rank):
    """The planner's adapter count (no peft, no model) against peft's layers on a real model: the trained parameters,
    those under the persistence threshold, the largest trained module (what ZeRO-3 gathers a gradient of)."""
    cfg = model_preset(preset, lora=LoraConfig(rank=rank))
    model = WanModel(cfg)
    add_adapters(model, cfg, seed=0)
    trained = [p for p in model.parameters() if p.requires_grad]
    pc = count_adapter_params(cfg, 1000)
    assert pc.total == sum(p.numel() for p in trained)
    assert pc.persistent == sum(p.numel() for p in trained if p.numel() < 1000)
    assert pc.largest_layer == max(
        sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad) for m in model.modules()
    )
    assert count_adapter_params(model_preset(preset), 1000) is None  # rank 0: the full weights train


def test_a_lora_plan_keeps_the_frozen_base_and_the_adapters_optimizer_states_only():
    """model.lora on the 14B recipe (optimizer on the GPU): the base weights stay (same partition per role), the
    gradient partition and the fp32 master + Adam are the adapters' (12 B per adapter parameter over the ranks), the
    step is faster (no weight gradients of the frozen linears)."""
    on_device = ["deepspeed.offload_optimizer=false"]
    full = plan(load_config(RECIPES["14b"], on_device), Layout(gpus=24))
    lora = plan(load_config(RECIPES["14b"], [*on_device, "model.lora.rank=64"]), Layout(gpus=24))
    rows_full, rows_lora = ({n: v for n, v, _ in p.rows} for p in (full, lora))
    adapters = count_adapter_params(lora.cfg.model, lora.cfg.deepspeed.param_persistence_threshold)
    assert adapters.total == 40 * 64 * (8 * 2 * 5120 + 2 * (5120 + 13824))  # 10 linears per block, r (in + out) each
    part = math.ceil(adapters.total / 24)
    for role in ("generator", "critic"):
        assert rows_lora[f"{role} fp32 master + Adam m, v"] == 12 * part
        assert rows_lora[f"{role} grad partition"] == 2 * part
        assert rows_lora[f"{role} weights"] == pytest.approx(rows_full[f"{role} weights"] + 2 * part, rel=1e-6)
    assert rows_lora["teacher weights"] == rows_full["teacher weights"]
    # 2 roles x (gradient + master + Adam: 14 B per trained parameter) less the adapters' own weights (2 B each)
    saved = 2 * (14 * (math.ceil(full.params.total / 24) - part) - 2 * part)
    assert full.phases["resident"] - lora.phases["resident"] == pytest.approx(saved, rel=0.01)
    assert lora.timing["step_s"] < full.timing["step_s"]


@pytest.mark.parametrize("preset", ["1.3b", "14b"])
@pytest.mark.parametrize("gpus", [8, 24, 64])
@pytest.mark.parametrize("offload", [(False, False), (True, False), (True, True)])
def test_model_states_within_5_percent_of_deepspeed_estimator(preset, gpus, offload):
    """DeepSpeed's estimator counts per GPU 18 B/param (bf16 weights, fp32 master, fp32 gradient, Adam m and v) over
    the GPUs plus the largest layer's gathered bf16 weights and gradient (4 B/param); offloading the optimizer leaves
    the weights and the layer, offloading the parameters too leaves the layer. The planner's matching parts: the
    weight partition (persistent tensors whole), master + Adam, the step's fp32 gradient, the gathered layer and its
    gradient. (The planner also counts the bf16 gradient partition and Adam's denominator, which the estimator
    leaves out.)"""
    cfg = load_config(RECIPES[preset])
    opt, param = offload
    pc = count_params(cfg.model, 0)  # the estimator has no persistence threshold: every tensor partitioned
    _, gpu_mem, _ = estimate_zero3_model_states_mem_needs(
        total_params=pc.total,
        largest_layer_params=pc.largest_layer,
        num_gpus_per_node=8,
        num_nodes=gpus // 8,
        cpu_offload=opt,
        cpu_offload_params=param,
        zero_init=True,
    )
    st = role_states(pc, gpus, 2, opt, param, sub_group_size=pc.total)
    ours = st["weights"] + st["master_adam"] + st["step_fp32_grad"] + st["layer_gathered"] + st["layer_grad"]
    assert ours == pytest.approx(gpu_mem, rel=0.05)


@pytest.mark.parametrize("rank", [0, 16], ids=["full", "lora16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", [(5, 4, 4), (9, 8, 8)])
def test_block_activations_match_autograd_saved_tensors(dtype, grid, rank):
    """The per-block formula against the bytes autograd actually saves (a saved-tensors hook, storages counted once,
    parameters excluded) on the reference path; with LoRA adapters (model.lora) on a frozen base too."""
    cfg = dataclasses.replace(model_preset("toy"), fused_kernels=False, lora=LoraConfig(rank=rank))
    model = WanModel(cfg).to(dtype)
    if rank:
        add_adapters(model, cfg, seed=0, dtype=dtype)
    block, n, text_len = model.blocks[0], math.prod(grid), 6
    x = torch.randn(1, n, cfg.dim, dtype=dtype, requires_grad=True)
    e0 = torch.randn(1, 6, cfg.dim)
    ctx = torch.randn(1, text_len, cfg.dim, dtype=dtype, requires_grad=True)
    cos, sin = rope_tables(grid, cfg.head_dim, max_seq_len=cfg.rope_max_seq_len, device="cpu")
    skip = {p.untyped_storage().data_ptr() for p in block.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in (ctx, e0, cos, sin)}
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, e0, ctx, cos, sin, model.kernel_ops, "sdpa")
    saved = sum(v for k, v in seen.items() if k not in skip)
    if dtype == torch.float32 and x.untyped_storage().data_ptr() not in seen:
        saved += x.numel() * 4  # the fp32 adaLN keeps its input: the block input, held anyway
    assert block_saved_bytes(cfg, n, text_len, dtype.itemsize) == pytest.approx(saved, rel=0.03)


def test_cycle_flops_match_the_methods_counter():
    """The planner's forward-equivalents of one 5:1 cycle equal what DMDMethod counts for the same updates (its
    `_count` calls, driven by a stub of the roles), recompute excluded (model FLOPs)."""
    from engine.distill.method import DMDMethod

    cfg = load_config(RECIPES["1.3b"], ["model.gradient_checkpointing=false"])
    per_sample = cycle_forwards(cfg)
    k = len(cfg.diffusion.student_timesteps)
    counted = []
    for exit_step in range(k):  # the rollout exit is uniform over the K steps: average the counter over all of them
        method = DMDMethod.__new__(DMDMethod)
        method.cfg, method.flops_per_forward, method.flops = cfg, 1.0, 0.0
        method.sigmas = torch.zeros(k)
        for step in range(cfg.method.critic_per_generator):
            if step == 0:  # generator update: rollout, trained forward over both branches, teacher CFG + critic
                method._count(1, exit_step)
                method._count(2, 3)
                method._count(1, 2 + 1)
            method._count(1, exit_step)
            method._count(1, 1 + 3)
        counted.append(method.pop_flops())
    assert sum(per_sample.values()) == pytest.approx(sum(counted) / k)


def test_the_14b_recipe_plan_and_its_fix_are_consistent():
    cfg = load_config(RECIPES["14b"])
    lay = Layout(gpus=24)
    p = plan(cfg, lay)
    assert p.peak == pytest.approx(p.phases["resident"] + p.phases[p.phases["worst"]])
    more = plan(load_config(RECIPES["14b"], ["optim.global_batch_size=null"]), Layout(gpus=64))
    assert more.phases["resident"] < p.phases["resident"]  # more GPUs: smaller partitions
    if not p.fits:
        found = fit(cfg, lay)
        assert found is not None and found[0].fits and found[0].peak <= found[0].usable


def test_offload_and_checkpointing_lower_the_peak():
    on_device = ["optim.global_batch_size=null", "deepspeed.offload_optimizer=false"]
    base = load_config(RECIPES["14b"], [*on_device, "model.gradient_checkpointing=false"])
    lay = Layout(gpus=24)
    ckpt = load_config(RECIPES["14b"], on_device)
    off = load_config(RECIPES["14b"], ["optim.global_batch_size=null", "deepspeed.offload_optimizer=true"])
    assert plan(ckpt, lay).peak < plan(base, lay).peak
    assert plan(off, lay).phases["resident"] < plan(ckpt, lay).phases["resident"]
    sp = plan(ckpt, dataclasses.replace(lay, sp=4))
    assert sp.phases["generator backward"] < plan(ckpt, lay).phases["generator backward"]
    # the trainer's ZeRO-3 partitions over every GPU with sequence parallelism too (engine/distill/roles.py)
    states = lambda p: {k: v for k, v, _ in p.rows if "weights" in k or "Adam" in k or "grad partition" in k}  # noqa: E731
    assert states(sp) == states(plan(ckpt, lay))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--gpus", "24", "--sp", "7"], "option `--sp` (parallel.sequence_parallel): 7 does not divide the 24 GPUs"),
        (["--gpus", "24", "--sp", "3"], "does not divide model.num_heads=40"),
        (["--gpus", "0"], "option `--gpus`"),
        (["--mfu", "1.5"], "option `--mfu`"),
    ],
)
def test_impossible_layouts_name_the_option_and_the_values_that_work(args, needle, capsys):
    assert plan_cli.main(["--config", str(RECIPES["14b"]), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    if "--sp" in args:
        assert "values that divide both: [1, 2, 4, 8]" in err  # divisors of 24 that divide 40 heads


def test_cli_prints_the_plan_and_the_keys_that_make_it_fit(capsys):
    rc = plan_cli.main(["--config", str(RECIPES["14b"]), "--gpus", "24"])
    out = capsys.readouterr().out
    assert "teacher weights" in out and "tokens/s" in out and "allocator headroom" in out
    p = plan(load_config(RECIPES["14b"]), Layout(gpus=24))
    assert ("fits: yes" in out) == p.fits
    if not p.fits:
        assert rc == 0 and "fits with: " in out


@pytest.mark.distributed
def test_planner_matches_measured_peak_memory_on_two_ranks():
    """One tiny config measured on 2 gloo ranks (ZeRO-3, fp32, one full 5:1 cycle): the model-state tensors DeepSpeed
    holds equal the planner's resident figure within 5%; the peak and the activations within 15%."""
    from benchmarks.memory_plan_check import compare, run_config

    with tempfile.TemporaryDirectory() as tmp:
        row = run_config("toy-320-nockpt", Path(tmp))
    ratio = compare(row)
    assert ratio["resident"] == pytest.approx(1.0, abs=0.05)
    assert ratio["peak"] == pytest.approx(1.0, abs=0.15)
    assert ratio["activations"] == pytest.approx(1.0, abs=0.15)


@pytest.mark.distributed
def test_planner_matches_the_measured_model_states_of_a_lora_run_on_two_ranks():
    """model.lora (rank 16) measured on 2 gloo ranks: the fp32 master, Adam and gradient partitions DeepSpeed holds
    are the adapters' and equal the planner's rows; the resident model states within 5%, the peak within 15%."""
    from benchmarks.memory_plan_check import compare, run_config

    with tempfile.TemporaryDirectory() as tmp:
        row = run_config("toy-320-lora16-nockpt", Path(tmp))
    cfg = load_config(ROOT / "configs" / "toy.yaml", ["model.lora.rank=16"]).model
    part = math.ceil(count_adapter_params(cfg, 0).total / 2) * 4  # fp32 bytes of a rank's adapter partition
    planned = row["planned"]["rows"]
    for census in (r["census"] for r in row["measured"]):
        for role in ("generator", "critic"):
            assert census[f"{role}.fp32_master"] == part and census[f"{role}.adam"] == 2 * part
            assert census[f"{role}.grad_partition"] == part == planned[f"{role} grad partition"]
            assert planned[f"{role} fp32 master + Adam m, v"] == 3 * part
    ratio = compare(row)
    assert ratio["resident"] == pytest.approx(1.0, abs=0.05)
    assert ratio["peak"] == pytest.approx(1.0, abs=0.15)


def test_table_rows_fit_after_the_change(capsys):
    assert plan_cli.main(["--table"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 480p", 0)
            or line.startswith("| 720p")]  # fmt: skip
    assert len(rows) == 2 * 2 * 4  # two models, two clip sizes, four GPU counts
    usable = Layout(gpus=8).gpu_memory_gb - Layout(gpus=8).context_gb
    for cells in rows:
        after = cells[6]
        assert after == "-" or float(after) <= usable * 0.9, cells
        if cells[4] == "yes":
            assert cells[5] == "-" and cells[3] == after
