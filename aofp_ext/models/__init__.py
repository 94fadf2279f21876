"""Reference networks: CIFAR ResNet (option A, loads the shipped weights), VGG-16 (CIFAR),
LeNet-5 with BN (MNIST) and a MobileNetV2-style CIFAR net."""

from .factory import BUILTIN, ModelSpecError, from_spec
from .lenet import lenet5_bn
from .mobilenet import mobilenet_v2_cifar
from .resnet_cifar import resnet20, resnet56, resnet_cifar
from .vgg import vgg16_cifar
from .weights import WeightsFileError, load_pretrained, load_state, read_weights

__all__ = ["resnet_cifar", "resnet20", "resnet56", "load_pretrained", "vgg16_cifar", "lenet5_bn",
           "mobilenet_v2_cifar", "from_spec", "ModelSpecError", "BUILTIN",
           "WeightsFileError", "read_weights", "load_state"]
