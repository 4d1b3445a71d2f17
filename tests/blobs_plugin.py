"""A user's own CNN, TensorDataset and method, registered as a --plugin file would (tests)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import fastl2r
from fastl2r.methods import Learner, Method
from fastl2r.models import MultiHeadNet


class SmallCNN(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.norm(self.conv1(x))))).mean((2, 3))


def blobs(per_class, seed):
    """Six classes of 1x16x16 images in [0, 1]: a bright 4x4 square at a place of the class's own."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(6).repeat_interleave(per_class)
    images = 0.3 * torch.rand(len(labels), 1, 16, 16, generator=g)
    for i, c in enumerate(labels.tolist()):
        row, col = divmod(c, 3)
        images[i, 0, 2 + 6 * row:6 + 6 * row, 2 + 5 * col:6 + 5 * col] += 0.7
    return TensorDataset(images, labels)


class MomentumLearner(Learner):
    def __init__(self, model, lr, momentum):
        super().__init__(model)
        self.lr, self.momentum = lr, momentum

    def begin_task(self, task_index, task):
        super().begin_task(task_index, task)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum)

    def step(self, new, old):
        loss = F.cross_entropy(self.model.heads[self.task_index](self.model(new.x)), new.y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


class Momentum(Method):
    def learner(self, model, run):
        return MomentumLearner(model, self.options["lr"], self.options["momentum"])


fastl2r.register_architecture("small_cnn", lambda in_channels, heads: MultiHeadNet(SmallCNN(in_channels), 16, heads))
fastl2r.register_dataset("blobs", (blobs(40, 0), blobs(15, 1)),
                         split=fastl2r.ClassSplit(source=(0, 1), meta_train=(2, 3), meta_test=(4, 5), ways=1))
fastl2r.register_method("momentum", Momentum, options={"lr": 0.05, "momentum": 0.9})
