"""``python -m axial_deeplab ...``: the ``axial-deeplab`` command without installing its script."""

from .cli import main

raise SystemExit(main())
