"""The ATTIQA student: ResNet-50 layout, heads, stages, test protocol, ranking loss, checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import gamma
from gamma.archs.attiqa import AttiqaModel, attribute_ranking_loss
from gamma.config import get_attiqa_variant
from gamma.prompts import ATTRIBUTES
from gamma.weights import CheckpointError, save_checkpoint


@pytest.fixture
def student():
    torch.manual_seed(0)
    return gamma.create_model("attiqa_test")


# ------------------------------------------------------------------------------------------ ranking loss
def test_ranking_loss_equals_torch_margin_ranking_loss_on_hand_made_pairs():
    pred = torch.tensor([[0.30, 1.0], [0.10, -0.5], [0.35, 0.2], [-0.2, 0.9]], requires_grad=True)
    target = torch.tensor([[0.9, 0.5], [0.2, 0.5], [0.9, 0.1], [0.4, 0.7]])  # ties: (0, 2) in a0, (0, 1) in a1
    # Pairs i < j with a strict teacher order, written out by hand: (i, j, y) with y = +1 when i ranks above j.
    pairs = {
        0: [(0, 1, 1), (0, 3, 1), (1, 2, -1), (1, 3, -1), (2, 3, 1)],  # (0, 2) tied
        1: [(0, 2, 1), (0, 3, -1), (1, 2, 1), (1, 3, -1), (2, 3, -1)],  # (0, 1) tied
    }
    expected = 0.0
    for a, rows in pairs.items():
        i, j, y = (torch.tensor(c) for c in zip(*rows, strict=True))
        expected = expected + F.margin_ranking_loss(pred[i, a], pred[j, a], y.float(), margin=0.1)
    got = attribute_ranking_loss(pred, target, margin=0.1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert got > 0.1  # some pairs violate the margin: not a vacuous zero
    got.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_ranking_loss_ties_and_degenerate_batches():
    pred = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    tied = torch.full((5, 5), 0.5)
    loss = attribute_ranking_loss(pred, tied)
    assert loss.item() == 0.0  # no ordered pair: nothing to learn, and no division by zero
    loss.backward()
    one = attribute_ranking_loss(pred[:1], tied[:1])
    assert one.item() == 0.0
    # Perfectly ordered predictions beyond the margin cost nothing.
    target = torch.arange(5.0)[:, None].expand(5, 5)
    assert attribute_ranking_loss(target * 0.2, target).item() == 0.0
    assert attribute_ranking_loss(target * 0.05, target).item() > 0  # ordered but inside the margin
    with pytest.raises(ValueError, match="batch, attributes"):
        attribute_ranking_loss(pred, tied[:, :4])
    with pytest.raises(ValueError, match="NaN"):
        attribute_ranking_loss(pred, tied.clone().fill_(float("nan")))


# ------------------------------------------------------------------------------------------ architecture
def test_resnet50_layout_is_torchvisions():
    with torch.device("meta"):
        model = AttiqaModel(get_attiqa_variant("attiqa_resnet50"))
        reference = resnet50(weights=None)
    ours = {k: tuple(v.shape) for k, v in model.backbone.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert ours == theirs
    sd = model.state_dict()
    for a in ATTRIBUTES:
        assert tuple(sd[f"heads.{a}.hidden.0.weight"].shape) == (512, 2048)
        assert tuple(sd[f"heads.{a}.out.weight"].shape) == (1, 512)
    assert tuple(sd["regressor.0.weight"].shape) == (512, 5 * 512)
    assert tuple(sd["regressor.2.weight"].shape) == (1, 512)


def test_stages_train_exactly_what_they_use(student):
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    student.train()
    student.set_stage("pretrain")
    attribute_ranking_loss(student.attribute_scores(x), torch.rand(4, 5)).backward()
    for name, p in student.named_parameters():
        assert p.requires_grad == (not name.startswith("regressor.")), name
        if p.requires_grad:
            assert p.grad is not None, name
    student.zero_grad(set_to_none=True)
    student.set_stage("finetune")
    F.mse_loss(student(x), torch.rand(4)).backward()
    for name, p in student.named_parameters():
        assert p.requires_grad == (".out." not in name), name
        if p.requires_grad:
            assert p.grad is not None, name
    with pytest.raises(ValueError, match="unknown stage"):
        student.set_stage("distill")


def test_fine_tuning_reads_the_heads_hidden_features(student):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        hidden, scores = student.heads_forward(x)
        feats = student.features(x)
        for k, a in enumerate(ATTRIBUTES):
            head = student.heads[a]
            torch.testing.assert_close(hidden[:, k], F.relu(head.hidden[0](feats)))
            torch.testing.assert_close(scores[:, k], head.out(hidden[:, k]).squeeze(-1))
        torch.testing.assert_close(student.score_crops(x), student.regressor(hidden.flatten(1)).squeeze(-1))


def test_eval_protocol_resizes_then_averages_five_crops(student):
    x = torch.rand(2, 3, 90, 144, generator=torch.Generator().manual_seed(2))  # short side 90 -> 72, crops 64
    with torch.no_grad():
        got = student(x)
        small = F.interpolate(x, size=(72, 115), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        offsets = [(4, 25), (0, 0), (0, 51), (8, 0), (8, 51)]
        manual = torch.stack([student.score_crops(small[:, :, t : t + 64, l : l + 64]) for t, l in offsets]).mean(0)
        attrs = student.attributes(x)
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-6)
    assert list(attrs) == list(ATTRIBUTES) and attrs["contrast"].shape == (2,)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        student(torch.rand(3, 64, 64))


# ------------------------------------------------------------------------------------------ weights
def test_state_dict_round_trips(student, tmp_path):
    x = torch.rand(2, 3, 80, 80)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the init values: a round trip must carry them
        before = student(x)
    torch.save(student.state_dict(), tmp_path / "sd.pt")
    twin = AttiqaModel(student.config).eval()
    twin.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True), strict=True)
    save_checkpoint(student, tmp_path / "student.pth")
    save_checkpoint(student, tmp_path / "student.safetensors")
    with torch.no_grad():
        assert torch.equal(twin(x), before)
        for name in ("student.pth", "student.safetensors"):
            loaded = gamma.create_model(None, pretrained=tmp_path / name)
            assert isinstance(loaded, AttiqaModel) and loaded.config == student.config
            assert torch.equal(loaded(x), before)
        assert torch.equal(gamma.create_model("attiqa_test", pretrained=tmp_path / "student.pth")(x), before)
    with pytest.raises(CheckpointError, match="head_hidden"):
        gamma.create_model("attiqa_test", pretrained=tmp_path / "student.pth", head_hidden=16)
    with pytest.raises(CheckpointError, match="attiqa model, not a gamma model"):
        gamma.create_model("gamma_test", pretrained=tmp_path / "student.pth")


def test_imagenet_backbone_file_loads_strictly(tmp_path):
    torch.manual_seed(1)
    imagenet = ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=8)  # a torchvision ResNet, classifier included
    torch.save({"state_dict": imagenet.state_dict()}, tmp_path / "resnet.pth")
    model = gamma.create_model("attiqa_test", backbone=tmp_path / "resnet.pth")
    for key, value in imagenet.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.backbone.state_dict()[key], value), key
    torch.save(ResNet(BasicBlock, [1, 1, 1, 1]).state_dict(), tmp_path / "resnet18ish.pth")
    with pytest.raises(CheckpointError, match=r"resnet18ish\.pth.*missing key\(s\): .*conv3"):
        gamma.create_model("attiqa_test", backbone=tmp_path / "resnet18ish.pth")
    with pytest.raises(CheckpointError, match="not found"):
        gamma.create_model("attiqa_test", backbone=tmp_path / "nope.pth")


def test_variants_are_listed_per_family():
    assert gamma.list_models("attiqa") == ["attiqa_resnet50", "attiqa_test"]
    assert not set(gamma.list_models()) & set(gamma.list_models("attiqa"))  # scorer/CLI/trainer take Gamma variants
    families = ("gamma", "attiqa", "promptiqa", "gamma_isp")
    assert set(gamma.list_models("all")) == {name for family in families for name in gamma.list_models(family)}
    with pytest.raises(ValueError, match="unknown model family"):
        gamma.list_models("vgg")
    with pytest.raises(ValueError, match="unknown ATTIQA option"):
        gamma.create_model("attiqa_test", prompt_set="sdp")


def test_resnet50_student_state_dict_round_trips(tmp_path):
    torch.manual_seed(2)
    model = gamma.create_model("attiqa_resnet50")
    with torch.no_grad():
        for m in model.modules():  # running BN statistics are state too: make them differ from their defaults
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.9, 1.1)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model.score_crops(x)
    save_checkpoint(model, tmp_path / "resnet50_student.pth")
    torch.manual_seed(9)  # a different initialisation underneath
    loaded = gamma.create_model(None, pretrained=tmp_path / "resnet50_student.pth")
    assert loaded.config == get_attiqa_variant("attiqa_resnet50")
    sd, loaded_sd = model.state_dict(), loaded.state_dict()
    assert sd.keys() == loaded_sd.keys() and all(torch.equal(sd[k], loaded_sd[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(loaded.score_crops(x), before)
