"""ResNet-20 on CIFAR-10 (He et al. 2016, section 4.2), ResNet-18 as a variant.

ResNet-20: CIFAR layout, three stages of three basic blocks, widths 16/32/64, BatchNorm (272,474
parameters). The paper's recipe: SGD with momentum 0.9, batch 128, learning rate 0.1, weight decay
1e-4 (here an L2 penalty of 5e-5 on the kernels, whose gradient 1e-4 * w is the same update),
4-pixel padding with random crops and horizontal flips, about 182 epochs (64k steps). One change:
a cosine decay of the learning rate instead of the paper's two divisions by 10. The paper reports
91.25% test accuracy (8.75% error); README.md lists what to expect from each variant.

  python -m experiments.cifar10_resnet                                  # ResNet-20
  python -m experiments.cifar10_resnet --config.model.name=resnet56     # the paper's deeper one
  python -m experiments.cifar10_resnet --config.model.name=resnet18 \\
      --config.model.resnet18.layout=cifar                              # the CIFAR ResNet-18
"""

import ml_collections

from jdl import config as config_lib
from jdl import experiment


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.dataset = "cifar10"
  config.model.name = "resnet20"  # resnet20, resnet56 or resnet18
  for name in ("resnet20", "resnet56"):
    config.model[name] = ml_collections.ConfigDict()
    config.model[name].width = 16  # channels of the first stage (x2 per stage)
    config.model[name].normalization = "batch"  # batch, group or layer
  config.model.resnet18 = ml_collections.ConfigDict()
  config.model.resnet18.width = 64
  # "cifar": a 3x3 stride-1 stem without max-pool, the usual ResNet-18 for 32x32 images;
  # "imagenet": the 224x224 model's 7x7 stride-2 stem and pool (poor on 32x32 images).
  config.model.resnet18.layout = "cifar"
  config.model.resnet18.normalization = "batch"
  config.loss = "softmax_cross_entropy"
  config.l2 = 5e-5  # = weight decay 1e-4 on the kernels
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 400  # about one epoch
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 182  # 71k steps of batch 128
  config.augment.crop_padding = 4
  config.augment.flip = True
  return config


def main() -> None:
  experiment.main(get_config, name="cifar10_resnet")


if __name__ == "__main__":
  main()
