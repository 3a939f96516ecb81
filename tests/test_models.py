import pytest
import torch

from imgcls.errors import ImgclsError
from imgcls.models import MODELS, count_params, create_model
from imgcls.registry import Registry


def test_reference_cnn_matches_keras_parameter_count():
    model = create_model("reference_cnn", num_classes=10, in_chans=1, img_size=28)
    assert count_params(model) == 121_930
    out = model(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10)
    layers = [type(m).__name__ for m in model.modules() if not isinstance(m, torch.nn.Sequential)][1:]
    assert layers == ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU",
                      "Flatten", "Linear", "ReLU", "Linear"]


@pytest.mark.parametrize("bf16", [False, True])
def test_reference_cnn_pool_then_relu_is_keras_conv_relu_pool(bf16):
    """Pooling before the ReLU (the built-in's order) gives Keras' conv -> ReLU -> pool
    outputs and gradients exactly, in fp32 and under bf16 autocast."""
    import copy

    torch.manual_seed(0)
    ours = create_model("reference_cnn", num_classes=10, in_chans=1, img_size=28)
    keras = copy.deepcopy(ours)
    f = keras.features
    keras.features = torch.nn.Sequential(f[0], f[2], f[1], f[3], f[5], f[4])
    assert [type(m).__name__ for m in keras.features] == ["Conv2d", "ReLU", "MaxPool2d"] * 2
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    grads = []
    for m in (ours, keras):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(m(x).float(), y)
        loss.backward()
        grads.append((float(loss), [p.grad.clone() for p in m.parameters()]))
    assert grads[0][0] == grads[1][0]
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_reference_cnn_has_timm_interface():
    model = create_model("reference_cnn", num_classes=3, in_chans=3, img_size=32)
    feats = model.forward_features(torch.zeros(1, 3, 32, 32))
    assert feats.shape[1] == 64
    model.reset_classifier(7)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100", "efficientnet_b0"])
def test_timm_models_by_name(name):
    model = create_model(name, num_classes=4, in_chans=1, img_size=32)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 4)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_builds(name):
    model = create_model(name, num_classes=5, in_chans=3, img_size=32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ImgclsError) as err:
        create_model("resnet_18", num_classes=2)
    assert "resnet18" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ImgclsError, match="reference_cnn"):
        create_model("reference-cnn", num_classes=2)


def test_registry_refuses_duplicates():
    reg = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError):
        reg.register("a")(lambda: 2)


def test_too_small_input_for_reference_cnn_is_a_clear_error():
    with pytest.raises(ImgclsError, match="img-size"):
        create_model("reference_cnn", num_classes=2, in_chans=1, img_size=8)
