"""Weights brought by a user: local state dicts (timm, torchvision and original keys) and a Hugging Face cache on
disk, loaded offline by timm's own machinery; every bad input one line."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from timm.models import save_for_hf

from pipeline.teacher.weights import Preprocessing, WeightsError, resolve_weights

VIT_KWARGS = dict(img_size=32, patch_size=4)  # a small ViT at 32 px, as fitted on Fashion-MNIST
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=10, **VIT_KWARGS).eval()


@pytest.fixture(scope="module")
def tv_resnet() -> torch.nn.Module:
    """A torchvision ResNet-18 (torchvision's own keys and module layout), 10 classes."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so running stats must load too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, vit: torch.nn.Module,
          tv_resnet: torch.nn.Module) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("weights")
    out = {"vit": d / "vit.safetensors", "tv": d / "resnet18-torchvision.pth"}
    safetensors.torch.save_file(vit.state_dict(), out["vit"])
    torch.save(tv_resnet.state_dict(), out["tv"])
    return out


def one_line(excinfo: pytest.ExceptionInfo[WeightsError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 700, message
    return message


def test_a_timm_vit_from_safetensors_computes_what_the_original_computes(vit, files) -> None:
    got = resolve_weights(str(files["vit"]), "test_vit", num_classes=10, **VIT_KWARGS)
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(got.model(x), vit(x), rtol=0, atol=0)
        torch.testing.assert_close(got.model.forward_features(x), vit.forward_features(x), rtol=0, atol=0)
    assert not got.model.training and got.num_classes == 10 and got.architecture == "test_vit"
    assert got.sha256 == hashlib.sha256(files["vit"].read_bytes()).hexdigest() and got.revision is None
    # test_vit's pretrained config (r160_in1k), at the size the model was built for.
    assert got.preprocessing == Preprocessing(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3,
                                              interpolation="bicubic", crop_pct=0.95, crop_mode="center",
                                              fixed_input_size=False)


def test_torchvision_keys_load_into_timm_with_the_tags_preprocessing(tv_resnet, files) -> None:
    got = resolve_weights(str(files["tv"]), "resnet18.tv_in1k", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(got.model(x), tv_resnet(x))
    assert got.architecture == "resnet18.tv_in1k"
    # torchvision's recipe, as timm's `tv_in1k` pretrained config records it.
    assert got.preprocessing.to_dict() == {
        "input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center", "fixed_input_size": False}


@pytest.mark.parametrize("layout", ["openclip-trunk", "wrapped-ddp"])
def test_original_vit_keys_are_mapped_by_timms_own_filter(vit, tmp_path: Path, layout: str) -> None:
    """OpenCLIP's timm-trunk keys (`visual.trunk.*`, head in `visual.head.proj`) go through the ViT's
    checkpoint_filter_fn; a training checkpoint ({'model': ...} with DDP's `module.`) through timm's loader."""
    sd = vit.state_dict()
    if layout == "openclip-trunk":
        reference = timm.create_model("test_vit", num_classes=10, **VIT_KWARGS).eval()
        reference.load_state_dict(sd)
        torch.nn.init.zeros_(reference.head.bias)  # OpenCLIP's projection has no bias
        original = {f"visual.trunk.{k}": v for k, v in sd.items() if not k.startswith("head.")}
        original["visual.head.proj.weight"] = sd["head.weight"]
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(original, path)
    else:
        reference = vit
        path = tmp_path / "checkpoint.pt"
        torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in sd.items()}}, path)
    got = resolve_weights(str(path), "test_vit", num_classes=10, **VIT_KWARGS)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(got.model(x), reference(x), rtol=0, atol=0)


def test_head_less_keeps_the_trunk_and_one_channel_adapts_the_stem(vit, tv_resnet, files,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    builder = logging.getLogger("timm.models._builder")  # watched while timm loads (it reports keys only there)
    before = (builder.level, builder.propagate, list(builder.handlers))
    headless = resolve_weights(str(files["vit"]), "test_vit", num_classes=0, **VIT_KWARGS)
    assert (builder.level, builder.propagate, list(builder.handlers)) == before
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(headless.model(x), vit.forward_head(vit.forward_features(x), pre_logits=True))
    assert headless.num_classes == 0
    # timm sums the RGB filters of the stem for one channel: a grey image equals its RGB replica.
    with caplog.at_level(logging.DEBUG, logger="timm"):
        grey = resolve_weights(str(files["tv"]), "resnet18.tv_in1k", num_classes=10, in_chans=1)
    # Averaging the RGB statistics for one channel is deliberate (the guide says so): timm's warning is not shown.
    assert not [r for r in caplog.records if "does not match" in r.getMessage()]
    assert not logging.getLogger("timm.data.model_config").filters
    g = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(grey.model(g), tv_resnet(g.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
    pre = grey.preprocessing
    assert pre.input_size == (1, 224, 224) and len(pre.mean) == len(pre.std) == 1
    assert pre.mean[0] == pytest.approx((0.485 + 0.456 + 0.406) / 3)


def lay_out_hf_cache(cache: Path, repo_id: str, snapshot_files: dict[str, Path], commit: str = COMMIT) -> Path:
    """The Hugging Face cache layout (blobs, snapshots/<commit> of symlinks, refs/main), as huggingface_hub
    writes it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    for name, src in snapshot_files.items():
        blob = repo / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        blob.write_bytes(src.read_bytes())
        (repo / "snapshots" / commit / name).symlink_to(os.path.relpath(blob, repo / "snapshots" / commit))
    (repo / "refs" / "main").write_text(commit)
    return repo


@pytest.fixture
def hf_cache(tmp_path: Path, vit: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`distillery/fmnist-vit` in an offline Hub cache under tmp: exported by timm's `save_for_hf` with the
    preprocessing the weights were trained with."""
    export = tmp_path / "export"
    save_for_hf(vit, str(export), safe_serialization=True,
                data_config=dict(input_size=(3, 32, 32), mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7),
                                 crop_pct=1.0, interpolation="bilinear"))
    cache = tmp_path / "hf" / "hub"
    lay_out_hf_cache(cache, "distillery/fmnist-vit", {f: export / f for f in ("config.json", "model.safetensors")})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return cache


def test_hf_hub_resolves_from_the_local_cache_only(vit, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got = resolve_weights("hf-hub:distillery/fmnist-vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(got.model(x), vit(x), rtol=0, atol=0)
    weights = hf_cache / "models--distillery--fmnist-vit" / "snapshots" / COMMIT / "model.safetensors"
    assert got.path == weights and got.revision == COMMIT and got.architecture == "test_vit"
    assert got.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest() and got.num_classes == 10
    # The snapshot's config.json, not the registry's test_vit config, gives the preprocessing.
    assert got.preprocessing == Preprocessing(input_size=(3, 32, 32), mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7),
                                              interpolation="bilinear", crop_pct=1.0, crop_mode="center",
                                              fixed_input_size=False)
    # HF_HUB_CACHE wins over HF_HOME; a revision may be named by its commit; --teacher may name the architecture.
    monkeypatch.setenv("HF_HOME", "/nonexistent")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    again = resolve_weights(f"hf-hub:distillery/fmnist-vit@{COMMIT}", "test_vit", num_classes=0)
    assert again.sha256 == got.sha256 and again.num_classes == 0


def test_hf_hub_problems_are_one_line(hf_cache: Path) -> None:
    with pytest.raises(WeightsError) as e:
        resolve_weights("hf-hub:distillery/absent")
    assert f"looked for {hf_cache}/models--distillery--absent/refs/main" in one_line(e)
    with pytest.raises(WeightsError) as e:
        resolve_weights("hf-hub:distillery/fmnist-vit@v2")
    assert "refs/v2" in one_line(e)
    with pytest.raises(WeightsError) as e:
        resolve_weights("hf-hub:distillery/fmnist-vit", "resnet18")
    assert "holds a 'test_vit', not a 'resnet18'" in one_line(e)
    with pytest.raises(WeightsError) as e:
        resolve_weights("hf-hub:not a repo!")
    assert "is not a Hub repo id" in one_line(e)
    (hf_cache / "models--distillery--fmnist-vit" / "snapshots" / COMMIT / "model.safetensors").unlink()
    with pytest.raises(WeightsError) as e:
        resolve_weights("hf-hub:distillery/fmnist-vit")
    assert "holds no weights" in one_line(e)


class Payload:
    """What a malicious pickle runs when loaded without weights_only: here, making a directory."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_bad_weights_are_one_line(files, tmp_path: Path) -> None:
    def refused(source: Path | str, model: str | None = "resnet18.tv_in1k", **kw) -> str:
        with pytest.raises(WeightsError) as e:
            resolve_weights(str(source), model, **kw)
        return one_line(e)

    # Wrong shapes: the torchvision file has a 10-class head, the tag's config says 1000.
    assert "size mismatch for fc.weight" in refused(files["tv"])
    assert "check the model name" in refused(files["tv"], "resnet34", num_classes=10)
    # Head-less: timm drops the head and loads non-strictly, reporting missing keys only in its log.
    assert "does not fit test_resnet" in refused(files["vit"], "test_resnet", num_classes=0)

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "extra": Payload(marker)}, evil)
    assert f"a pickle that runs code when loaded ({os.mkdir.__module__}.mkdir)" in refused(evil) and not marker.exists()

    assert "does not exist" in refused(tmp_path / "missing.safetensors")
    assert "is neither a state dict file nor an hf-hub: source" in refused(tmp_path / "weights.npz")
    assert "does not say which architecture" in refused(files["vit"], None)
    assert "unknown timm model 'resnet999'" in refused(files["tv"], "resnet999")
    assert "Invalid pretrained tag (nope)" in refused(files["tv"], "resnet18.nope")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    assert "cannot be loaded into resnet18.tv_in1k" in refused(junk)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02not a torch file")
    assert "cannot be loaded into resnet18.tv_in1k" in refused(garbage)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    assert "cannot be loaded into resnet18.tv_in1k" in refused(tensor)
