"""TeSHead on timm backbones: the vision logits, the cosine text logits, and the fixed text head."""
import pytest
import torch
import torch.nn.functional as F

import tesloss

timm = pytest.importorskip("timm")

NUM_CLASSES, TEXT_DIM, BATCH = 5, 16, 6


def timm_width(backbone):
    # With num_classes=0 a timm model returns pooled pre-logits features, head_hidden_size wide.
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


@pytest.fixture
def text_head():
    generator = torch.Generator().manual_seed(1)
    return F.normalize(torch.randn(NUM_CLASSES, TEXT_DIM, generator=generator), dim=1)


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=0)


@pytest.fixture
def images():
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_outputs_are_vision_logits_and_cosine_similarities(backbone, text_head, images):
    head = tesloss.TeSHead(timm_width(backbone), text_head)
    features = backbone(images)
    vis_logits, txt_logits = head(features)
    assert vis_logits.shape == txt_logits.shape == (BATCH, NUM_CLASSES)
    assert txt_logits.abs().max() <= 1
    torch.testing.assert_close(vis_logits, head.classifier(features))
    projected = head.projection(features)
    cosines = F.cosine_similarity(projected[:, None, :], text_head[None, :, :], dim=-1)
    torch.testing.assert_close(txt_logits, cosines, atol=1e-6, rtol=0)


def test_width_is_head_hidden_size_where_it_differs_from_num_features(text_head):
    torch.manual_seed(0)
    backbone = timm.create_model("test_mambaout", num_classes=0)
    assert backbone.head_hidden_size != backbone.num_features
    features = backbone(torch.randn(2, 3, 32, 32))
    vis_logits, txt_logits = tesloss.TeSHead(timm_width(backbone), text_head)(features)
    assert vis_logits.shape == txt_logits.shape == (2, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"features must be \[B, in_features\]=\[B, 64\]"):
        tesloss.TeSHead(backbone.num_features, text_head)(features)


def test_text_head_is_a_fixed_buffer_in_the_state_dict(backbone, text_head, images):
    head = tesloss.TeSHead(timm_width(backbone), text_head)
    assert "text_head" in head.state_dict()
    assert torch.equal(head.state_dict()["text_head"], text_head)
    assert "text_head" not in dict(head.named_parameters())
    assert not head.text_head.requires_grad
    text_head.mul_(2)  # the caller's tensor is copied, not aliased
    assert torch.equal(head.text_head * 2, text_head)

    optimizer = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=1.0)
    before = head.text_head.clone()
    vis_logits, txt_logits = head(backbone(images))
    tesloss.fused_tes_loss(vis_logits, txt_logits, torch.arange(BATCH) % NUM_CLASSES).backward()
    optimizer.step()
    assert torch.equal(head.text_head, before)

    restored = tesloss.TeSHead(timm_width(backbone), F.normalize(torch.ones(NUM_CLASSES,
                                                                            TEXT_DIM), dim=1))
    restored.load_state_dict(head.state_dict())
    assert torch.equal(restored.text_head, before)


def test_gradients_reach_every_parameter_of_the_head(backbone, text_head, images):
    head = tesloss.TeSHead(timm_width(backbone), text_head, proj_hidden=32)
    vis_logits, txt_logits = head(backbone(images))
    target = torch.arange(BATCH) % NUM_CLASSES
    tesloss.fused_tes_loss(vis_logits, txt_logits, target).backward()
    names = [name for name, _ in head.named_parameters()]
    assert len(names) == 8  # classifier and the projection's two Linears and BatchNorm
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert next(backbone.parameters()).grad.abs().sum() > 0


def test_rejects_a_text_head_with_rows_that_are_not_unit(text_head):
    scaled = text_head.clone()
    scaled[3] *= 2
    with pytest.raises(ValueError, match="text_head rows must be L2-normalized, but row 3"):
        tesloss.TeSHead(8, scaled)
    with pytest.raises(ValueError, match=r"text_head must be a floating-point tensor \[C, D\]"):
        tesloss.TeSHead(8, text_head[0])
    with pytest.raises(ValueError, match="in_features must be an int >= 1"):
        tesloss.TeSHead(0, text_head)
