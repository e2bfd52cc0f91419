"""ONNX export (gamma.export) and the onnxruntime backend of the scorer: same decoding, crops and scores as PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_close
from PIL import Image

import gamma
from gamma.data.photos import distorted_photos
from gamma.export import OPSET, OnnxGammaModel, export_onnx, quantize_onnx
from gamma.scorer import Scorer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _model(name: str = "gamma_test") -> gamma.GammaModel:
    torch.manual_seed(0)
    return gamma.create_model(name).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    model = _model()
    path = export_onnx(model, folder / "gamma.onnx", source="gamma_test (random init)")
    return model, path


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    """64 distorted crops of real photographs (scikit-image's), saved as PNG and JPEG files of two sizes."""
    folder = tmp_path_factory.mktemp("photos")
    images, _ = distorted_photos(64, size=(256, 320), seed=1)
    paths = []
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        if i % 3 == 0:  # some smaller than a crop window: upscaled by the protocol
            array = array[:200, :260]
        path = folder / f"p{i:03d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(array).save(path, quality=90)
        paths.append(str(path))
    return paths


def test_graph_contract(exported):
    """Opset, input/outputs, a dynamic batch axis and the metadata are as documented."""
    model, path = exported
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == OPSET
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["gamma"])
    assert meta["levels"] == pytest.approx(model.score_level.tolist())
    assert meta["crop_protocol"]["mode"] == "random" and meta["outputs"] == ["score", "distribution", "attributes"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "crops" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 224, 224]
    assert [o.name for o in session.get_outputs()] == ["score", "level_probs", "attributes"]
    for n in (1, 5):  # other batch sizes than the traced one (2)
        crops = torch.rand(n, 3, 224, 224, generator=torch.Generator().manual_seed(n))
        score, probs, attrs = session.run(None, {"crops": crops.numpy()})
        assert score.shape == (n, 1) and probs.shape == (n, 1, 5) and attrs.shape == (n, 5)
        with torch.inference_mode():
            expected = model.score_crops(crops)
        assert_close(score[:, 0], expected, rtol=0, atol=1e-5)


def test_onnxruntime_scorer_agrees_with_pytorch_on_photos(exported, photo_files):
    """>= 60 real photographs (cropped, distorted, some upscaled): every column within 1e-4 of the fp32 path."""
    model, path = exported
    kwargs = dict(distribution=True, attributes=True, batch_size=8, num_workers=0)
    torch_df = Scorer(model=model, **kwargs).score(photo_files)
    onnx_df = Scorer(str(path), backend="onnxruntime", **kwargs).score(photo_files)
    assert len(photo_files) >= 60 and list(onnx_df.columns) == list(torch_df.columns)
    assert list(onnx_df["name"]) == list(torch_df["name"])
    assert torch_df["score"].std() > 1e-3  # the scores spread: the comparison is not of constants
    numeric = [c for c in torch_df.columns if c != "name"]
    delta = (onnx_df[numeric] - torch_df[numeric]).abs().to_numpy().max()
    assert delta <= 1e-4, delta


def test_sdp_scene_baked_in(tmp_path):
    """A scene given at export is the only one the graph knows; another, or 'auto', is refused by name."""
    model = _model("gamma_test_sdp")
    path = export_onnx(model, tmp_path / "sdp.onnx", scene="underwater", outputs=["score"])
    runner = OnnxGammaModel(path)
    assert runner.scenes == ["underwater"]
    images = torch.rand(2, 3, 240, 230, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model.score_images(images, "underwater")
    assert_close(runner.score_images(images, "underwater"), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="natural.*not exported"):
        runner.score_images(images, "natural")
    with pytest.raises(ValueError, match="distribution"):  # exported without it
        runner.assess(images, "underwater")
    with pytest.raises(ValueError, match="auto"):
        export_onnx(model, tmp_path / "auto.onnx", scene="auto")
    with pytest.raises(ValueError, match="unknown ONNX output"):
        export_onnx(model, tmp_path / "x.onnx", outputs=["score", "logits"])


def test_every_scene_exported_by_default(tmp_path):
    model = _model("gamma_test_sdp")
    runner = OnnxGammaModel(export_onnx(model, tmp_path / "all.onnx", outputs=["score"]))
    images = torch.rand(1, 3, 224, 300, generator=torch.Generator().manual_seed(2))
    for scene in ("natural", "aigc"):
        with torch.inference_mode():
            expected = model.score_images(images, scene)
        assert_close(runner.score_images(images, scene), expected, rtol=0, atol=1e-5)


def test_int8_quantized_graph_runs_and_keeps_metadata(exported, tmp_path):
    model, path = exported
    q = quantize_onnx(path, tmp_path / "int8.onnx")
    assert q.stat().st_size < path.stat().st_size
    runner = OnnxGammaModel(q)
    images = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = model.score_images(images)
    got = runner.score_images(images)
    levels = model.score_level.detach()
    assert bool(((got >= levels.min() - 1e-6) & (got <= levels.max() + 1e-6)).all())
    assert float((got - expected).abs().max()) < 0.05 * float(levels.max() - levels.min())


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        OnnxGammaModel(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="precision"):
        Scorer(str(tmp_path / "missing.onnx"), backend="onnxruntime", precision="bf16")


def test_cli_export_and_score_with_onnxruntime(photo_files, tmp_path):
    """`gamma export` then `gamma score --backend onnxruntime`: the rows of the PyTorch command within 1e-4."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import read_rows

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def gamma_cli(*args):
        r = subprocess.run([sys.executable, "-m", "gamma", *args], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    out = tmp_path / "g.onnx"
    gamma_cli("export", "--model", "gamma_test", "--onnx", str(out), "--int8", str(tmp_path / "g8.onnx"))
    assert out.exists() and (tmp_path / "g8.onnx").exists()
    files = photo_files[:12]
    common = ["score", *files, "--distribution", "--no-progress", "--workers", "0"]
    gamma_cli(*common, "--model", "gamma_test", "--out", str(tmp_path / "torch.csv"))
    gamma_cli(*common, "--backend", "onnxruntime", "--weights", str(out), "--out", str(tmp_path / "onnx.csv"))
    a, b = read_rows(tmp_path / "torch.csv"), read_rows(tmp_path / "onnx.csv")
    assert a[0] == b[0] and [r[0] for r in a] == [r[0] for r in b]
    delta = max(abs(float(x) - float(y)) for ra, rb in zip(a[1:], b[1:], strict=True) for x, y in
                zip(ra[1:], rb[1:], strict=True))
    assert delta <= 1e-4 + 2e-6, delta  # (6 decimals written)


def test_runner_given_as_the_model(exported, photo_files):
    """The runner is a model like any other to the Scorer: its own Scoring row, no backend switch needed."""
    model, path = exported
    runner = OnnxGammaModel(path)
    df = Scorer(model=runner, num_workers=0).score(photo_files[:4])
    with torch.inference_mode():
        expected = Scorer(model=model, num_workers=0).score(photo_files[:4])
    assert df.attrs["model"] == "gamma"
    assert_close(df["score"].to_numpy(), expected["score"].to_numpy(), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="PromptIQA"):
        export_onnx(gamma.create_model("promptiqa_test"), "x.onnx")


def test_promptiqa_with_baked_isp_agrees_with_pytorch(photo_files, tmp_path):
    """PromptIQA with a fixed ISP set baked in: >= 60 photographs scored by onnxruntime within 1e-4 of PyTorch."""
    from gamma.export import OnnxPromptIQAModel, export_promptiqa_onnx, open_onnx

    torch.manual_seed(0)
    model = gamma.create_model("promptiqa_test").eval()
    isp = {p: (i + 1) / 7 for i, p in enumerate(photo_files[-6:])}
    torch_scorer = Scorer(model=model, isp=isp, num_workers=0)
    path = export_promptiqa_onnx(model, tmp_path / "piqa.onnx", torch_scorer.encoded_isp, isp_source="test pairs")
    runner = open_onnx(path)
    assert isinstance(runner, OnnxPromptIQAModel) and runner.meta["isp_pairs"] == 6
    torch_df = torch_scorer.score(photo_files)
    onnx_df = Scorer(str(path), backend="onnxruntime", num_workers=0).score(photo_files)
    assert list(onnx_df["name"]) == list(torch_df["name"]) and onnx_df.attrs["model"] == "promptiqa"
    assert torch_df["score"].std() > 1e-4  # the scores spread
    delta = float((onnx_df["score"] - torch_df["score"]).abs().max())
    assert delta <= 1e-4, delta


def test_cli_promptiqa_export_and_score(photo_files, tmp_path, capsys):
    """`gamma export --model promptiqa --isp CSV` then `gamma score --backend onnxruntime`: the PyTorch command's rows
    (in this process; the Gamma test above runs the commands as subprocesses)."""
    from helpers import read_rows

    from gamma.cli import main

    isp = tmp_path / "isp.csv"
    isp.write_text("image,score\n" + "".join(f"{p},{(i + 1) / 7:.4f}\n" for i, p in enumerate(photo_files[-6:])))
    out = tmp_path / "piqa.onnx"
    assert main(["export", "--model", "promptiqa_test", "--onnx", str(out)]) == 2
    assert "--isp" in capsys.readouterr().err
    assert main(["export", "--model", "promptiqa_test", "--isp", str(isp), "--onnx", str(out)]) == 0
    common = ["score", *photo_files[:8], "--no-progress", "--workers", "0"]
    assert main([*common, "--model", "promptiqa_test", "--isp", str(isp), "--out", str(tmp_path / "t.csv")]) == 0
    assert main([*common, "--backend", "onnxruntime", "--weights", str(out), "--out", str(tmp_path / "o.csv")]) == 0
    a, b = read_rows(tmp_path / "t.csv"), read_rows(tmp_path / "o.csv")
    assert a[0] == b[0] and [r[0] for r in a] == [r[0] for r in b]
    assert_close([float(r[1]) for r in b[1:]], [float(r[1]) for r in a[1:]], rtol=0, atol=1e-4 + 2e-6)
