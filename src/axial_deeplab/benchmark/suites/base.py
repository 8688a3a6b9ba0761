"""What a suite is to the ``axial-deeplab benchmark`` command: a name for ``--only`` and a
function from the command's settings to rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..harness import Result


@dataclass
class Settings:
    """The command's options, as every suite reads them."""

    device: torch.device
    quick: bool = False  # fewer and smaller cases, skip the slow baselines
    repeats: int = 10  # timed runs per case
    impls: Optional[List[str]] = None  # attention implementations (None: every usable one)
    with_memory: bool = True  # also measure peak memory
    clock: str = "wall"  # "wall" or "cpu": the time ratios are taken from
    log: Callable[[str], None] = print


@dataclass(frozen=True)
class Suite:
    """A section of the command's report.

    ``run`` measures and returns the rows. Rows go into the common table
    (``report.format_table``) unless the suite has a ``table`` of its own, which is
    printed after the common one, followed by ``footnote`` (``{clock}`` is replaced by the
    clock the ratios use). A suite with ``default=False`` runs only when ``--only`` names it.
    """

    name: str
    run: Callable[[Settings], List[Result]]
    default: bool = True
    table: Optional[Callable[[List[Result]], str]] = None
    footnote: str = ""
