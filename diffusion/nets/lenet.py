"""A small LeNet-style classifier whose penultimate layer is the feature space of our offline FID.

conv(5x5, 16) - maxpool - conv(5x5, 32) - maxpool - fc 256 - fc 128 - fc 10, ReLU between; about 250k
parameters. Input: (N, in_channels, image_size, image_size) images in [-1, 1]: (N, 1, 28, 28) for
MNIST, (N, 3, 32, 32) for CIFAR-10.
"""

import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_DIM = 128


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 5, padding=2)  # 28x28 -> pool -> 14x14
        self.conv2 = nn.Conv2d(16, 32, 5)  # 14x14 -> 10x10 -> pool -> 5x5
        side = (image_size // 2 - 4) // 2
        self.fc1 = nn.Linear(32 * side * side, 256)
        self.fc2 = nn.Linear(256, FEATURE_DIM)
        self.fc3 = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (N, 128), after the ReLU, as Inception's pool3 features are."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return F.relu(self.fc2(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.features(x))
