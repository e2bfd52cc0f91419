"""Checkpoints: the release layout, plain CLIP backbones, our own format, safetensors, and bad files."""

import pickle

import pytest
import torch
from helpers import perturb_moae

import gamma
from gamma.weights import CheckpointError, infer_config, read_checkpoint, release_state_dict, save_checkpoint


# Loading is exact and scoring the same weights with the same operations on the same shapes rounds the same way:
# the tests below compare scores bit for bit.
def _scores(model, x, scene=None):
    with torch.no_grad():
        return model(x, scene=scene) if scene else model(x)


@pytest.fixture
def images():
    torch.manual_seed(3)
    return torch.rand(2, 3, 256, 240)


@pytest.fixture
def trained(tiny_model):
    """A tiny model whose MoAE, adapter and levels differ from their initial values."""
    perturb_moae(tiny_model)
    with torch.no_grad():
        tiny_model.score_level.add_(torch.tensor([0.05, -0.02, 0.0, 0.03, -0.01]))
        tiny_model.adapter.fc[0].weight.mul_(1.3)
    return tiny_model


def test_release_layout_round_trip_strict(tmp_path, trained, images):
    path = tmp_path / "Gamma.pth"
    torch.save(release_state_dict(trained), path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"params"} and set(raw["params"]) == set(trained.state_dict())
    loaded = gamma.create_model(pretrained=path)
    assert loaded.config.to_dict() == trained.config.to_dict()
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(_scores(loaded, images), _scores(trained, images))


def test_release_layout_with_named_variant_and_prompt_set(tmp_path, tiny_sdp_model, images):
    perturb_moae(tiny_sdp_model)
    path = tmp_path / "Gamma-Prompt.pth"
    torch.save(release_state_dict(tiny_sdp_model), path)
    by_name = gamma.create_model("gamma_test_sdp", pretrained=path)
    inferred = gamma.create_model(pretrained=path, prompt_set="sdp")
    ref = _scores(tiny_sdp_model, images, "underwater")
    assert torch.equal(_scores(by_name, images, "underwater"), ref)
    assert torch.equal(_scores(inferred, images, "underwater"), ref)


@pytest.mark.parametrize(
    ("vision", "text", "moae", "experts"),
    [
        ({"width": 128, "layers": 3, "heads": 2, "patch_size": 32, "image_size": 224},
         {"width": 64, "layers": 3, "heads": 1, "context_length": 77}, 2, 5),
        ({"width": 64, "layers": 2, "heads": 1, "patch_size": 16, "image_size": 64},
         {"width": 128, "layers": 2, "heads": 2, "context_length": 32}, 1, 1),
    ],
)
def test_architecture_inferred_from_shapes(tmp_path, vision, text, moae, experts):
    model = gamma.create_model("gamma_test", embed_dim=48, vision=vision, text=text, moae_layers=moae,
                               num_experts=experts, merge_factor=experts != 1)
    path = tmp_path / "m.pth"
    torch.save(release_state_dict(model), path)
    cfg = infer_config(read_checkpoint(path).state_dict)
    assert cfg.to_dict() == model.config.to_dict()


def test_plain_clip_becomes_backbone_with_expert_copies(tmp_path, images):
    backbone = gamma.create_model("gamma_test", moae_layers=0, num_experts=0)
    clip_sd = {k.removeprefix("clip_model."): v for k, v in backbone.state_dict().items()
               if k.startswith("clip_model.")}
    assert "visual.transformer.resblocks.3.mlp.c_fc.weight" in clip_sd
    path = tmp_path / "uniqa.pt"
    torch.save(clip_sd, path)
    model = gamma.create_model(pretrained=path, moae_layers=2)
    assert model.config.has_moae and model.config.num_experts == 3
    block = model.clip_model.visual.transformer.resblocks[3].mlp
    for expert in [block.useful_experts, *block.experts.values()]:
        assert torch.equal(expert.c_fc.weight, clip_sd["visual.transformer.resblocks.3.mlp.c_fc.weight"])
    # alpha = 0 at the start of training: Gamma scores exactly what the backbone does with the same head (MoAE computes
    # its shared expert with the plain MLP's operations and adds exact zeros)
    model.adapter.load_state_dict(backbone.adapter.state_dict())
    assert torch.equal(_scores(model, images), _scores(backbone, images))


def test_plain_clip_infers_paper_moae_for_vitb16_depth(tmp_path):
    with torch.device("meta"):
        base = gamma.create_model("clip_vitb16_head")
    # shapes only: infer_config never touches values
    sd = {k.removeprefix("clip_model."): torch.empty(v.shape, device="meta") for k, v in base.state_dict().items()
          if k.startswith("clip_model.")}
    cfg = infer_config(sd)
    assert cfg.to_dict() == gamma.config.get_variant("gamma_vitb16").to_dict()


def test_our_checkpoint_is_weights_only_and_carries_config(tmp_path, tiny_sdp_model, images):
    perturb_moae(tiny_sdp_model)
    path = tmp_path / "ours.pt"
    save_checkpoint(tiny_sdp_model, path, epoch=3, metrics={"srcc": 0.9})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "gamma" and raw["config"]["prompt_set"] == "sdp" and raw["epoch"] == 3
    ckpt = read_checkpoint(path)
    assert ckpt.kind == "native" and ckpt.extra["metrics"] == {"srcc": 0.9}
    loaded = gamma.create_model(pretrained=path)
    assert loaded.config.prompt_set == "sdp"
    assert torch.equal(_scores(loaded, images, "face"), _scores(tiny_sdp_model, images, "face"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_written_checkpoints_get_ordinary_file_permissions(tmp_path, trained, suffix):
    """Atomic writes go through a private temporary file; the result must still be readable as open() would make it."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    path = save_checkpoint(trained, tmp_path / f"ours{suffix}")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_safetensors_round_trip(tmp_path, trained, images):
    path = tmp_path / "ours.safetensors"
    save_checkpoint(trained, path)
    loaded = gamma.create_model(pretrained=path)
    assert torch.equal(_scores(loaded, images), _scores(trained, images))
    # a bare release-layout safetensors (no metadata) loads by inference
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(bare))
    assert torch.equal(_scores(gamma.create_model(pretrained=bare), images), _scores(trained, images))


def test_mismatched_checkpoint_names_keys(tmp_path, tiny_model):
    other = gamma.create_model("gamma_test", num_experts=2)
    path = tmp_path / "other.pth"
    torch.save(release_state_dict(other), path)
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*expert_2"):
        gamma.create_model("gamma_test", pretrained=path)
    sd = release_state_dict(tiny_model)
    sd["params"]["adapter.fc.0.weight"] = torch.zeros(16, 64)
    sd["params"]["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): extra.weight.*mismatched.*adapter.fc.0.weight"):
        gamma.create_model("gamma_test", pretrained=path)
    partial = gamma.create_model("gamma_test", pretrained=path, strict=False)
    assert torch.equal(partial.score_level, tiny_model.score_level)
    assert not torch.equal(partial.adapter.fc[0].weight, torch.zeros(32, 64))


def test_our_checkpoint_of_another_architecture_is_refused(tmp_path, tiny_model):
    path = tmp_path / "ours.pt"
    save_checkpoint(gamma.create_model("gamma_test", moae_layers=1), path)
    with pytest.raises(CheckpointError, match="different architecture.*moae_layers"):
        gamma.create_model("gamma_test", pretrained=path)


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "not_state_dict", "missing"])
def test_bad_files_are_clear_errors(tmp_path, tiny_model, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save(release_state_dict(tiny_model), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "not_state_dict":
        torch.save({"params": {"foo": torch.zeros(2)}}, path)
    # A missing file is found missing where known weight names are resolved (gamma.hub), as in Scorer and the CLI.
    expected = FileNotFoundError if kind == "missing" else CheckpointError
    with pytest.raises(expected, match=str(path.name)):
        gamma.create_model(pretrained=path)


class _Custom:  # a class outside torch's safe list: only a full unpickle can read it
    def __init__(self):
        self.w = 1


def test_foreign_pickle_needs_opt_in(tmp_path, tiny_model):
    path = tmp_path / "foreign.pth"
    payload = release_state_dict(tiny_model)
    payload["meta"] = _Custom()
    with open(path, "wb") as fh:
        torch.save(payload, fh, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="allow_unsafe=True"):
        gamma.create_model(pretrained=path)
    model = gamma.create_model(pretrained=path, allow_unsafe=True)
    assert torch.equal(model.score_level, tiny_model.score_level)


def test_create_model_needs_name_or_weights():
    with pytest.raises(ValueError, match="variant name or a checkpoint"):
        gamma.create_model()
    assert {"gamma_vitb16", "gamma_vitb16_sdp", "gamma_test"} <= set(gamma.list_models())


# ------------------------------------------------------------------------------------------------ the prompt set
def _release_files(folder, model):
    """The same tiny weights in the release layout under the release's two names and an unknown one."""
    sd = release_state_dict(model)
    for name in ("Gamma.pth", "Gamma-Prompt.pth", "renamed.pth"):
        torch.save(sd, folder / name)
    return folder


def test_the_prompt_set_of_a_release_file_follows_its_name_a_known_name_or_its_digest(tmp_path, trained, images,
                                                                                        monkeypatch, caplog):
    from gamma.hub import KNOWN_WEIGHTS, resolve_prompt_set, sha256sum

    _release_files(tmp_path, trained)
    for var in ("GAMMA_WEIGHTS", "GAMMA_SDP_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GAMMA_HOME", str(tmp_path / "empty_cache"))
    caplog.set_level("INFO", logger="gamma.hub")
    # Gamma-Prompt.pth without prompt_set: sdp (it was naive after a warning), said in the log.
    sdp = gamma.create_model(pretrained=tmp_path / "Gamma-Prompt.pth")
    assert sdp.config.prompt_set == "sdp"
    said = [r for r in caplog.records if "Gamma-Prompt.pth: prompt set 'sdp'" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO" and "file name" in said[0].getMessage()
    stated = gamma.create_model(pretrained=tmp_path / "Gamma-Prompt.pth", prompt_set="sdp")
    assert torch.equal(_scores(sdp, images, "natural"), _scores(stated, images, "natural"))
    assert gamma.create_model(pretrained=tmp_path / "Gamma.pth").config.prompt_set == "naive"
    # A name gamma does not know: naive, with the warning; the rule's answer says how it was decided.
    caplog.clear()
    assert resolve_prompt_set(tmp_path / "renamed.pth") == ("naive", "assumed")
    assert any(r.levelname == "WARNING" and "does not record its prompt set" in r.getMessage()
               and "prompt_set='sdp'" in r.getMessage() for r in caplog.records)
    # A known name, and the file its environment variable names, are the known weights whatever the file is called.
    monkeypatch.setenv("GAMMA_SDP_WEIGHTS", str(tmp_path / "renamed.pth"))
    assert gamma.create_model(pretrained="gamma_sdp").config.prompt_set == "sdp"
    assert resolve_prompt_set(tmp_path / "renamed.pth") == ("sdp", "environment variable")
    monkeypatch.delenv("GAMMA_SDP_WEIGHTS")
    # By content, where the table knows the digest.
    entry = KNOWN_WEIGHTS["gamma_sdp"]
    monkeypatch.setitem(KNOWN_WEIGHTS, "gamma_sdp", type(entry)(**{**entry.__dict__,
                                                                    "sha256": sha256sum(tmp_path / "renamed.pth")}))
    assert resolve_prompt_set(tmp_path / "renamed.pth") == ("sdp", "sha256")


def test_a_stated_prompt_set_beats_a_file_name_with_a_warning(tmp_path, trained, images, caplog):
    _release_files(tmp_path, trained)
    naive = gamma.create_model(pretrained=tmp_path / "Gamma-Prompt.pth", prompt_set="naive")
    assert naive.config.prompt_set == "naive"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("'gamma_sdp' weights by its file name" in m and "prompt_set='naive'" in m for m in warned), warned
    sdp = gamma.create_model(pretrained=tmp_path / "Gamma-Prompt.pth")
    assert not torch.equal(_scores(naive, images), _scores(sdp, images, "natural"))  # the prompt set matters


def test_a_prompt_set_that_contradicts_the_recorded_one_is_refused_unless_deliberate(tmp_path, trained, images):
    from gamma.hub import PromptSetError
    from gamma.scorer import Scorer

    path = save_checkpoint(trained, tmp_path / "naive_model.pth")  # records 'naive'
    with pytest.raises(PromptSetError, match=r"naive_model\.pth records prompt set 'naive'.*prompt_set='sdp' "
                       r"contradicts it.*prompt_set_override=True"):
        gamma.create_model(pretrained=path, prompt_set="sdp")
    with pytest.raises(PromptSetError, match="prompt_set_override=True"):
        Scorer(path, prompt_set="sdp", scene="natural", device="cpu")
    # Stating the recorded one is fine; so is another one, said to be deliberate.
    assert gamma.create_model(pretrained=path, prompt_set="naive").config.prompt_set == "naive"
    other = gamma.create_model(pretrained=path, prompt_set="sdp", prompt_set_override=True)
    assert other.config.prompt_set == "sdp"
    assert not torch.equal(_scores(other, images, "natural"), _scores(trained, images))
    # A variant name's own prompt set gives way to the recorded one (the weights were trained with it).
    assert gamma.create_model("gamma_test_sdp", pretrained=path).config.prompt_set == "naive"


def test_convert_records_the_resolved_prompt_set(tmp_path, trained):
    from gamma.factory import convert_checkpoint
    from gamma.hub import PromptSetError

    _release_files(tmp_path, trained)
    out = convert_checkpoint(tmp_path / "Gamma-Prompt.pth", tmp_path / "Gamma-Prompt.safetensors")
    assert read_checkpoint(out).config.prompt_set == "sdp"
    assert gamma.create_model(pretrained=out).config.prompt_set == "sdp"  # recorded: no name needed any more
    with pytest.raises(PromptSetError, match="records prompt set 'sdp'"):
        convert_checkpoint(out, tmp_path / "again.safetensors", prompt_set="naive")
    again = convert_checkpoint(out, tmp_path / "again.safetensors", prompt_set="naive", prompt_set_override=True)
    assert read_checkpoint(again).config.prompt_set == "naive"
