"""Graphonomy human parsing: the paper's part masks and binary masks.

The network is Graphonomy's CIHP model as its authors published it (Gong et al.,
CVPR 2019): DeepLab v3+ on an aligned Xception backbone, followed by graph
reasoning. Pixels are pooled into a 7-node PASCAL-Person-Part graph and a 20-node
CIHP graph; the PASCAL graph's nodes are carried over to the CIHP graph (a learned
projection over fixed word-vector affinities, and a feature-similarity transfer),
and the CIHP graph is projected back onto the feature map before the classifier.
The modules and parameters carry the names of the published checkpoint (the model
the authors' inference script loads, ``inference.pth``), so it loads by key name
with strict checking.

Inference follows the authors' demo: pixels scaled to [-1, 1] in BGR order, the
image and its mirror image (left and right labels swapped back), optionally
several scales whose logits are summed, then the argmax.

The annotator writes three masks of the original size: ``parts`` (a palette PNG
whose pixel values are CIHP label ids, with CIHP's colours), ``clothing`` and
``person`` (0 or 255).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from chatroom.components import Annotator, Options, closest
from chatroom.errors import ConfigError, MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import Annotation
from chatroom.plugins.weights import checkpoint_file, torch_device, unreadable

log = logging.getLogger(__name__)

EXTRA = "torch"
CHECKPOINT_FILE = "inference.pth"
# Beside a checkpoint: constructor arguments other than the published ones (only
# the smoke model writes one).
CONFIG_FILE = "graphonomy.json"
MODEL = "Graphonomy (CIHP, DeepLab v3+ Xception with graph transfer)"

# CIHP's 20 labels, in the order of the classifier's outputs.
LABELS = (
    "background",
    "hat",
    "hair",
    "glove",
    "sunglasses",
    "upper_clothes",
    "dress",
    "coat",
    "socks",
    "pants",
    "torso_skin",
    "scarf",
    "skirt",
    "face",
    "left_arm",
    "right_arm",
    "left_leg",
    "right_leg",
    "left_shoe",
    "right_shoe",
)
# CIHP's colour for each label (the dataset's and the authors' visualisation).
PALETTE = (
    (0, 0, 0),
    (128, 0, 0),
    (255, 0, 0),
    (0, 85, 0),
    (170, 0, 51),
    (255, 85, 0),
    (0, 0, 85),
    (0, 119, 221),
    (85, 85, 0),
    (0, 85, 85),
    (85, 51, 0),
    (52, 86, 128),
    (0, 128, 0),
    (0, 0, 255),
    (51, 170, 221),
    (0, 255, 255),
    (85, 255, 170),
    (170, 255, 85),
    (255, 255, 0),
    (255, 170, 0),
)
CLOTHING = (
    "hat",
    "glove",
    "upper_clothes",
    "dress",
    "coat",
    "socks",
    "pants",
    "scarf",
    "skirt",
    "left_shoe",
    "right_shoe",
)
# A mirrored image shows left parts as right ones: the label each output becomes.


def _mirrored(name: str) -> str:
    for side, other in (("left_", "right_"), ("right_", "left_")):
        if name.startswith(side):
            return other + name.removeprefix(side)
    return name


MIRROR = tuple(LABELS.index(_mirrored(name)) for name in LABELS)

# The two label graphs: which labels touch (each edge once).
# fmt: off
CIHP_EDGES = (
    (1, 2), (1, 13), (2, 13), (3, 14), (3, 15), (4, 13),
    (5, 6), (5, 7), (5, 9), (5, 10), (5, 11), (5, 12), (5, 14), (5, 15),
    (6, 7), (6, 10), (6, 11), (6, 14), (6, 15), (6, 16), (6, 17),
    (7, 9), (7, 10), (7, 11), (7, 12), (7, 14), (7, 15),
    (8, 16), (8, 17), (8, 18), (8, 19),
    (9, 10), (9, 16), (9, 17), (9, 18), (9, 19),
    (10, 11), (10, 12), (10, 13), (10, 14), (10, 15), (10, 16), (10, 17),
    (11, 13), (12, 16), (12, 17), (16, 18), (17, 19),
)
# PASCAL-Person-Part's 7 labels (background, head, torso, upper arms, lower arms,
# upper legs, lower legs); every node also links to itself in the published graph.
PASCAL_EDGES = ((0, 0), (1, 1), (1, 2), (2, 2), (2, 3), (2, 5), (3, 3), (3, 4),
                (4, 4), (5, 5), (5, 6), (6, 6))
# How related each PASCAL label (row) is to each CIHP label (column): the cosine
# similarity of their names' word vectors, as published with the model.
PASCAL_TO_CIHP = (
    (1.0, 0.35333052, 0.32727194, 0.17418084, 0.18757584, 0.40608522, 0.37503981,
     0.35448462, 0.22598555, 0.23893579, 0.33064262, 0.28923404, 0.27986573,
     0.4211553, 0.36915778, 0.41377746, 0.32485771, 0.37248222, 0.36865639,
     0.41500332),
    (0.39615879, 0.46201529, 0.52321467, 0.30826114, 0.25669527, 0.54747773,
     0.3670523, 0.3901983, 0.27519473, 0.3433325, 0.52728509, 0.32771333,
     0.34819325, 0.63882953, 0.68042925, 0.69368576, 0.63395791, 0.65344337,
     0.59538781, 0.6071375),
    (0.16373166, 0.21663339, 0.3053872, 0.28377612, 0.1372435, 0.4448808,
     0.29479995, 0.31092595, 0.22703953, 0.33983576, 0.75778818, 0.2619818,
     0.37069392, 0.35184867, 0.49877512, 0.49979437, 0.51853277, 0.52517541,
     0.32517741, 0.32377309),
    (0.32687232, 0.38482461, 0.37693463, 0.41610834, 0.20415749, 0.76749079,
     0.35139853, 0.3787411, 0.28411737, 0.35155421, 0.58792618, 0.31141718,
     0.40585111, 0.51189218, 0.82042737, 0.8342413, 0.70732188, 0.72752501,
     0.60327325, 0.61431337),
    (0.34069369, 0.34817292, 0.37525998, 0.36497069, 0.17841617, 0.69746208,
     0.31731463, 0.34628951, 0.25167277, 0.32072379, 0.56711286, 0.24894776,
     0.37000453, 0.52600859, 0.82483993, 0.84966274, 0.7033991, 0.73449378,
     0.56649608, 0.58888791),
    (0.28477487, 0.35139564, 0.42742352, 0.41664321, 0.20004676, 0.78566833,
     0.42237487, 0.41048549, 0.37933812, 0.46542516, 0.62444759, 0.3274493,
     0.49466009, 0.49314658, 0.71244233, 0.71497003, 0.8234787, 0.83566589,
     0.62597135, 0.62626812),
    (0.3011378, 0.31775977, 0.42922647, 0.36896257, 0.17597556, 0.72214655,
     0.39162804, 0.38137872, 0.34980296, 0.43818419, 0.60879174, 0.26762545,
     0.46271161, 0.51150476, 0.72318109, 0.73678399, 0.82620388, 0.84942166,
     0.5943811, 0.60607602),
)
# fmt: on


def normalized_adjacency(edges, nodes: int):
    """D^-1/2 (A + I) D^-1/2 of an undirected graph, as a float32 numpy array."""
    import numpy as np

    adjacency = np.zeros((nodes, nodes), dtype=np.float64)
    for a, b in edges:
        adjacency[a, b] = adjacency[b, a] = 1.0
    adjacency += np.eye(nodes)
    degree = adjacency.sum(axis=1)
    scale = np.where(degree > 0, degree**-0.5, 0.0)
    return (adjacency * scale[:, None] * scale[None, :]).astype(np.float32)


# --- the network -------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """Constructor arguments. The defaults are the published CIHP model's; only a
    smoke model narrows it, and says so in graphonomy.json beside its checkpoint."""

    n_classes: int = 20
    source_classes: int = 7
    hidden_layers: int = 128
    # The Xception's widths: entry flow, middle flow, exit flow.
    entry: tuple[int, int, int, int, int] = (32, 64, 128, 256, 728)
    middle_blocks: int = 16
    exit: tuple[int, int, int, int] = (1024, 1536, 1536, 2048)
    aspp: int = 256
    low_level: int = 48

    @classmethod
    def read(cls, folder: Path) -> Architecture:
        path = folder / CONFIG_FILE
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            known = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
            return cls(**known)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not a Graphonomy architecture: {exc}") from None

    def write(self, folder: Path) -> None:
        raw = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}
        (folder / CONFIG_FILE).write_text(json.dumps(raw, indent=1), encoding="utf-8")


@functools.cache
def network_class():
    """The network's torch module class (torch is imported only when asked for)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def upsample(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    class SeparableConv(nn.Module):
        """A depthwise 3x3 convolution and a pointwise 1x1 one, each followed by batch
        norm (and a ReLU in the head's version); padded to keep the size."""

        def __init__(self, c_in, c_out, stride=1, dilation=1, relu=False):
            super().__init__()
            self.depthwise = nn.Conv2d(
                c_in, c_in, 3, stride, dilation, dilation, groups=c_in, bias=False
            )
            self.depthwise_bn = nn.BatchNorm2d(c_in)
            self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
            self.pointwise_bn = nn.BatchNorm2d(c_out)
            self.relu = relu

        def forward(self, x):
            x = self.depthwise_bn(self.depthwise(x))
            if self.relu:
                x = F.relu(x)
            x = self.pointwise_bn(self.pointwise(x))
            return F.relu(x) if self.relu else x

    class XceptionBlock(nn.Module):
        """Separable convolutions with ReLUs between them, plus a (projected) skip.

        The published blocks start with an in-place ReLU, so the skip sees the
        activated input too; that is kept, the weights depend on it.
        """

        def __init__(
            self,
            c_in,
            c_out,
            reps,
            stride=1,
            dilation=1,
            start_with_relu=True,
            grow_first=True,
            is_last=False,
            split_last=False,
        ):
            super().__init__()
            self.start_with_relu = start_with_relu
            if c_in != c_out or stride != 1:
                self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
                self.skipbn = nn.BatchNorm2d(c_out)
            else:
                self.skip = None
            width = c_out if grow_first else c_in
            shapes = [(c_in, c_out)] if grow_first else []
            shapes += [(width, width)] * (reps - 1)
            shapes += [] if grow_first else [(c_in, c_out)]
            layers = []
            for a, b in shapes:
                layers += [nn.ReLU(), SeparableConv(a, b, 1, dilation)]
            last = SeparableConv(c_out, c_out, stride, dilation)
            self.split_last = split_last
            if split_last:
                # the second entry block keeps its features before the strided
                # convolution: they are the decoder's low-level features
                self.block2_lastconv = nn.Sequential(nn.ReLU(), last)
            elif stride != 1 or is_last:
                layers += [nn.ReLU(), last]
            if not start_with_relu:
                layers = layers[1:]
            self.rep = nn.Sequential(*layers)

        def forward(self, x):
            if self.start_with_relu:
                x = F.relu(x)
            out = self.rep(x)
            low_level = out
            if self.split_last:
                out = self.block2_lastconv(out)
            skip = x if self.skip is None else self.skipbn(self.skip(x))
            out = out + skip
            return (out, low_level) if self.split_last else out

    class Xception(nn.Module):
        """The aligned Xception backbone at output stride 16."""

        def __init__(self, arch: Architecture):
            super().__init__()
            c1, c2, c3, c4, c5 = arch.entry
            e1, e2, e3, e4 = arch.exit
            self.conv1 = nn.Conv2d(3, c1, 3, stride=2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c1)
            self.conv2 = nn.Conv2d(c1, c2, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c2)
            self.block1 = XceptionBlock(c2, c3, 2, stride=2, start_with_relu=False)
            self.block2 = XceptionBlock(c3, c4, 2, stride=2, split_last=True)
            self.block3 = XceptionBlock(c4, c5, 2, stride=2)
            self.middle = [f"block{4 + i}" for i in range(arch.middle_blocks)]
            for name in self.middle:
                setattr(self, name, XceptionBlock(c5, c5, 3))
            self.exit_name = f"block{4 + arch.middle_blocks}"
            setattr(
                self,
                self.exit_name,
                XceptionBlock(c5, e1, 2, grow_first=False, is_last=True),
            )
            self.conv3 = SeparableConv(e1, e2, dilation=2, relu=True)
            self.conv4 = SeparableConv(e2, e3, dilation=2, relu=True)
            self.conv5 = SeparableConv(e3, e4, dilation=2, relu=True)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(x)))
            x = self.block1(x)
            x, low_level = self.block2(x)
            x = self.block3(x)
            for name in (*self.middle, self.exit_name):
                x = getattr(self, name)(x)
            return self.conv5(self.conv4(self.conv3(x))), low_level

    class Head(nn.Module):
        """An ASPP branch or a decoder layer: a 1x1 convolution with batch norm, or
        a (dilated) separable 3x3 one."""

        def __init__(self, c_in, c_out, rate=1, separable=True):
            super().__init__()
            if separable:
                self.atrous_convolution = SeparableConv(
                    c_in, c_out, dilation=rate, relu=True
                )
            else:
                self.atrous_convolution = nn.Conv2d(c_in, c_out, 1, bias=False)
                self.bn = nn.BatchNorm2d(c_out)

        def forward(self, x):
            x = self.atrous_convolution(x)
            return F.relu(self.bn(x)) if hasattr(self, "bn") else x

    class GraphConvolution(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(c_in, c_out))
            nn.init.xavier_uniform_(self.weight)

        def forward(self, nodes, adjacency=None):
            out = nodes @ self.weight
            if adjacency is not None:
                out = adjacency @ out
            return F.relu(out)

    class PixelsToGraph(nn.Module):
        """Soft-assign pixels to nodes and pool their projected features."""

        def __init__(self, channels, hidden, nodes):
            super().__init__()
            self.pre_fea = nn.Parameter(torch.empty(channels, nodes))
            self.weight = nn.Parameter(torch.empty(channels, hidden))
            for p in self.parameters():
                nn.init.xavier_uniform_(p)

        def forward(self, x):
            pixels = x.flatten(2).transpose(1, 2)  # n x hw x c
            assign = F.softmax(pixels @ self.pre_fea, dim=-1)
            return F.relu(assign.transpose(1, 2) @ (pixels @ self.weight))

    class GraphToPixels(nn.Module):
        """Spread node features back over the pixels: each pixel attends over the
        nodes by a score from its own features and the node's."""

        def __init__(self, channels, c_out, hidden):
            super().__init__()
            self.node_fea_for_res = nn.Parameter(torch.empty(channels, 1))
            self.node_fea_for_hidden = nn.Parameter(torch.empty(hidden, 1))
            self.weight = nn.Parameter(torch.empty(hidden, c_out))
            for p in self.parameters():
                nn.init.xavier_uniform_(p)

        def forward(self, nodes, x):
            n, c, h, w = x.shape
            pixels = x.flatten(2).transpose(1, 2)  # n x hw x c
            score = pixels @ self.node_fea_for_res + (
                nodes @ self.node_fea_for_hidden
            ).transpose(1, 2)
            attention = F.softmax(score, dim=-1)  # n x hw x nodes
            out = attention @ (nodes @ self.weight)  # n x hw x c_out
            return F.relu(out.transpose(1, 2).reshape(n, -1, h, w))

    class GraphTransfer(nn.Module):
        """Carry source-graph nodes to target nodes through row-softmaxed affinities."""

        def __init__(self, hidden, source_nodes, target_nodes):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(hidden, hidden))
            self.adj = nn.Parameter(torch.empty(target_nodes, source_nodes))
            for p in self.parameters():
                nn.init.xavier_uniform_(p)

        def forward(self, nodes, affinity):
            weights = F.softmax(F.relu(affinity), dim=-1)
            return F.relu(weights @ (nodes @ self.weight))

    class Graphonomy(nn.Module):
        """DeepLab v3+ (Xception) with Graphonomy's PASCAL -> CIHP graph transfer."""

        def __init__(self, arch: Architecture | None = None):
            super().__init__()
            arch = arch or Architecture()
            self.arch = arch
            deep, low, aspp = arch.exit[-1], arch.entry[3], arch.aspp
            hidden = arch.hidden_layers
            self.xception_features = Xception(arch)
            self.aspp1 = Head(deep, aspp, separable=False)
            for number, rate in ((2, 6), (3, 12), (4, 18)):
                setattr(self, f"aspp{number}", Head(deep, aspp, rate))
            self.global_avg_pool = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(deep, aspp, 1, bias=False),
                nn.BatchNorm2d(aspp),
                nn.ReLU(),
            )
            self.concat_projection_conv1 = nn.Conv2d(5 * aspp, aspp, 1, bias=False)
            self.concat_projection_bn1 = nn.BatchNorm2d(aspp)
            self.feature_projection_conv1 = nn.Conv2d(
                low, arch.low_level, 1, bias=False
            )
            self.feature_projection_bn1 = nn.BatchNorm2d(arch.low_level)
            self.decoder = nn.Sequential(
                Head(aspp + arch.low_level, aspp), Head(aspp, aspp)
            )

            target, source = arch.n_classes, arch.source_classes
            self.target_featuremap_2_graph = PixelsToGraph(aspp, hidden, target)
            self.target_graph_conv1 = GraphConvolution(hidden, hidden)
            self.target_graph_conv2 = GraphConvolution(hidden, hidden)
            self.target_graph_conv3 = GraphConvolution(hidden, hidden)
            self.target_graph_2_fea = GraphToPixels(aspp, aspp, hidden)
            self.target_skip_conv = nn.Sequential(nn.Conv2d(aspp, aspp, 1), nn.ReLU())
            self.source_featuremap_2_graph = PixelsToGraph(aspp, hidden, source)
            self.source_graph_conv1 = GraphConvolution(hidden, hidden)
            self.source_graph_conv2 = GraphConvolution(hidden, hidden)
            # in the published checkpoint but unused: its forward pass applies
            # source_graph_conv2 twice, and the weights were trained that way
            self.source_graph_conv3 = GraphConvolution(hidden, hidden)
            self.transpose_graph = GraphTransfer(hidden, source, target)
            self.fc_graph = GraphConvolution(3 * hidden, hidden)
            self.semantic = nn.Conv2d(aspp, target, 1)

            self.register_buffer(
                "adj_target",
                torch.from_numpy(normalized_adjacency(CIHP_EDGES, target)),
                persistent=False,
            )
            self.register_buffer(
                "adj_source",
                torch.from_numpy(normalized_adjacency(PASCAL_EDGES, source)),
                persistent=False,
            )
            self.register_buffer(
                "adj_transfer",
                torch.tensor(PASCAL_TO_CIHP, dtype=torch.float32).T.contiguous(),
                persistent=False,
            )

        @staticmethod
        def similarity_transfer(source, target):
            similarity = F.normalize(target, dim=-1) @ F.normalize(
                source, dim=-1
            ).transpose(-1, -2)
            return F.softmax(similarity, dim=-1) @ source

        def forward(self, image):
            x, low_level = self.xception_features(image)
            branches = [getattr(self, f"aspp{i}")(x) for i in (1, 2, 3, 4)]
            pooled = upsample(self.global_avg_pool(x), branches[-1].shape[2:])
            x = torch.cat([*branches, pooled], dim=1)
            x = F.relu(self.concat_projection_bn1(self.concat_projection_conv1(x)))
            x = upsample(x, low_level.shape[2:])
            low_level = self.feature_projection_conv1(low_level)
            low_level = F.relu(self.feature_projection_bn1(low_level))
            x = self.decoder(torch.cat([x, low_level], dim=1))

            # graph reasoning: PASCAL nodes -> CIHP nodes, three rounds
            source = self.source_featuremap_2_graph(x)
            source1 = self.source_graph_conv1(source, self.adj_source)
            source2 = self.source_graph_conv2(source1, self.adj_source)
            source3 = self.source_graph_conv2(source2, self.adj_source)
            target = self.target_featuremap_2_graph(x)
            rounds = zip(
                (source1, source2, source3),
                (
                    self.target_graph_conv1,
                    self.target_graph_conv2,
                    self.target_graph_conv3,
                ),
                strict=True,
            )
            for source_nodes, convolution in rounds:
                projected = self.transpose_graph(source_nodes, self.adj_transfer)
                similar = self.similarity_transfer(source_nodes, target)
                target = self.fc_graph(torch.cat([target, similar, projected], -1))
                target = convolution(target, self.adj_target)

            x = self.target_skip_conv(x) + self.target_graph_2_fea(target, x)
            return upsample(self.semantic(x), image.shape[2:])

    return Graphonomy


# --- loading -------------------------------------------------------------------------


def checkpoint_path(value: str, where: str) -> Path:
    """The checkpoint file ``value`` names (the file, or a folder holding it)."""
    hint = (
        f"set checkpoint to Graphonomy's CIHP model ({CHECKPOINT_FILE}, the file the "
        "authors' inference script loads) or a folder holding it"
    )
    return checkpoint_file(value, where, CHECKPOINT_FILE, hint)


def published_state(raw: dict) -> dict:
    """A checkpoint's tensors by module name: a DataParallel ``module.`` prefix off,
    BatchNorm's batch counters (absent from the published file) left out."""
    if "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    return {
        key.removeprefix("module."): value
        for key, value in raw.items()
        if not key.endswith("num_batches_tracked")
    }


def load_network(path: Path, where: str, device: str = "cpu"):
    """Build the network (defaults, or graphonomy.json beside the file) and load the
    checkpoint strictly by key name."""
    import torch

    arch = Architecture.read(path.parent)
    network = network_class()(arch)
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the same problem to the user
        raise ConfigError(
            f"{where}: option 'checkpoint' = {str(path)!r} is not a torch checkpoint "
            f"({unreadable(exc)}); expected Graphonomy's {CHECKPOINT_FILE}"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: checkpoint {str(path)!r} holds no state dict")
    state = published_state(raw)
    expected = set(network.state_dict()) - {
        k for k in network.state_dict() if k.endswith("num_batches_tracked")
    }
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ConfigError(
            f"{where}: checkpoint {str(path)!r} is not Graphonomy's CIHP model: {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise ConfigError(f"{where}: checkpoint {str(path)!r}: {first}") from None
    return network.to(device).eval()


# --- inference -----------------------------------------------------------------------


class GraphonomyParser:
    """Graphonomy loaded on first use; ``parse(image)`` gives the label map.

    ``parse`` is the whole model step, usable on its own (for example to time the
    model per image).
    """

    def __init__(self, where: str, options):
        self.where = where
        self.options = options
        self._network = None
        self.path: Path | None = None

    def load(self):
        if self._network is None:
            try:
                import torch  # noqa: F401
            except ImportError:
                raise MissingDependency("torch", EXTRA, self.where) from None
            path = checkpoint_path(self.options.checkpoint, self.where)
            self._network = load_network(
                path, self.where, torch_device(self.options.device)
            )
            self.path = path
            log.info(
                "loaded Graphonomy %s on %s", path, torch_device(self.options.device)
            )
        return self._network

    def parse(self, image):
        """CIHP label ids (H x W uint8 numpy array) of an image, at its own size."""
        import numpy as np
        import torch
        import torch.nn.functional as F
        from PIL import Image

        network = self.load()
        device = next(network.parameters()).device
        rgb = image.convert("RGB")
        width, height = rgb.size
        mirror = torch.tensor(MIRROR, device=device)
        total = None
        for scale in self.options.scales:
            size = (max(1, int(width * scale)), max(1, int(height * scale)))
            scaled = rgb if size == rgb.size else rgb.resize(size, Image.BILINEAR)
            pixels = np.asarray(scaled, dtype=np.float32) * (2.0 / 255.0) - 1.0
            batch = torch.from_numpy(pixels[:, :, ::-1].copy()).permute(2, 0, 1)[None]
            if self.options.flip:
                batch = torch.cat([batch, batch.flip(-1)])
            with torch.no_grad():
                logits = network(batch.to(device))
                if self.options.flip:
                    # the mirror's left labels are the image's right ones
                    back = logits[1:, mirror].flip(-1)
                    logits = (logits[:1] + back) / 2
                logits = F.interpolate(
                    logits, size=(height, width), mode="bilinear", align_corners=True
                )
            total = logits if total is None else total + logits
        return total[0].argmax(0).to(torch.uint8).cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {
            "model": MODEL,
            "checkpoint": str(self.path or self.options.checkpoint),
            "scales": list(self.options.scales),
            "flip": self.options.flip,
        }

    def close(self) -> None:
        self._network = None


def label_image(labels):
    """A palette PNG image of label ids, coloured as CIHP's visualisations are."""
    from PIL import Image

    image = Image.fromarray(labels)  # "L"; putpalette makes it "P", values kept
    flat = [value for colour in PALETTE for value in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


# --- smoke checkpoint ------------------------------------------------------------------


def write_smoke_checkpoint(
    folder: str | Path, seed: int = 1234, arch: Architecture | None = None
) -> Path:
    """Write random weights in the published layout as ``folder/inference.pth``.

    With the published architecture (the default) no graphonomy.json is written,
    exactly as a downloaded checkpoint comes; a narrowed one writes its arguments.
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = arch or Architecture()
    torch.manual_seed(seed)
    network = network_class()(arch)
    state = published_state(network.state_dict())
    path = folder / CHECKPOINT_FILE
    torch.save(state, str(path))
    if arch != Architecture():
        arch.write(folder)
    return path


# --- the component -------------------------------------------------------------------


class GraphonomyOptions(Options):
    checkpoint: str = Field(
        "",
        description=f"Graphonomy's CIHP checkpoint ({CHECKPOINT_FILE}, as the authors "
        "publish it), or a folder holding it; not downloaded.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    scales: list[float] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="Scales the image is parsed at, logits summed; the authors' demo "
        "uses 1, 0.5, 0.75, 1.25, 1.5 and 1.75.",
    )
    flip: bool = Field(
        True, description="Also parse the mirror image and average (as the demo does)."
    )
    clothing: list[str] = Field(
        default_factory=lambda: list(CLOTHING),
        description="CIHP labels that make up the clothing mask.",
    )
    min_person_share: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="Reject the image when the person mask covers less of it.",
    )

    @field_validator("scales")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(not 0 < s <= 4 for s in value):
            raise ValueError("scales must lie in (0, 4]")
        return value

    @field_validator("clothing")
    @classmethod
    def _known_labels(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in LABELS or name == "background":
                raise ValueError(
                    f"unknown clothing label {name!r}{closest(name, LABELS)}; CIHP "
                    f"labels: {', '.join(LABELS[1:])}"
                )
        return value


class GraphonomyAnnotator(Annotator):
    name = "graphonomy"
    description = "CIHP part masks, a clothing mask and a person mask (Graphonomy)"
    Options = GraphonomyOptions
    requires = (("torch", "chatroom[torch]"),)

    def __init__(self, options, context):
        super().__init__(options, context)
        self.parser = GraphonomyParser(f"annotators ({self.name})", options)
        self.clothing_ids = [LABELS.index(name) for name in options.clothing]

    def annotate(self, candidates, verdicts) -> list[Annotation]:
        return [self._one(candidate.image) for candidate in candidates]

    def _one(self, image) -> Annotation:
        import numpy as np
        from PIL import Image

        if image is None:
            return Annotation(rejected="no image")
        labels = self.parser.parse(image)
        person = labels > 0
        clothing = np.isin(labels, self.clothing_ids)
        qa = {
            "labels": list(LABELS),
            "person_share": round(float(person.mean()), 4),
            "clothing_share": round(float(clothing.mean()), 4),
        }
        masks = {
            "parts": label_image(labels),
            "clothing": Image.fromarray(clothing.astype(np.uint8) * 255),
            "person": Image.fromarray(person.astype(np.uint8) * 255),
        }
        rejected = None
        if qa["person_share"] < self.options.min_person_share:
            rejected = "person mask is empty"
        return Annotation(masks=masks, qa=qa, rejected=rejected)

    def describe(self):
        return self.parser.describe()

    def close(self) -> None:
        self.parser.close()


@hookimpl
def register_annotators(register):
    register(GraphonomyAnnotator)
