from __future__ import annotations

import pytest
import torch
import torchvision

from models import FeatureTaps, ModelError, build_model, get_spec, model_names
from models.swin import stage_grids, stage_windows
from models.weights import load_matching, read_state_dict

STUDENTS = model_names("student")
TEACHERS = model_names("teacher")


@pytest.mark.parametrize("name", STUDENTS + ["resnet34", "swin_t"])
def test_every_model_builds_and_taps_are_nchw(name):
    model, spec, arch = build_model(name, num_classes=7, image_size=64)
    model.eval()
    with torch.no_grad(), FeatureTaps(model, spec.taps) as taps:
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7)
    assert list(taps.features) == ["stage1", "stage2", "stage3", "stage4", "final"]
    sides = [taps.features[f"stage{i}"].shape[-1] for i in range(1, 5)]
    assert sides == [16, 8, 4, 2], sides  # strides 4, 8, 16, 32 in NCHW layout
    for feature in taps.features.values():
        assert feature.ndim == 4 and feature.shape[0] == 2


def test_taps_keep_gradients_and_unhook():
    model, spec, _ = build_model("resnet18", 10, 32)
    with FeatureTaps(model, spec.taps, ["stage3"]) as taps:
        model(torch.randn(2, 3, 32, 32))
    taps.features["stage3"].sum().backward()
    assert model.layer3[0].conv1.weight.grad is not None
    assert not model.layer3._forward_hooks


def test_unknown_tap_lists_valid():
    model, spec, _ = build_model("resnet18", 10, 32)
    with pytest.raises(ModelError, match="unknown feature tap 'stage9'; valid: final, stage1"):
        FeatureTaps(model, spec.taps, ["stage9"])


@pytest.mark.parametrize("alias,name", [("swin", "swin_t"), ("shufflenetv2", "shufflenetv2_x1_0"),
                                        ("mobilenetv3", "mobilenetv3_large"), ("Swin-T", "swin_t")])
def test_aliases(alias, name):
    assert get_spec(alias).name == name


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError, match="unknown teacher 'vit'; valid: .*resnet50.*swin_t"):
        get_spec("vit", "teacher")
    with pytest.raises(ModelError, match="unknown student"):
        get_spec("swin", "student")  # a teacher is not a student


def test_swin_window_adapts_so_nothing_is_padded():
    assert stage_windows(32) == [4, 4, 2, 1]
    assert stage_windows(224) == [7, 7, 7, 7]
    for size in (28, 32, 64, 96, 224, 256):
        for grid, window in zip(stage_grids(size), stage_windows(size)):
            assert grid % window == 0 and window <= 7
    model, _, arch = build_model("swin", 10, 32)
    assert arch["window_per_stage"] == [4, 4, 2, 1]
    windows = [block.attn.window_size[0] for stage in (1, 3, 5, 7) for block in model.features[stage]]
    assert windows == [4, 4] + [4, 4] + [2] * 6 + [1, 1]


def test_swin_at_224_is_torchvision_swin_t():
    model, _, _ = build_model("swin", 1000, 224)
    reference = torchvision.models.swin_t()
    reference.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_partial_weights_replace_head_and_report(tmp_path):
    source = torchvision.models.resnet34(num_classes=1000)
    path = tmp_path / "resnet34.pth"
    torch.save(source.state_dict(), path)
    model, spec, _ = build_model("resnet34", 10, 32)
    report = load_matching(model, read_state_dict(path), spec.classifier, spec.adaptable_keys)
    assert report.shape_mismatch == ["fc.weight", "fc.bias"] and not report.unexpected
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.weight.shape == (10, 512)


def test_swin_weights_load_across_window_sizes():
    source, _, _ = build_model("swin", 10, 224)  # window 7 everywhere
    model, spec, _ = build_model("swin", 10, 32)  # windows 4, 4, 2, 1
    report = load_matching(model, source.state_dict(), spec.classifier, spec.adaptable_keys)
    assert report.shape_mismatch and all("relative_position" in k for k in report.shape_mismatch)
    assert torch.equal(model.head.weight, source.head.weight)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    model, spec, _ = build_model("resnet50", 10, 32)
    with pytest.raises(ModelError, match="wrong shapes"):
        load_matching(model, read_state_dict(path), spec.classifier, spec.adaptable_keys)


def test_corrupt_weights_file_is_named(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelError, match=f"corrupt or unreadable weights file {path}"):
        read_state_dict(path)
    with pytest.raises(ModelError, match="weights file not found"):
        read_state_dict(tmp_path / "absent.pth")
