"""Metrics on hand-made predictions, and the uniform model interface (conventions §2, §9, §13)."""
import pytest
import torch

from models import MODELS, build_model
from utils.metrics import accuracy, der, rir


def test_acc_asr_ra_on_hand_made_predictions():
    y_clean = torch.tensor([0, 1, 2, 3])
    pred_clean = torch.tensor([0, 1, 0, 3])
    assert accuracy(pred_clean, y_clean) == 0.75
    y_true = torch.tensor([1, 2, 3, 4, 5])      # poisoned test samples' true labels
    y_attack = torch.zeros(5, dtype=torch.long)  # all2one target 0
    pred = torch.tensor([0, 0, 3, 0, 5])
    assert accuracy(pred, y_attack) == pytest.approx(0.6)  # ASR
    assert accuracy(pred, y_true) == pytest.approx(0.4)    # RA


def test_der_subtracts_the_accuracy_drop():
    no_drop = der(0.9, 1.0, 0.9, 0.1)
    with_drop = der(0.9, 1.0, 0.8, 0.1)
    assert no_drop == pytest.approx(0.95)
    assert with_drop == pytest.approx((0.9 - 0.1 + 1) / 2) and with_drop < no_drop
    assert der(0.9, 0.5, 0.95, 0.7) == pytest.approx(0.5)  # worse ASR and better ACC both clip at 0
    assert rir(0.9, 0.0, 0.9, 0.8) == pytest.approx(0.9)
    assert rir(0.9, 0.0, 0.7, 0.8) == pytest.approx(0.8)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_model_interface(name, shape):
    torch.manual_seed(0)
    width = 8 if name != "cnn" else None
    m = build_model(name, 10, shape[0], (0.5,) * shape[0], (0.25,) * shape[0], width).eval()
    x = torch.rand(3, *shape)
    logits, feats = m.forward_with_features(x)
    assert torch.allclose(m(x), logits) and torch.allclose(m.head(m.features(x)), logits)
    assert feats.shape == (3, m.feature_dim) and m.head.in_features == m.feature_dim and m.num_classes == 10
    assert isinstance(m.head, torch.nn.Linear)
    assert next(iter(m.children())) is m.normalize and not list(m.normalize.parameters())
    back, head = m.backbone_parameters(), m.head_parameters()
    ids = {id(p) for p in back} | {id(p) for p in head}
    assert ids == {id(p) for p in m.parameters()} and not {id(p) for p in back} & {id(p) for p in head}
    # nothing clamps: values above 1 give different logits from their clamped copy
    # (train mode: a random deep net in eval mode can flatten every input to the same logits)
    m.train()
    x2 = x.clone()
    x2[:, :, :8, :8] += 1.0
    assert not torch.allclose(m(x2), m(x2.clamp(0, 1)))


def test_normalize_buffers_are_saved_with_the_weights():
    m = build_model("cnn", 10, 1, (0.5,), (0.5,))
    sd = m.state_dict()
    assert torch.equal(sd["normalize.mean"].flatten(), torch.tensor([0.5]))


def test_preactresnet18_shape_of_reference():
    m = build_model("preactresnet18", 10, 3, (0.5,) * 3, (0.5,) * 3)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 20 and sum(c.out_channels for c in convs) == 4800
    assert 11.0e6 < sum(p.numel() for p in m.parameters()) < 11.3e6
    assert m.feature_dim == 512


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="known models: cnn, preactresnet18"):
        build_model("resnet1000", 10, 3, (0.5,), (0.5,))
