"""Networks that are not DigitsCNN, given to `kiln optimize` as file.py:factory (+ data functions).

Tiny widths so CI stays fast; the architectures carry what generic tooling must handle: BatchNorm and
skip connections (ResNet), depthwise convs / inverted residuals / hardswish / squeeze-excite
(MobileNetV2), embeddings / multi-head attention / LayerNorm (transformer encoder), and a plain MLP on a
bundled tabular data set.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- ResNet-style


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, width: int = 8, depth: int = 2, num_classes: int = 10, in_channels: int = 1,
                 layers: tuple = (1, 1, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for i in range(depth):
            cout = width * 2**i
            for j in range(layers[i] if i < len(layers) else 1):
                blocks.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def resnet(width: int = 8, depth: int = 2, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return ResNet(width, depth, num_classes, in_channels)


def resnet18(num_classes: int = 1000) -> nn.Module:
    """ResNet-18's shape: widths 64-512, [2, 2, 2, 2] blocks, 7x7 stem + max-pool, at 3x224x224."""
    torch.manual_seed(0)
    net = ResNet(64, 4, num_classes, 3, layers=(2, 2, 2, 2))
    net.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    return net.eval()


# --------------------------------------------------------------------------- MobileNetV2-style


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, reduce: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(ch, max(ch // reduce, 8), 1)
        self.fc2 = nn.Conv2d(max(ch // reduce, 8), ch, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),
                  nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish()]
        if se:
            layers.append(SqueezeExcite(hidden))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2(nn.Module):
    # (expand, out, repeats, stride, squeeze-excite) per stage, scaled by `width` / 16
    STAGES = ((1, 16, 1, 1, False), (6, 24, 2, 2, False), (6, 32, 3, 2, True), (6, 64, 4, 2, True),
              (6, 96, 3, 1, True), (6, 160, 3, 2, True), (6, 320, 1, 1, False))

    def __init__(self, width: int = 16, stages: int = 7, num_classes: int = 10, in_channels: int = 3, stem_stride: int = 2,
                 last: int = 1280):
        super().__init__()
        scale = width / 16
        c = max(8, int(32 * scale))
        feats = [nn.Conv2d(in_channels, c, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(c), nn.Hardswish()]
        for expand, out, reps, stride, se in self.STAGES[:stages]:
            out = max(8, int(out * scale))
            for r in range(reps):
                feats.append(InvertedResidual(c, out, stride if r == 0 else 1, expand, se))
                c = out
        last = max(16, int(last * scale)) if last else c
        feats += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.Hardswish()]
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def mobilenet(width: int = 4, stages: int = 3, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A tiny MobileNetV2-style net for 8x8 digits (stem stride 1, few stages, small head)."""
    torch.manual_seed(0)
    return MobileNetV2(width, stages, num_classes, in_channels, stem_stride=1, last=128)


def mobilenet_v2(num_classes: int = 1000) -> nn.Module:
    """MobileNetV2's full shape (width 1.0, 7 stages, 1280 head; squeeze-excite on the middle stages)."""
    torch.manual_seed(0)
    return MobileNetV2(16, 7, num_classes, 3).eval()


# --------------------------------------------------------------------------- transformer encoder


class TokenClassifier(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 32, heads: int = 4, depth: int = 1, seq: int = 12, num_classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq, dim))
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(dim), "attn": nn.MultiheadAttention(dim, heads, batch_first=True),
                "ln2": nn.LayerNorm(dim), "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
            }))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos
        for layer in self.layers:
            h = layer["ln1"](x)
            x = x + layer["attn"](h, h, h, need_weights=False)[0]
            x = x + layer["mlp"](layer["ln2"](x))
        return self.head(self.norm(x).mean(1))


def transformer(vocab: int = 32, dim: int = 32, heads: int = 4, depth: int = 1, seq: int = 12, num_classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return TokenClassifier(vocab, dim, heads, depth, seq, num_classes)


def tokens_data():
    """Token sequences; class 1 when token 7 occurs more often than token 3 (needs attention over the sequence)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 32, size=(600, 12)).astype(np.int64)
    y = ((x == 7).sum(1) > (x == 3).sum(1)).astype(np.int64)
    return {"tokens": x}, y


# --------------------------------------------------------------------------- MLP on tabular data


def mlp(features: int = 13, hidden: int = 64, depth: int = 2, num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    layers, c = [], features
    for _ in range(depth):
        layers += [nn.Linear(c, hidden), nn.ReLU()]
        c = hidden
    return nn.Sequential(*layers, nn.Linear(c, num_classes))


def wine_data():
    from sklearn.datasets import load_wine

    d = load_wine()
    x = d.data.astype(np.float32)
    x = (x - x.mean(0)) / x.std(0)
    return {"features": x.astype(np.float32)}, d.target.astype(np.int64)


def digits_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    return {"image": (d.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)}, d.target.astype(np.int64)


def raises(**kwargs) -> nn.Module:
    raise RuntimeError("this factory always fails")


def not_a_module():
    return 42


def wine_regression_data():
    """Wine's first feature (alcohol) regressed from the other twelve: float labels (N, 1)."""
    from sklearn.datasets import load_wine

    x = load_wine().data.astype(np.float32)
    x = (x - x.mean(0)) / x.std(0)
    return {"features": np.ascontiguousarray(x[:, 1:])}, np.ascontiguousarray(x[:, :1])
