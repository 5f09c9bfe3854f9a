"""LoRA extraction and export: SVD of student - teacher per block linear, written in ComfyUI's and diffusers' layouts.
Loaded by diffusers' own Wan LoRA loader into a tiny WanTransformer3DModel holding the teacher, the LoRA reproduces
the merged student within fp32 tolerance (at full rank, the student itself); the reported error is the Eckart-Young
bound computed from singular values; bad ranks and architectures fail naming the key."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from safetensors import safe_open

from engine.config import model_preset
from engine.deploy import export_lora, student_tensors
from engine.models.checkpoint import is_block_linear, iter_tensors, save_weights
from engine.models.lora import read_lora
from engine.models.wan import WanModel
from launcher import export as export_cli
from tests.data.tiny_models import dit_inputs, random_dit

pytest.importorskip("peft")  # diffusers' LoRA loading runs on peft (in the dev extra)

CFG = model_preset("tiny", gradient_checkpointing=False, fused_kernels=False)  # dim 24, ffn 32, 2 blocks
FULL = 24  # min(dim, ffn_dim): every block linear is 24 x 24, 32 x 24 or 24 x 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A teacher and a 'distilled' student: every block linear's weight and bias moved, the rest as the teacher."""
    root = tmp_path_factory.mktemp("lora")
    teacher = random_dit(CFG, 0)
    student = {k: v.clone() for k, v in teacher.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for name, w in student.items():
        if is_block_linear(name.rsplit(".", 1)[0]):
            w += 0.05 * torch.randn(w.shape, generator=g)
    save_weights(teacher, CFG, root / "teacher")
    save_weights(student, CFG, root / "student")
    return root, teacher.state_dict(), student


def forward(model, x, t, ctx, diffusers: bool):
    with torch.no_grad():
        return model(x, t, ctx, return_dict=False)[0] if diffusers else model(x, t, ctx)


def ours_at(weights: dict[str, torch.Tensor]) -> WanModel:
    model = WanModel(CFG).eval()
    model.load_state_dict(weights)
    return model


def diffusers_with_lora(root, lora_file) -> WanTransformer3DModel:
    """The teacher in diffusers with the LoRA file loaded the way a WanPipeline does (lora_state_dict converts the
    ComfyUI layout; load_lora_adapter puts peft layers on the transformer)."""
    model = WanTransformer3DModel.from_pretrained(root / "teacher").eval()
    state = WanPipeline.lora_state_dict(str(lora_file))
    model.load_lora_adapter(state, prefix="transformer", adapter_name="student")
    return model.eval()


@pytest.mark.parametrize("layout", ["comfy", "diffusers"])
def test_full_rank_lora_reproduces_the_student_in_diffusers(tmp_path, pair, layout):
    root, teacher, student = pair
    file = tmp_path / f"student-{layout}.safetensors"
    report = export_lora(root / "student", root / "teacher", file, FULL, layout=layout, dtype=torch.float32)
    assert report["max_rel_error"] < 1e-6 and report["not_in_lora"] == {}  # every change is carried
    assert len(report["bias_changes"]) == 20
    x, t, ctx = dit_inputs()
    expected = forward(ours_at(student), x, t, ctx, False)
    got = forward(diffusers_with_lora(root, file), x, t, ctx, True)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    teacher_out = forward(ours_at(teacher), x, t, ctx, False)
    assert (teacher_out - expected).abs().max() > 1e-2  # the student does differ from the teacher


def test_low_rank_lora_matches_the_merged_student_and_reports_its_error(tmp_path, pair):
    root, teacher, student = pair
    rank = 4
    file = tmp_path / "r4.safetensors"
    report = export_lora(root / "student", root / "teacher", file, rank, layout="comfy", dtype=torch.float32)
    for layer, stats in report["layers"].items():  # Eckart-Young: the error is the discarded singular values
        delta = (student[layer + ".weight"] - teacher[layer + ".weight"]).double()
        s = torch.linalg.svdvals(delta)
        assert stats["rel_error"] == pytest.approx((s[rank:].square().sum().sqrt() / s.norm()).item(), rel=1e-6)
        assert stats["energy_kept"] == pytest.approx((s[:rank].square().sum() / s.square().sum()).item(), rel=1e-6)
    assert 0.3 < report["mean_rel_error"] < 1.0  # a random full-rank change is not captured by rank 4
    merged = dict(student_tensors(root / "teacher", lora=file)[1])  # our merge: W + up @ down, b + diff_b
    x, t, ctx = dit_inputs()
    expected = forward(ours_at(merged), x, t, ctx, False)
    got = forward(diffusers_with_lora(root, file), x, t, ctx, True)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    student_out = forward(ours_at(student), x, t, ctx, False)
    assert (student_out - expected).abs().max() > 1e-3  # rank 4 is an approximation, and the test can tell


def test_comfy_layout_keys(tmp_path, pair):
    """ComfyUI's LoRA loader (comfy/lora.py, model_lora_keys_unet's generic format) maps ``diffusion_model.<key>`` to
    the model key ``diffusion_model.<key>.weight`` (ComfyUI's WanModel uses the official names) and reads
    ``<x>.lora_up.weight``, ``<x>.lora_down.weight``, ``<x>.alpha`` and ``<x>.diff_b``."""
    root, teacher, _ = pair
    file = tmp_path / "comfy.safetensors"
    export_lora(root / "student", root / "teacher", file, 3, layout="comfy", dtype=torch.bfloat16)
    comfy_model_keys = {"diffusion_model." + k for k in teacher}
    pattern = re.compile(r"(diffusion_model\.blocks\.\d+\.(?:self_attn|cross_attn|ffn)\.\w+)\.(lora_up\.weight|"
                         r"lora_down\.weight|alpha|diff_b)\Z")  # fmt: skip
    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            m = pattern.match(key)
            assert m, key
            base, part = m.groups()
            out_dim, in_dim = teacher[base.removeprefix("diffusion_model.") + ".weight"].shape
            assert base + ".weight" in comfy_model_keys
            t = f.get_tensor(key)
            want = {"lora_up.weight": (out_dim, 3), "lora_down.weight": (3, in_dim), "alpha": (), "diff_b": (out_dim,)}
            assert tuple(t.shape) == want[part], key
            if part == "alpha":
                assert t.item() == 3.0
    assert len(keys) == 20 * 4  # 20 block linears x (up, down, alpha, diff_b)


def test_cli_and_bad_input(tmp_path, pair, capsys):
    root, _, student = pair
    file = tmp_path / "cli.safetensors"
    args = ["--checkpoint", str(root / "student"), "--teacher", str(root / "teacher"), "--lora", str(file)]
    assert export_cli.main([*args, "--rank", "8", "--lora-format", "diffusers"]) == 0
    assert '"mean_rel_error"' in capsys.readouterr().out and file.with_suffix(".report.json").is_file()
    assert export_cli.main([*args, "--rank", "25"]) == 2
    err = capsys.readouterr().err
    assert "--rank 25: layer blocks.0.self_attn.q.weight is 24 x 24; the rank must be at most 24" in err
    other = model_preset("tiny", num_layers=3, gradient_checkpointing=False, fused_kernels=False)
    torch.manual_seed(3)
    save_weights(WanModel(other), other, tmp_path / "three")
    assert export_cli.main([*args[:2], "--teacher", str(tmp_path / "three"), "--lora", str(file), "--rank", "4"]) == 2
    assert "--teacher" in (err := capsys.readouterr().err) and "model.num_layers is 3, the student's is 2" in err

    # merging: at full rank, the teacher plus the LoRA is the student; a LoRA of another architecture is refused
    full = tmp_path / "full.safetensors"
    export_lora(root / "student", root / "teacher", full, FULL, dtype=torch.float32)
    out = tmp_path / "merged.safetensors"
    merge = ["--checkpoint", str(root / "teacher"), "--merge-lora", str(full), "--single-file", str(out)]
    assert export_cli.main([*merge, "--dtype", "fp32"]) == 0
    merged = dict(iter_tensors(out))
    assert all((merged[k] - v).abs().max() <= 1e-6 for k, v in student.items())
    wide = model_preset("tiny", dim=32, num_heads=2, gradient_checkpointing=False, fused_kernels=False)
    torch.manual_seed(4)
    save_weights(WanModel(wide), wide, tmp_path / "wide")
    merge[1] = str(tmp_path / "wide")
    assert export_cli.main(merge) == 2
    assert "LoRA layer blocks.0.cross_attn.k has up (24, 24) and down (24, 24); the model's weight is (32, 32)" in (
        capsys.readouterr().err
    )
    assert export_cli.main(["--checkpoint", str(tmp_path / "three"), "--teacher", str(tmp_path / "three"),
                            "--lora", str(tmp_path / "three.safetensors"), "--rank", "2"]) == 0  # fmt: skip
    merge[1], merge[3] = str(root / "teacher"), str(tmp_path / "three.safetensors")  # 3 blocks onto 2
    assert export_cli.main(merge) == 2
    assert "LoRA layer blocks.2.cross_attn.k is not a linear layer of this model (2 blocks)" in capsys.readouterr().err
    assert read_lora(full).keys() == {k.rsplit(".", 1)[0] for k in student if k.endswith(".weight")
                                      and is_block_linear(k.rsplit(".", 1)[0])}  # fmt: skip
