"""Top-k classification accuracy, streamed as integer counts that sum across processes."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch


class ClassificationAccuracy:
    """``update(logits (B, K), targets (B,))``; ``compute()`` -> ``{"top1": .., "top5": .., "count": n}``
    with accuracies in [0, 1]. When k >= K every sample counts as correct at k."""

    def __init__(self, topk: Sequence[int] = (1, 5)):
        self.topk = tuple(sorted({int(k) for k in topk}))
        if not self.topk or self.topk[0] < 1:
            raise ValueError(f"ClassificationAccuracy: topk must be positive integers, got {topk}")
        self.reset()

    def reset(self) -> None:
        self.correct = torch.zeros(len(self.topk), dtype=torch.int64)
        self.count = torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = torch.as_tensor(logits)
        targets = torch.as_tensor(targets).long().reshape(-1)
        if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
            raise ValueError(
                f"ClassificationAccuracy.update: expected logits (B, K) and targets (B,), got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        K = logits.shape[1]
        if targets.numel() and (targets.min() < 0 or targets.max() >= K):
            raise ValueError(f"ClassificationAccuracy.update: targets outside 0..{K - 1}")
        kmax = min(self.topk[-1], K)
        top = logits.detach().float().topk(kmax, dim=1).indices.cpu()  # (B, kmax)
        hit = top.eq(targets.cpu()[:, None])
        for i, k in enumerate(self.topk):
            self.correct[i] += hit[:, : min(k, K)].any(dim=1).sum()
        self.count += targets.numel()

    def state(self) -> dict[str, torch.Tensor]:
        return {"correct": self.correct.clone(), "count": self.count.clone()}

    def merge(self, state: Mapping[str, Any]) -> None:
        correct = torch.as_tensor(state["correct"]).long().cpu()
        if correct.shape != self.correct.shape:
            raise ValueError(f"ClassificationAccuracy.merge: correct has shape {tuple(correct.shape)}")
        self.correct += correct
        self.count += torch.as_tensor(state["count"]).long().cpu()

    def all_reduce(self, group=None) -> None:
        """Sum the counts over ``torch.distributed`` processes (no-op when not initialised)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        t = torch.cat([self.correct, self.count.reshape(1)])
        if torch.distributed.get_backend(group) == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, group=group)
        t = t.cpu()
        self.correct, self.count = t[:-1].clone(), t[-1].clone()

    def compute(self) -> dict:
        n = int(self.count)
        out: dict[str, Any] = {f"top{k}": (int(c) / n if n else 0.0) for k, c in zip(self.topk, self.correct.tolist())}
        out["count"] = n
        return out
