"""Plain ``nn.Module`` models behind a spec-string registry."""

from kdistill.models.convnets import ConvNet, LeNet5
from kdistill.models.counting import count_flops, count_parameters
from kdistill.models.mlp import MLP, apply_max_norm
from kdistill.models.outputs import ClassesLast
from kdistill.models.registry import ModelSpec, available, build_model, register
from kdistill.models import caffe_nets  # noqa: F401,E402  registers caffe_lenet, cifar_quick, cifar_mini
from kdistill.models import cifar  # noqa: F401,E402  registers the CRD / mdistiller CIFAR zoo (resnet*, wrn, vgg*)
from kdistill.models import lm  # noqa: F401,E402  registers lm (a small causal transformer language model)

__all__ = [
    "MLP", "ClassesLast", "ConvNet", "LeNet5", "ModelSpec", "apply_max_norm", "available", "build_model", "register",
    "count_flops", "count_parameters",
]
