"""DeepLabv3+ as SPEC 3 describes it, written here from the SPEC's text as a
function of a state dict under the reference's names
(../shared/testdata/reference_state_dict.txt): a forward pass independent of
deepcam-host's model, for the tests to hold that model against. Inference
only: BatchNorm uses its running statistics. Channel counts come from the
tensors' shapes and the middle blocks from the names, so it serves the small
models of the tests (`width`, `middle_blocks`) as it serves the full one.

At output stride 8 the SPEC gives the encoder's and ASPP's changes; it says
nothing of the decoder, whose x4 path would then reach twice the low-level
map's size. There deepcam-host's choice is followed (deeplabv3plus.cpp): the
second transposed convolution of deconv1 keeps the size (stride 1, output
padding 0)."""

import re

import torch
import torch.nn.functional as F

BN_EPS = 1e-5  # SPEC 3: BatchNorm2d's eps
ASPP_RATES = (1, 6, 12, 18)  # SPEC 3.4 at output stride 16; doubled at 8 (SPEC 3.3)


class StateDict:
    """The tensors by name, keeping which were read, so that a test can check that the forward
    pass used every parameter and statistic of the model."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.used = set()

    def __getitem__(self, name):
        self.used.add(name)
        return self.tensors[name]

    def __contains__(self, name):
        return name in self.tensors

    def unused(self):
        return sorted(n for n in self.tensors if n not in self.used and not n.endswith("num_batches_tracked"))


def batch_norm(sd, prefix, x):
    return F.batch_norm(x, sd[prefix + ".running_mean"], sd[prefix + ".running_var"], sd[prefix + ".weight"],
                        sd[prefix + ".bias"], training=False, eps=BN_EPS)


def separable(sd, prefix, x, stride=1, dilation=1):
    """sep(a->b, s, d): a 3x3 depthwise convolution (groups a, padding d), then a 1x1 a->b."""
    depthwise = sd[prefix + ".conv1.weight"]
    x = F.conv2d(x, depthwise, stride=stride, padding=dilation, dilation=dilation, groups=depthwise.shape[0])
    return F.conv2d(x, sd[prefix + ".pointwise.weight"])


def block(sd, prefix, x, reps, stride, end_relu, is_last=False, dilation=1):
    """SPEC 3.2. The main branch's entries are numbered as the reference's list: a triple (sep,
    BN, ReLU) per repetition, the very last ReLU removed, then the extra separable convolution.
    Whether the first or the last triple changes the channel count (grow_first) is in the
    weights' shapes."""
    entries = []
    for _ in range(reps):
        entries += [("sep", 1, dilation), ("bn",), ("relu",)]
    entries.pop()
    if stride != 1:
        entries.append(("sep", stride, 1))
    elif is_last:
        entries.append(("sep", 1, 1))
    y = x
    for i, entry in enumerate(entries):
        name = f"{prefix}.rep.{i}"
        if entry[0] == "sep":
            y = separable(sd, name, y, entry[1], entry[2])
        elif entry[0] == "bn":
            y = batch_norm(sd, name + ".bn", y)
        else:
            y = F.relu(y)
    if prefix + ".skip.weight" in sd:
        skip = batch_norm(sd, prefix + ".skipbn.bn", F.conv2d(x, sd[prefix + ".skip.weight"], stride=stride))
    else:
        skip = x
    y = y + skip
    return F.relu(y) if end_relu else y


def encoder(sd, x, output_stride):
    """SPEC 3.1 and 3.3: the 2048-channel map at 1/output_stride and the low-level features at
    1/4. At output stride 8: block3 of stride 1, the middle blocks at dilation 2, the exit block
    at 2 and its three separable convolutions at 4 (at 16: 1 and 2)."""
    os8 = output_stride == 8
    p = "xception_features"
    x = F.relu(batch_norm(sd, p + ".bn1.bn", F.conv2d(x, sd[p + ".conv1.weight"], stride=2, padding=1)))
    x = F.relu(batch_norm(sd, p + ".bn2.bn", F.conv2d(x, sd[p + ".conv2.weight"], stride=1, padding=1)))
    numbers = sorted({int(n) for n in re.findall(rf"{p}\.block(\d+)\.", " ".join(sd.tensors))})
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 5, numbers
    x = block(sd, f"{p}.block1", x, reps=2, stride=2, end_relu=False)
    low_level = F.relu(x)
    x = block(sd, f"{p}.block2", low_level, reps=2, stride=2, end_relu=True)
    x = block(sd, f"{p}.block3", x, reps=2, stride=1 if os8 else 2, end_relu=True, is_last=True)
    for n in numbers[3:-1]:  # the middle blocks
        x = block(sd, f"{p}.block{n}", x, reps=3, stride=1, end_relu=True, dilation=2 if os8 else 1)
    x = block(sd, f"{p}.block{numbers[-1]}", x, reps=2, stride=1, end_relu=False, is_last=True,
              dilation=2 if os8 else 1)
    for k in (3, 4, 5):
        x = separable(sd, f"{p}.conv{k}", x, stride=1, dilation=4 if os8 else 2)
        x = F.relu(batch_norm(sd, f"{p}.bn{k}.bn", x))
    return x, low_level


def aspp(sd, x, output_stride):
    """SPEC 3.4: four atrous branches and the image pooling branch, concatenated in that order."""
    p = "bottleneck"
    branches = []
    for k, rate in enumerate(ASPP_RATES, start=1):
        rate = rate if output_stride == 16 or rate == 1 else 2 * rate
        w = sd[f"{p}.aspp{k}.atrous_convolution.weight"]
        padding = 0 if rate == 1 else rate
        y = F.conv2d(x, w, padding=padding, dilation=rate)
        branches.append(F.relu(batch_norm(sd, f"{p}.aspp{k}.bn.bn", y)))
    g = f"{p}.global_avg_pool.global_average_pool"
    pooled = F.conv2d(F.adaptive_avg_pool2d(x, 1), sd[g + ".1.weight"])
    pooled = F.relu(pooled * sd[g + ".2.weights"] + sd[g + ".2.bias"])
    branches.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
    y = F.conv2d(torch.cat(branches, dim=1), sd[p + ".conv.weight"])
    return F.relu(batch_norm(sd, p + ".bn.bn", y))


def up(sd, prefix, x, stride=2):
    """A transposed 3x3 convolution, padding 1, output padding stride - 1: twice the size at
    stride 2."""
    return F.conv_transpose2d(x, sd[prefix + ".weight"], stride=stride, padding=1, output_padding=stride - 1)


def decoder(sd, x, low_level, output_stride):
    """SPEC 3.5."""
    low = F.relu(batch_norm(sd, "bn2.bn", F.conv2d(low_level, sd["conv2.weight"])))
    for k, stride in ((0, 2), (3, 1 if output_stride == 8 else 2)):
        x = F.relu(batch_norm(sd, f"upsample.deconv1.{k + 1}.bn", up(sd, f"upsample.deconv1.{k}", x, stride)))
    x = torch.cat([x, low], dim=1)
    for k in (0, 3):
        x = F.conv2d(x, sd[f"upsample.conv1.{k}.weight"], padding=1)
        x = F.relu(batch_norm(sd, f"upsample.conv1.{k + 1}.bn", x))
    x = F.conv2d(x, sd["upsample.conv1.6.weight"], sd["upsample.conv1.6.bias"])
    x = F.relu(batch_norm(sd, "upsample.deconv2.1.bn", up(sd, "upsample.deconv2.0", x)))
    return up(sd, "upsample.last_deconv.0", x)


def forward(sd, x, output_stride=16):
    """The logits (B, classes, H, W) of inputs (B, channels, H, W)."""
    assert output_stride in (8, 16), output_stride
    features, low_level = encoder(sd, x, output_stride)
    return decoder(sd, aspp(sd, features, output_stride), low_level, output_stride)
