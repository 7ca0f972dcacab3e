"""Built-in encoders: output shapes on MNIST- and digits-sized inputs, the seed tower, validation."""

from __future__ import annotations

import copy

import pytest
import torch

from metriclab import registry
from metriclab.errors import MetricLabError

ENCODERS = ["mlp", "convnet", "resnet18"]


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("input_shape", [(1, 28, 28), (1, 8, 8), (3, 8, 8)])
def test_output_shape(name, input_shape):
    encoder = registry.create("encoder", name, embedding_dim=5, input_shape=input_shape).eval()
    with torch.no_grad():
        out = encoder(torch.rand(2, *input_shape))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ENCODERS)
def test_embedding_dim_zero_rejected(name):
    with pytest.raises(MetricLabError, match="embedding_dim"):
        registry.create("encoder", name, embedding_dim=0, input_shape=(1, 28, 28))


def test_mlp_is_the_seed_siamese_tower_by_default():
    encoder = registry.create("encoder", "mlp", embedding_dim=2, input_shape=(1, 28, 28))
    linear_shapes = [(m.in_features, m.out_features) for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linear_shapes == [(784, 1024), (1024, 1024), (1024, 2)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in encoder.modules()) == 2


def test_convnet_channels_are_configurable():
    encoder = registry.create("encoder", "convnet", embedding_dim=4, input_shape=(1, 28, 28), channels=(3, 5))
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 3), (3, 5)]
    assert encoder(torch.rand(2, 1, 28, 28)).shape == (2, 4)


def test_convnet_default_has_five_stages_down_to_one_pixel():
    encoder = registry.create("encoder", "convnet", embedding_dim=4, input_shape=(1, 28, 28))
    features = encoder[:-3]  # everything before global pooling, flatten and the linear head
    assert sum(isinstance(m, torch.nn.Conv2d) for m in features) == 5
    assert features(torch.rand(1, 1, 28, 28)).shape == (1, 128, 1, 1)


def test_convnet_stages_can_hold_two_convolutions_vgg_style():
    encoder = registry.create(
        "encoder", "convnet", embedding_dim=4, input_shape=(1, 28, 28), channels=(3, 5), convs_per_stage=2
    )
    kinds = [type(m).__name__ for m in encoder]
    stage = ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU"]
    assert kinds == [*stage, *stage, "AdaptiveAvgPool2d", "Flatten", "Linear"]
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 3), (3, 3), (3, 5), (5, 5)]
    assert encoder(torch.rand(2, 1, 28, 28)).shape == (2, 4)
    with pytest.raises(MetricLabError, match="convs_per_stage must be at least 1"):
        registry.create("encoder", "convnet", embedding_dim=4, input_shape=(1, 28, 28), convs_per_stage=0)


def test_convnet_head_can_see_the_whole_last_map_through_dropout():
    shape = (1, 28, 28)  # three ceil-mode pools: 28 -> 14 -> 7 -> 4
    encoder = registry.create(
        "encoder",
        "convnet",
        embedding_dim=4,
        input_shape=shape,
        channels=(3, 5, 6),
        global_pool="flatten",
        drop_rate=0.5,
    )
    assert [type(m).__name__ for m in encoder[-3:]] == ["Flatten", "Dropout", "Linear"]
    assert (encoder[-2].p, encoder[-1].in_features) == (0.5, 6 * 4 * 4)
    images = torch.rand(2, *shape)
    assert encoder(images).shape == (2, 4)
    encoder.eval()
    assert torch.equal(encoder(images), encoder(images))  # dropout acts in training only
    # Without dropout the default head keeps its modules, so weights saved by earlier versions still load.
    default = registry.create("encoder", "convnet", embedding_dim=4, input_shape=shape, channels=(3, 5, 6))
    assert [type(m).__name__ for m in default[-3:]] == ["AdaptiveAvgPool2d", "Flatten", "Linear"]
    for wrong, match in [
        ({"global_pool": "max"}, "global_pool must be 'avg', 'gem' or 'flatten'"),
        ({"drop_rate": 1.0}, "drop_rate"),
    ]:
        with pytest.raises(MetricLabError, match=match):
            registry.create("encoder", "convnet", embedding_dim=4, input_shape=shape, **wrong)


def test_convnet_gem_pooling_is_a_learned_generalized_mean():
    shape = (1, 28, 28)
    encoder = registry.create(
        "encoder", "convnet", embedding_dim=4, input_shape=shape, channels=(3, 5), global_pool="gem"
    )
    gem = encoder[-3]
    assert type(gem).__name__ == "GeneralizedMeanPool" and gem.p.item() == 3.0
    x = torch.rand(2, 5, 7, 7)
    expected = (x.pow(3).sum((2, 3)) / 49).pow(1 / 3)
    torch.testing.assert_close(gem(x).flatten(1), expected)
    with torch.no_grad():
        gem.p.fill_(1.0)
    torch.testing.assert_close(gem(x), torch.nn.functional.adaptive_avg_pool2d(x, 1))  # p = 1: average pooling
    # p is learned with the rest of the network, and half-precision inputs do not overflow in the power.
    encoder(torch.rand(2, *shape)).sum().backward()
    assert gem.p.grad is not None and gem.p.grad != 0
    big = torch.full((1, 1, 2, 2), 300.0, dtype=torch.float16)
    assert gem(big).dtype == torch.float16 and torch.isfinite(gem(big)).all()


def test_resnet18_is_adapted_to_small_single_channel_images():
    encoder = registry.create("encoder", "resnet18", embedding_dim=7, input_shape=(1, 28, 28))
    assert (encoder.conv1.in_channels, encoder.conv1.kernel_size, encoder.conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(encoder.maxpool, torch.nn.Identity)
    assert (encoder.fc.in_features, encoder.fc.out_features) == (512, 7)


def test_convnet_pools_before_relu_with_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    encoder = registry.create("encoder", "convnet", embedding_dim=4, input_shape=(1, 28, 28), channels=(3, 5))
    layers = list(encoder)
    # the textbook order conv-BN-ReLU-pool, with the very same modules
    swapped = torch.nn.Sequential(*layers[0:2], layers[3], layers[2], *layers[4:6], layers[7], layers[6], *layers[8:])
    assert isinstance(layers[2], torch.nn.MaxPool2d) and isinstance(layers[3], torch.nn.ReLU)
    images = torch.randn(6, 1, 28, 28)
    grads = []
    for net in (encoder, swapped):
        net.zero_grad()
        out = net(images)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for ours, textbook in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(ours, textbook, rtol=0, atol=0)


def test_siamese_network_runs_convolutions_channels_last_with_the_same_embeddings(tmp_path):
    from safetensors.torch import save_file

    from metriclab.models import SiameseNetwork, load_weights

    torch.manual_seed(0)
    tower = registry.create("encoder", "convnet", embedding_dim=4, input_shape=(1, 28, 28), channels=(8, 16))
    plain = copy.deepcopy(tower).eval()
    network = SiameseNetwork(tower).eval()
    assert network.towers[0][4].weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(network(images), plain(images), rtol=1e-5, atol=1e-5)
    # the weights still save and load as plain tensors
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, tmp_path / "w.safetensors")
    restored = SiameseNetwork(copy.deepcopy(plain)).eval()
    load_weights(restored, tmp_path / "w.safetensors")
    with torch.no_grad():
        assert torch.equal(restored(images), network(images))
    mlp = SiameseNetwork(registry.create("encoder", "mlp", embedding_dim=2, input_shape=(1, 28, 28)))
    assert mlp.memory_format is None


def test_embed_runs_cache_sized_batches_on_a_cpu_with_the_same_embeddings():
    from metriclab.models import SiameseNetwork, embed
    from metriclab.models.network import CPU_EMBED_BATCH

    torch.manual_seed(0)
    tower = registry.create("encoder", "convnet", embedding_dim=4, input_shape=(1, 8, 8), channels=(4, 8))
    network = SiameseNetwork(tower).train()
    seen = []
    network.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    images = torch.randint(0, 256, (600, 1, 8, 8), dtype=torch.uint8)
    batched = embed(network, images)
    assert seen == [256, 256, 88] and CPU_EMBED_BATCH == 256
    assert network.training  # embedding ran in eval mode and gave the mode back
    whole = embed(network, images, batch_size=600)
    assert batched.dtype == torch.float32 and batched.shape == (600, 4)
    torch.testing.assert_close(batched, whole, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(whole[:5], network.eval()(images[:5].float() / 255), rtol=1e-5, atol=1e-6)
