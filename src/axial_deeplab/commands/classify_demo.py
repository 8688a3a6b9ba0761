"""``axial-deeplab classify-demo``: train a tiny Axial-ResNet on scikit-learn's handwritten digits.

A real classification run that needs no download: the package ships scikit-learn's 1,797 8x8
digits (``axial_deeplab.data.digits``). Images are upsampled to 32x32; 20% are held out with a
fixed seed.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def load_digits_split(size: int = 32, seed: int = 0, held_out: float = 0.2):
    """Returns (x_train, y_train, x_test, y_test): float images (N, 3, size, size) in [0, 1]."""
    from ..data.digits import load_digits

    images, labels = load_digits()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(labels, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(held_out * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def random_shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pad`` pixels (zero padding)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def train_digits(
    model_name="axial_resnet_tiny", epochs=8, batch_size=64, lr=3e-3, seed=0, progress=True, image_size=32
):
    from tqdm import tqdm

    from ..evaluation.classification import ClassificationAccuracy
    from ..models.registry import create_model

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(size=image_size, seed=seed)
    model = create_model(model_name, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(y_tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="digits", unit="step", disable=not progress)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            xb = random_shift(x_tr[idx], 2, gen)
            loss = F.cross_entropy(model(xb), y_tr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    train_time = time.perf_counter() - start
    model.eval()
    metric = ClassificationAccuracy(topk=(1, 5))
    with torch.no_grad():
        for i in range(0, len(y_te), 256):
            metric.update(model(x_te[i : i + 256]), y_te[i : i + 256])
    result = metric.compute()
    result.update(train_seconds=train_time, n_train=len(y_tr), n_test=len(y_te))
    return model, result


def register(subparsers):
    p = subparsers.add_parser(
        "classify-demo",
        help="train a tiny Axial-ResNet on scikit-learn's digits (CPU, ~2 min)",
        description="Train a tiny Axial-ResNet on scikit-learn's handwritten digits (shipped in the package, "
        "no download) and report top-1 on a fixed held-out 20%% split.",
    )
    p.add_argument("--model", default="axial_resnet_tiny", help="registered model (default axial_resnet_tiny)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    _, r = train_digits(args.model, args.epochs, args.batch_size, args.lr, args.seed, not args.no_progress)
    print(
        f"digits held-out: top-1 {100 * r['top1']:.2f}%  top-5 {100 * r['top5']:.2f}%  "
        f"({r['n_test']} images; trained on {r['n_train']} in {r['train_seconds']:.0f} s)"
    )
    return 0
