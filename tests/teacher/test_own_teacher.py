"""`distillery cache --weights`: a teacher brought by the user (a timm ViT, a torchvision ResNet, a Hugging Face
cache on disk), cached through the command line; what the cache holds is the model's own forward on the view
rendered with the weights' preprocessing, and `--class-map` logits are the mapped columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from timm.models import save_for_hf

from pipeline.cache.reader import TeacherCache
from pipeline.data.datasets import load_dataset
from pipeline.data.views import ViewPlan
from pipeline.methods.kd import kd_loss
from pipeline.teacher.forward import render_pairs
from pipeline.teacher.model import manifest_teacher_spec
from pipeline.teacher.plan import build_manifest
from pipeline.teacher.verify import manifest_request
from pipeline.teacher.weights import resolve_weights
from pipeline.train.config import RunSettings, TrainConfig
from pipeline.train.loop import train_student

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SUBSET = ["--dataset", "digits", "--subset", "24", "--views", "1", "--shard-size", "24", "--device", "cpu"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """A timm test_vit (10 classes) as .safetensors, a torchvision ResNet-18 (10 classes) as a .pth of
    torchvision keys, and a test_resnet with timm's 1000-class head as .safetensors."""
    d = tmp_path_factory.mktemp("own-weights")
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=10).eval()
    tv = torchvision.models.resnet18(num_classes=10).eval()
    wide = timm.create_model("test_resnet").eval()
    out = {"vit": (vit, d / "vit.safetensors"), "tv": (tv, d / "resnet18-torchvision.pth"),
           "wide": (wide, d / "test_resnet-1000.safetensors")}
    safetensors.torch.save_file(vit.state_dict(), out["vit"][1])
    torch.save(tv.state_dict(), out["tv"][1])
    safetensors.torch.save_file(wide.state_dict(), out["wide"][1])
    return out


def rendered(cache: TeacherCache) -> torch.Tensor:
    """Every cached (sample, view) rendered as the teacher pass rendered it (the manifest's spec), grey
    replicated to RGB: what the user's 3-channel model takes (timm summed its stem to one channel)."""
    spec = manifest_teacher_spec(cache.manifest.teacher)
    dataset = load_dataset("digits", split="train", subset=24, seed=0)
    pairs = np.array([(p, v) for p in range(len(dataset)) for v in range(cache.num_views)], dtype=np.int64)
    x = render_pairs(dataset, ViewPlan(**cache.manifest.views.plan_fields()), pairs, spec)
    return x.expand(-1, 3, -1, -1)


def cached(cache: TeacherCache, name: str) -> torch.Tensor:
    value = cache.read(name)
    return torch.from_numpy(value.reshape(-1, *value.shape[2:]).astype(np.float32))


def test_a_vit_from_safetensors_is_cached_as_its_own_forward(prefect_harness, cli, weights, tmp_path: Path) -> None:
    vit, path = weights["vit"]
    code, output = cli("cache", *SUBSET, "--weights", str(path), "--teacher", "test_vit", "--out", str(tmp_path / "c"))
    assert code == 0, output
    cache = TeacherCache(tmp_path / "c")
    t = cache.manifest.teacher
    # test_vit's pretrained config: 160 px, mean = std = 0.5 (one value per rendered channel), bicubic, 0.95.
    assert (t.input_size, t.mean, t.std, t.in_chans) == (160, [0.5], [0.5], 1)
    assert t.preprocessing["interpolation"] == "bicubic" and t.preprocessing["crop_pct"] == 0.95
    assert t.weights == str(path) and t.weights_sha256 is not None and t.taps == ["blocks.5"]
    x = rendered(cache)
    assert x.shape[-1] == 160
    with torch.inference_mode():
        pooled = vit.forward_head(vit.forward_features(x), pre_logits=True)
        logits = vit.get_classifier()(pooled)
    torch.testing.assert_close(cached(cache, "logits/dense"), logits, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(cached(cache, "features/pooled"), pooled, rtol=1e-2, atol=1e-2)
    assert cache.read("gaussian/mean").shape[-1] == 64  # the tap on the token grid: patch tokens as a map
    code, output = cli("verify", str(tmp_path / "c"), "--samples", "8")
    assert code == 0, output


def test_torchvision_keys_are_cached_with_the_tags_preprocessing(prefect_harness, cli, weights,
                                                                 tmp_path: Path) -> None:
    tv, path = weights["tv"]
    code, output = cli("cache", *SUBSET, "--weights", str(path), "--teacher", "resnet18.tv_in1k", "--input-size",
                       "32", "--tap", "none", "--out", str(tmp_path / "c"))
    assert code == 0, output
    cache = TeacherCache(tmp_path / "c")
    t = cache.manifest.teacher
    assert t.input_size == 32 and t.preprocessing["input_size"] == [1, 224, 224]
    assert t.mean == pytest.approx([(0.485 + 0.456 + 0.406) / 3]) and t.std == pytest.approx([(0.229 + 0.224 + 0.225) / 3])
    with torch.inference_mode():
        logits = tv(rendered(cache))
    torch.testing.assert_close(cached(cache, "logits/dense"), logits, rtol=1e-2, atol=2e-2)


def test_hf_hub_weights_from_the_local_cache(prefect_harness, cli, weights, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.teacher.test_weights import lay_out_hf_cache

    vit, _ = weights["vit"]
    export = tmp_path / "export"
    save_for_hf(vit, str(export), safe_serialization=True,
                data_config=dict(input_size=(3, 32, 32), mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7),
                                 crop_pct=1.0, interpolation="bilinear"))
    lay_out_hf_cache(tmp_path / "hf" / "hub", "distillery/digits-vit",
                     {f: export / f for f in ("config.json", "model.safetensors")}, COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, output = cli("cache", *SUBSET, "--weights", "hf-hub:distillery/digits-vit", "--out", str(tmp_path / "c"))
    assert code == 0, output
    cache = TeacherCache(tmp_path / "c")
    t = cache.manifest.teacher
    assert (t.model, t.weights_revision, t.input_size) == ("test_vit", COMMIT, 32)
    assert t.mean == pytest.approx([0.3]) and t.std == pytest.approx([0.6])  # RGB statistics averaged
    # One channel rendered with averaged statistics: the model to compare with is the one-channel model timm
    # adapts from these weights (its RGB stem summed), run on that very view.
    adapted = resolve_weights("hf-hub:distillery/digits-vit", in_chans=1).model
    with torch.inference_mode():
        logits = adapted(rendered(cache)[:, :1])
    torch.testing.assert_close(cached(cache, "logits/dense"), logits, rtol=1e-2, atol=1e-2)
    missing = cli("cache", *SUBSET, "--weights", "hf-hub:distillery/absent", "--out", str(tmp_path / "d"))
    assert missing[0] == 2 and "is not in the local Hugging Face cache" in missing[1]


def test_class_map_kd_is_kd_on_the_selected_columns(prefect_harness, cli, weights, tmp_path: Path) -> None:
    wide, path = weights["wide"]
    classes = load_dataset("digits", split="train").class_names
    columns = [3 * i + 7 for i in range(len(classes))]
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"classes": {c: [k] for c, k in zip(classes, columns)}}))
    common = [*SUBSET, "--weights", str(path), "--teacher", "test_resnet", "--input-size", "32", "--tap", "none"]
    refused = cli("cache", *common, "--out", str(tmp_path / "unmapped"))
    assert refused[0] == 2 and "--teacher-head none" in refused[1] and "--class-map FILE" in refused[1], refused
    code, output = cli("cache", *common, "--class-map", str(class_map), "--out", str(tmp_path / "c"))
    assert code == 0, output
    cache = TeacherCache(tmp_path / "c")
    assert cache.manifest.teacher.class_map == json.loads(class_map.read_text())
    assert cache.manifest.teacher.num_classes == 1000 and cache.manifest.teacher.logit_classes == len(classes)
    # A repair re-runs the request read back from the manifest: the same identity, map included.
    assert build_manifest(manifest_request(tmp_path / "c")).identity() == cache.manifest.identity()
    with torch.inference_mode():
        by_hand = wide(rendered(cache))[:, columns]
    student = torch.randn(len(by_hand), len(classes), generator=torch.Generator().manual_seed(0))
    through_cache = kd_loss(student, cached(cache, "logits/dense"), temperature=4.0)
    torch.testing.assert_close(through_cache, kd_loss(student, by_hand, temperature=4.0), rtol=1e-2, atol=1e-3)
    headless = cli("cache", *common, "--teacher-head", "none", "--out", str(tmp_path / "headless"))
    assert headless[0] == 0, headless[1]
    assert not TeacherCache(tmp_path / "headless").has("logits/dense")


def test_bad_weights_and_class_maps_are_one_line(prefect_harness, cli, weights, tmp_path: Path) -> None:
    _, vit_path = weights["vit"]
    _, wide_path = weights["wide"]
    classes = load_dataset("digits", split="train").class_names

    def refused(*args: str) -> str:
        code, output = cli("cache", *SUBSET, "--out", str(tmp_path / "never"), *args)
        lines = [line for line in output.splitlines() if line.strip() and "Pretrained" not in line]
        assert code == 2 and len(lines) == 1, output
        return lines[0]

    assert "does not exist" in refused("--weights", str(tmp_path / "absent.safetensors"), "--teacher", "test_vit")
    assert "test_resnet" in refused("--weights", str(vit_path), "--teacher", "test_resnet")  # wrong shapes
    assert "give one" in refused("--weights", str(vit_path), "--checkpoint", str(vit_path))
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"classes": {c: [i, i] for i, c in enumerate(classes)}}))
    assert "listed twice" in refused("--weights", str(wide_path), "--teacher", "test_resnet", "--class-map", str(twice))
    out_of_range = tmp_path / "range.json"
    out_of_range.write_text(json.dumps({"classes": {c: [1000 + i] for i, c in enumerate(classes)}}))
    assert "out of range" in refused("--weights", str(wide_path), "--teacher", "test_resnet", "--class-map",
                                     str(out_of_range))
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_a_cnn_student_distills_a_pretrained_vit_with_scalekd_and_wkd_f(prefect_harness, cli, weights,
                                                                         tmp_path: Path) -> None:
    """ViT -> CNN from a `--weights` cache: ScaleKD with TPP through the cached ViT blocks, and WKD-F on the
    Gaussians of the ViT's token grid (patch tokens as a 2x2 map at 32 px)."""
    _, path = weights["vit"]
    cache = tmp_path / "vit-cache"
    code, output = cli("cache", "--dataset", "digits", "--subset", "120", "--views", "1", "--shard-size", "60",
                       "--device", "cpu", "--weights", str(path), "--teacher", "test_vit", "--input-size", "32",
                       "--featmaps", "--teacher-tail", "2", "--out", str(cache))
    assert code == 0, output
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["teacher"]["weights"] == str(path)
    assert manifest["files"]["teacher_tail"]["stages"] == ["blocks.4", "blocks.5"]
    out = tmp_path / "run"
    # At 32 px test_resnet's deepest map is 1x1 and the ViT's tokens 2x2: mimic with its 2x2 layer3.
    summary = train_student(TrainConfig(cache=str(cache), student="test_resnet", out=str(out),
                                        methods=("ce", "scalekd:stage=-2,tpp=true", "wkd_f:stage=-2"),
                                        settings=RunSettings(epochs=1, batch_size=60, workers=0)))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    terms = ("scalekd_direct", "scalekd_tpp_alt", "wkd_f_mean", "wkd_f_std")
    assert steps and all(np.isfinite([r[t] for t in terms]).all() for r in steps)
    assert any(r["wkd_f_std"] > 0 for r in steps) and 0 <= summary.val_accuracy <= 1
