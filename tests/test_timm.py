"""timm models (``--model timm/NAME``): construction, ``--model-kwargs``, what is masked on a ViT,
ERK and FLOPs on transformer shapes (docs/algorithms.md §1.4, §8.4), and itop-inspect on ViT-B/16."""

from __future__ import annotations

import json

import re

import pytest
import torch
from torch import nn

import models
from itop_dist import maskable_parameters
from itop_dist.flops import ACTIVATION_PRODUCTS, layer_flops, sparse_flops
from itop_dist.topology import erk_densities, exact_count
from launcher.config import ConfigError, parse_config
from launcher.plan import inspect_model
from launcher.plan import main as inspect_main
from launcher.train import main as train_main

DIGITS = (1, 8, 8)
TINY_VIT = {"patch_size": 2, "depth": 1}  # vit_tiny's width 192, 3 heads, on 8x8 digits


# family -> (timm name, kwargs, FSDP unit class, units). Tiny configurations (few blocks, narrow)
# to keep the suite fast; 32x32 inputs, the least that ConvNeXt and ResNet's 32x downsampling take.
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {"patch_size": 4, "depth": 2}, "Block", 2),
    "deit": ("deit_tiny_patch16_224", {"patch_size": 8, "depth": 3}, "Block", 3),
    "convnext": ("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)}, "ConvNeXtStage", 4),
    "resnet": ("resnet10t", {}, "Sequential", 4),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_timm_families_build_for_the_data_shape_and_train(family: str) -> None:
    name, kwargs, unit_class, n_units = FAMILIES[family]
    torch.manual_seed(0)
    model = models.create_model(f"timm/{name}", "digits", num_classes=10, input_shape=(1, 32, 32), **kwargs)
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1  # the data's channels, not timm's default 3
    units = models.model_fsdp_units(f"timm/{name}", "digits")(model)
    assert [type(u).__name__ for u in units] == [unit_class] * n_units


def test_timm_models_fit_every_dataset_and_kwargs_win() -> None:
    assert models.model_datasets("timm/vit_tiny_patch16_224") == ()
    model = models.create_model("timm/vit_tiny_patch16_224", "imagenet", num_classes=7, input_shape=(3, 32, 32),
                                img_size=16, patch_size=4, depth=1, dynamic_img_size=True)
    assert model.patch_embed.img_size == (16, 16) and model.patch_embed.num_patches == 16
    assert model.head.out_features == 7


@pytest.mark.parametrize("kwargs, says", [
    ("", r"does not take the data's 1x8x8 images \(Calculated padded input size"),  # patch 16 > 8
    ("img_size=32 patch_size=4", r"does not take the data's 1x8x8 images \(Input height \(8\) doesn't match model \(32\)"),
    ("img_size=8 patch_size=2 in_chans=3", r"in_chans=3\) does not take the data's 1x8x8 images \("),  # 3 channels vs 1
    ("img_size=8 patch_size=2 bogus_kw=3", r"timm cannot build vit_tiny_patch16_224 with --model-kwargs img_size=8 "
                                           r"patch_size=2 bogus_kw=3: .*unexpected keyword argument 'bogus_kw'"),
    ("img_size=8 patch_size=two", r"with --model-kwargs img_size=8 patch_size='two': unsupported operand"),
    ("img_size=8 patch_size=2 patch_size=4", r"--model-kwargs: patch_size is given twice; keep one patch_size=\.\.\."),
    ("num_classes=5", r"--model-kwargs: num_classes is set by itop_dist .*remove num_classes=5"),
    ("pretrained=True", r"--model-kwargs: pretrained is set by itop_dist .*remove pretrained=True"),
])
def test_model_kwargs_timm_cannot_use_are_one_line_exit_2_before_a_run_folder(kwargs, says, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["--sparse", "--data", "digits", "--density", "0.2", "--epochs", "1", "--no-wandb", "--device", "cpu",
            "--model", "timm/vit_tiny_patch16_224", "--output-dir", str(out)] + (["--model-kwargs", *kwargs.split()] if kwargs else [])
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("itop-train: error: --model") and re.search(says, err), err
    assert not out.exists()
    assert inspect_main(["--model", "timm/vit_tiny_patch16_224", "--data", "digits"]
                        + (["--model-kwargs", *kwargs.split()] if kwargs else [])) == 2
    assert re.search(says, capsys.readouterr().err)


def test_unknown_timm_name_names_the_closest_in_one_line_exit_2(capsys) -> None:
    with pytest.raises(ValueError, match=r"did you mean timm/vit_tiny_patch16_224"):
        models.create_model("timm/vit_tiny_patch16_22", "digits", num_classes=10)
    assert train_main(["--model", "timm/vit_tinny_patch16_224", "--data", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("itop-train: error: Unknown timm model 'vit_tinny_patch16_224'")
    assert "timm/vit_tiny_patch16_224" in err
    assert inspect_main(["--model", "timm/vit_tinny_patch16_224", "--data", "digits"]) == 2


def test_model_kwargs_parsed_as_timms_train_py() -> None:
    cfg = parse_config(["--model", "timm/vit_tiny_patch16_224", "--model-kwargs", "img_size=8", "patch_size=2",
                        "in_chans=1", "act_layer=gelu", "mlp_ratio=2.5", "--data", "digits", "--optimizer", "adamw"])
    assert cfg.model.kwargs == ("img_size=8", "patch_size=2", "in_chans=1", "act_layer=gelu", "mlp_ratio=2.5")
    assert cfg.data.name == "digits"  # the values end at the next flag
    assert cfg.optim.name == "adamw"
    assert models.parse_model_kwargs(cfg.model.kwargs) == {
        "img_size": 8, "patch_size": 2, "in_chans": 1, "act_layer": "gelu", "mlp_ratio": 2.5}
    assert models.parse_model_kwargs(["img_size=(8, 8)", "name=a=b"]) == {"img_size": (8, 8), "name": "a=b"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "timm/vit_tiny_patch16_224", "--model-kwargs", "patch_size"],
     "--model-kwargs: 'patch_size' is not key=value; write e.g. img_size=8"),
    (["--model", "digits-mlp", "--model-kwargs", "depth=1"],
     "--model-kwargs: only timm models take keyword arguments; use --model timm/NAME or drop --model-kwargs"),
    (["--optimizer", "lamb"], "--optimizer: 'lamb': choose sgd, adam or adamw"),
])
def test_bad_model_flags_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert str(err.value) == message


def test_adamw_decouples_weight_decay_and_exempts_norms() -> None:
    from launcher.trainer import _build_optimizer

    cfg = parse_config(["--optimizer", "adamw", "--lr", "0.001", "--wd", "0.05", "--bn-weight-decay", "false"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    twin = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    twin.load_state_dict(model.state_dict())
    opt = _build_optimizer(model, cfg)
    assert opt.defaults["decoupled_weight_decay"] is True
    assert [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [(2, 0.05), (2, 0.0)]
    reference = torch.optim.AdamW([{"params": twin[0].parameters()},
                                   {"params": twin[1].parameters(), "weight_decay": 0.0}], lr=0.001, weight_decay=0.05)
    x = torch.randn(5, 3)
    for net, o in ((model, opt), (twin, reference)):
        for _ in range(3):
            o.zero_grad()
            net(x).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)  # torch's AdamW, step for step


# --------------------------------------------------------------------------------------------
# What is masked on a ViT, and ERK on its shapes


def tiny_vit() -> nn.Module:
    return models.create_model("timm/vit_tiny_patch16_224", "digits", num_classes=10, input_shape=DIGITS,
                               **TINY_VIT)


def test_vit_masks_patch_embedding_qkv_proj_mlp_and_head_only() -> None:
    model = models.create_model("timm/vit_tiny_patch16_224", "digits", num_classes=10, input_shape=DIGITS,
                                patch_size=2, depth=2)
    block = ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
    assert list(maskable_parameters(model)) == [
        "patch_embed.proj.weight", *(f"blocks.{i}.{n}" for i in range(2) for n in block), "head.weight"]
    dense = {n for n, _ in model.named_parameters()} - set(maskable_parameters(model))
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
            "head.bias"} <= dense


def test_erk_on_vit_shapes_by_hand() -> None:
    """RigL's ERK on Linear (out, in) shapes: raw = (out + in) / (out * in), so raw * numel is
    out + in. At 0.1 the patch embedding (192x1x2x2: raw 197/768) and the head (10x192: raw
    202/1920) would exceed 1 and are dense; the rest share eps = budget / sum of their dims."""
    shapes = {n: tuple(p.shape) for n, p in maskable_parameters(tiny_vit()).items()}
    assert shapes == {"patch_embed.proj.weight": (192, 1, 2, 2), "blocks.0.attn.qkv.weight": (576, 192),
                      "blocks.0.attn.proj.weight": (192, 192), "blocks.0.mlp.fc1.weight": (768, 192),
                      "blocks.0.mlp.fc2.weight": (192, 768), "head.weight": (10, 192)}
    total, dense = 445_056, 768 + 1_920
    eps = (0.1 * (total - dense) - 0.9 * dense) / (768 + 384 + 960 + 960)  # 41,817.6 / 3,072 = 13.6125
    densities = erk_densities(shapes, 0.1)
    assert densities == pytest.approx({
        "patch_embed.proj.weight": 1.0, "head.weight": 1.0, "blocks.0.attn.qkv.weight": eps * 768 / 110_592,
        "blocks.0.attn.proj.weight": eps * 384 / 36_864, "blocks.0.mlp.fc1.weight": eps * 960 / 147_456,
        "blocks.0.mlp.fc2.weight": eps * 960 / 147_456}, rel=1e-12)
    counts = {n: exact_count(d, torch.Size(shapes[n]).numel()) for n, d in densities.items()}
    assert counts == {"patch_embed.proj.weight": 768, "head.weight": 1_920, "blocks.0.attn.qkv.weight": 10_454,
                      "blocks.0.attn.proj.weight": 5_227, "blocks.0.mlp.fc1.weight": 13_068,
                      "blocks.0.mlp.fc2.weight": 13_068}
    assert sum(counts.values()) == 44_505  # round(0.1 * 445,056)


def test_inspect_takes_model_kwargs_as_timms_train_py(capsys) -> None:
    """The same 1-block ViT through itop-inspect's --model-kwargs (timm's ParseKwargs action)."""
    assert inspect_main(["--model", "timm/vit_tiny_patch16_224", "--model-kwargs", "patch_size=2", "depth=1",
                         "--data", "digits", "--density", "0.1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {la["name"]: la["nonzeros"] for la in plan["layers"]} == {
        "patch_embed.proj.weight": 768, "blocks.0.attn.qkv.weight": 10_454, "blocks.0.attn.proj.weight": 5_227,
        "blocks.0.mlp.fc1.weight": 13_068, "blocks.0.mlp.fc2.weight": 13_068, "head.weight": 1_920}
    assert plan["flops"]["activation_products"] == 2 * 2 * 17 ** 2 * 192


# --------------------------------------------------------------------------------------------
# FLOPs on transformer shapes


def test_tiny_vit_flops_by_hand() -> None:
    """N = 16 patches + cls = 17 tokens of width 192; per block 2 N^2 D MACs of attention."""
    model = tiny_vit()
    flops = layer_flops(model, torch.randn(2, *DIGITS))  # on CPU: its own attention kernel
    with torch.device("meta"):
        assert layer_flops(model.to("meta"), torch.empty(1, *DIGITS)) == flops
    n, d = 17, 192
    assert flops == {"patch_embed.proj.weight": 2 * 4 * 192 * 16, "blocks.0.attn.qkv.weight": 2 * n * d * 3 * d,
                     "blocks.0.attn.proj.weight": 2 * n * d * d, "blocks.0.mlp.fc1.weight": 2 * n * d * 4 * d,
                     "blocks.0.mlp.fc2.weight": 2 * n * 4 * d * d, "head.weight": 2 * 192 * 10,
                     ACTIVATION_PRODUCTS: 2 * (2 * n * n * d)}
    # the attention products stay dense at any density
    assert sparse_flops(flops, dict.fromkeys(set(flops) - {ACTIVATION_PRODUCTS}, 0.0)) == 4 * n * n * d


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "vit_small_patch16_224"])
def test_vit_small_flops_match_timms_published_gmacs(name: str) -> None:
    """timm's model card of deit_small_patch16_224.fb_in1k gives 4.6 GMACs at 224x224 (one
    decimal). Ours, by hand: 196 patches + cls = 197 tokens, width 384, 12 blocks: per block
    12 N D^2 MACs of qkv, proj and MLP plus 2 N^2 D of attention; patch embedding
    196 x 768 x 384, head 384 x 1000. That is 4.599 GMACs: timm's figure to its decimal
    (0.05 GMACs = 1%), which also covers what timm's profiler may count and we do not (layer
    norm, GELU, softmax, biases: under 0.5% here)."""
    with torch.device("meta"):
        model = models.create_model(f"timm/{name}", "imagenet", num_classes=1000, input_shape=(3, 224, 224))
        flops = layer_flops(model, torch.empty(1, 3, 224, 224))
    n, d = 197, 384
    macs = 12 * (12 * n * d * d + 2 * n * n * d) + 196 * 768 * 384 + 384 * 1000
    assert sum(flops.values()) == 2 * macs == 9_197_764_608
    assert flops[ACTIVATION_PRODUCTS] == 2 * 12 * 2 * n * n * d
    assert round(macs / 1e9, 1) == 4.6


def test_inspect_vit_base_imagenet_per_layer_densities_and_flops(capsys) -> None:
    assert inspect_main(["--model", "timm/vit_base_patch16_224", "--data", "imagenet", "--density", "0.1",
                         "--sparse-init", "ERK"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split() and line.split()[0].endswith(".weight")]
    assert len(rows) == 1 + 12 * 4 + 1
    assert rows[0][:2] == ["patch_embed.proj.weight", "768x3x16x16"]
    total = next(line for line in lines if line.startswith("total (masked)")).split()
    assert total[2:5] == ["0.1000", "8,629,251", "86,292,480"]
    attention = next(line for line in lines if line.startswith("attention q.k, attn.v")).split()
    assert attention[-2:] == ["1.43G", "1.43G"]  # 12 x 2 x 2 x 197^2 x 768, dense
    plan = inspect_model("timm/vit_base_patch16_224", "imagenet", 0.1, "ERK")
    assert plan["flops"]["activation_products"] == 12 * 2 * 2 * 197 ** 2 * 768
    assert plan["flops"]["dense"] == sum(la["flops"] for la in plan["layers"]) + 12 * 2 * 2 * 197 ** 2 * 768


# --------------------------------------------------------------------------------------------
# The ViT recipes (configs/imagenet_{deit_small,vit_base}_rigl_d{0.1,0.2}.yaml)

VIT_RECIPES = {  # file stem -> (timm name, per-process batch, lr, update frequency): SViTE's commands
    "imagenet_deit_small_rigl_d0.1": ("deit_small_patch16_224", 64, 5e-4, 15_000),
    "imagenet_deit_small_rigl_d0.2": ("deit_small_patch16_224", 64, 5e-4, 15_000),
    "imagenet_vit_base_rigl_d0.1": ("vit_base_patch16_224", 128, 1e-3, 7_000),
    "imagenet_vit_base_rigl_d0.2": ("vit_base_patch16_224", 128, 1e-3, 7_000),
}


@pytest.mark.parametrize("stem", sorted(VIT_RECIPES))
def test_vit_recipes_hold_their_sources_hyperparameters(stem: str) -> None:
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{stem}.yaml"
    text = path.read_text()
    assert "# Sources, one per setting:" in text and "SViTE" in text and "DeiT's main.py" in text
    cfg = parse_config(["--config", str(path), "--data-dir", "IMAGENET"])
    name, batch, lr, update = VIT_RECIPES[stem]
    assert (cfg.model.name, cfg.model.kwargs, cfg.data.name, cfg.data.batch_size) == (
        f"timm/{name}", ("drop_path_rate=0.1",), "imagenet", batch)
    assert lr == 5e-4 * 8 * batch / 512  # DeiT's linear scaling at 8 processes
    o, s, sp = cfg.optim, cfg.schedule, cfg.sparsity
    assert (o.name, o.lr, o.weight_decay, o.label_smoothing, o.bn_weight_decay) == ("adamw", lr, 0.05, 0.1, False)
    assert (s.epochs, s.multiplier, s.lr_schedule, s.warmup_epochs) == (300, 1, "cosine", 5)
    assert cfg.sparse and sp.density == float(stem[-3:])
    assert (sp.method, sp.sparse_init, sp.growth, sp.death, sp.redistribution, sp.update_frequency) == (
        "DST", "ERK", "gradient", "magnitude", "none", update)
