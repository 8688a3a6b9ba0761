"""Our axial26s loads a state dict in the PyTorch ImageNet port's layout and reproduces that
port's forward math, computed here independently from the port's own equations."""

import torch
import torch.nn.functional as F

import axial_deeplab
from axial_deeplab.models.weights import convert_port_state_dict, is_port_state_dict

GROUPS = 8


def _bn(x, sd, prefix, eps=1e-5):
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - sd[prefix + "running_mean"].view(shape)) / torch.sqrt(
        sd[prefix + "running_var"].view(shape) + eps
    ) * sd[prefix + "weight"].view(shape) + sd[prefix + "bias"].view(shape)


def port_axial_attention(x, sd, p, K, width, stride):
    """The port's AxialAttention.forward in eval mode, written from its equations."""
    if width:
        x = x.permute(0, 2, 1, 3)
    else:
        x = x.permute(0, 3, 1, 2)
    N, W, C, H = x.shape
    assert H == K, "the port only runs at its training size"
    x = x.reshape(N * W, C, H)
    qkv = _bn(F.conv1d(x, sd[p + "qkv_transform.weight"]), sd, p + "bn_qkv.")
    out_planes = sd[p + "qkv_transform.weight"].shape[0] // 2
    gp = out_planes // GROUPS
    q, k, v = torch.split(qkv.reshape(N * W, GROUPS, gp * 2, H), [gp // 2, gp // 2, gp], dim=2)
    query_index = torch.arange(K).unsqueeze(0)
    key_index = torch.arange(K).unsqueeze(1)
    flatten_index = (key_index - query_index + K - 1).view(-1)
    emb = torch.index_select(sd[p + "relative"], 1, flatten_index).view(gp * 2, K, K)
    qe, ke, ve = torch.split(emb, [gp // 2, gp // 2, gp], dim=0)
    qr = torch.einsum("bgci,cij->bgij", q, qe)
    kr = torch.einsum("bgci,cij->bgij", k, ke).transpose(2, 3)
    qk = torch.einsum("bgci,bgcj->bgij", q, k)
    sim = _bn(torch.cat([qk, qr, kr], dim=1), sd, p + "bn_similarity.").view(N * W, 3, GROUPS, H, H).sum(dim=1)
    sim = F.softmax(sim, dim=3)
    sv = torch.einsum("bgij,bgcj->bgci", sim, v)
    sve = torch.einsum("bgij,cij->bgci", sim, ve)
    out = torch.cat([sv, sve], dim=-1).view(N * W, out_planes * 2, H)
    out = _bn(out, sd, p + "bn_output.").view(N, W, out_planes, 2, H).sum(dim=-2)
    out = out.permute(0, 2, 1, 3) if width else out.permute(0, 2, 3, 1)
    if stride > 1:
        out = F.avg_pool2d(out, stride, stride)
    return out


def port_forward(x, sd, layers, image_size):
    out = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1."))
    out = F.max_pool2d(out, 3, 2, 1)
    ks = [image_size // 4, image_size // 4, image_size // 8, image_size // 16]
    for li, (n, K) in enumerate(zip(layers, ks)):
        stride = 1 if li == 0 else 2
        for b in range(n):
            p = f"layer{li + 1}.{b}."
            s = stride if b == 0 else 1
            identity = out
            h = F.relu(_bn(F.conv2d(out, sd[p + "conv_down.weight"]), sd, p + "bn1."))
            h = port_axial_attention(h, sd, p + "hight_block.", K, False, 1)
            h = port_axial_attention(h, sd, p + "width_block.", K, True, s)
            h = _bn(F.conv2d(F.relu(h), sd[p + "conv_up.weight"]), sd, p + "bn2.")
            if p + "downsample.0.weight" in sd:
                identity = _bn(F.conv2d(out, sd[p + "downsample.0.weight"], stride=s), sd, p + "downsample.1.")
            out = F.relu(h + identity)
            if b == 0 and s != 1:
                K = K // 2
    out = out.mean(dim=(2, 3))
    return F.linear(out, sd["fc.weight"], sd["fc.bias"])


def make_port_state_dict(layers, s, image_size, num_classes, seed=0):
    """Random tensors under the port's key names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def bn(prefix, c, d):
        d[prefix + "weight"] = 1 + 0.2 * rnd(c)
        d[prefix + "bias"] = 0.2 * rnd(c)
        d[prefix + "running_mean"] = 0.2 * rnd(c)
        d[prefix + "running_var"] = 0.5 + torch.rand(c, generator=g)
        d[prefix + "num_batches_tracked"] = torch.tensor(7)

    sd = {}
    inplanes = int(64 * s)
    sd["conv1.weight"] = rnd(inplanes, 3, 7, 7, scale=0.1)
    bn("bn1.", inplanes, sd)
    ks = [image_size // 4, image_size // 4, image_size // 8, image_size // 16]
    for li, (n, base) in enumerate(zip(layers, (128, 256, 512, 1024))):
        planes = int(base * s)
        K = ks[li]
        for b in range(n):
            p = f"layer{li + 1}.{b}."
            sd[p + "conv_down.weight"] = rnd(planes, inplanes, 1, 1, scale=inplanes**-0.5)
            bn(p + "bn1.", planes, sd)
            for att in ("hight_block.", "width_block."):
                q = p + att
                sd[q + "qkv_transform.weight"] = rnd(planes * 2, planes, 1, scale=planes**-0.5)
                bn(q + "bn_qkv.", planes * 2, sd)
                bn(q + "bn_similarity.", GROUPS * 3, sd)
                bn(q + "bn_output.", planes * 2, sd)
                sd[q + "relative"] = rnd((planes // GROUPS) * 2, 2 * K - 1)
                sd[q + "flatten_index"] = torch.zeros(K * K, dtype=torch.long)  # a buffer the port saves
            sd[p + "conv_up.weight"] = rnd(planes * 2, planes, 1, 1, scale=planes**-0.5)
            bn(p + "bn2.", planes * 2, sd)
            if b == 0:
                sd[p + "downsample.0.weight"] = rnd(planes * 2, inplanes, 1, 1, scale=inplanes**-0.5)
                bn(p + "downsample.1.", planes * 2, sd)
            inplanes = planes * 2
            if b == 0 and li > 0:
                K //= 2
    sd["fc.weight"] = rnd(num_classes, inplanes, scale=0.05)
    sd["fc.bias"] = rnd(num_classes, scale=0.05)
    return sd


def test_axial26s_loads_port_state_dict_and_matches_port_math(tmp_path):
    layers, image_size = (1, 2, 4, 1), 64
    # float64 so that the comparison is exact: random weights through 8 attention blocks amplify
    # float32 rounding to ~1e-4 relative, which would hide nothing but blur the check.
    sd = make_port_state_dict(layers, 0.5, image_size, num_classes=10)
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    assert is_port_state_dict(sd)
    path = tmp_path / "port.pth"
    torch.save(sd, path)
    model = axial_deeplab.create_model("axial26s", num_classes=10, image_size=image_size, pretrained=str(path))
    model.double().eval()
    for mod in model.modules():  # the oracle is the reference math
        if hasattr(mod, "impl"):
            mod.impl = "reference"
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        ours = model(x)
        theirs = port_forward(x, sd, layers, image_size)
    assert ours.shape == (2, 10)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    # the conversion is not a no-op: a model loaded without flipping the tables differs
    assert not torch.allclose(
        convert_port_state_dict(sd)["layer1.0.attn_h.query_table"], sd["layer1.0.hight_block.relative"][:4]
    )


def test_port_model_runs_at_other_sizes():
    model = axial_deeplab.create_model("axial26s", num_classes=5, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 80)).shape == (1, 5)
