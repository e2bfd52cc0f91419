"""Shared test setup: offline, deterministic, small."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

# Width-64 test models gain nothing from a second thread, and on a busy 2-core machine each parallel op can stall.
torch.set_num_threads(1)


@pytest.fixture
def tiny_model():
    """A fresh random-init tiny Gamma model (naive prompts) in eval mode."""
    import gamma

    torch.manual_seed(0)
    return gamma.create_model("gamma_test")


@pytest.fixture
def tiny_sdp_model():
    import gamma

    torch.manual_seed(0)
    return gamma.create_model("gamma_test_sdp")


def perturb_moae(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Give a model's MoAE blocks non-trivial values (alphas, routers, experts) so that they change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.moae_modules():
            if m.scale is not None:
                m.scale.fill_(0.7)
            m.gating.layer1.weight.normal_(0, 1.0, generator=gen)
            for expert in m.experts.values():
                for p in expert.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))
