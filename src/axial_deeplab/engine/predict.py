"""Inference on image files: a trained checkpoint (its config.yaml and metadata travel
with it) turns images or folders of images into COCO-panoptic PNGs + JSON and colour
overlays. An unreadable image is reported by name and skipped; the others are processed.

The output folder is locked for the run, earlier predictions in it are only added to or
replaced when asked, predict never reads its own outputs as input, and a failed write stops
the run with the path named, removing what this run wrote (predictions.json is written last,
atomically).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from ..errors import UserError, output_error, writing_to
from . import checkpoint as ckpt
from .builders import build_eval_transform, build_model
from .config import Config, ConfigError, load_config

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

__all__ = [
    "IMAGE_SUFFIXES",
    "EXISTING_MODES",
    "OutputFolder",
    "collect_images",
    "load_checkpoint_model",
    "predict_images",
    "predict_panoptic",
    "PredictReport",
    "read_image_ids",
    "assign_image_ids",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
PREDICTIONS_JSON = "predictions.json"
OUTPUT_SUBDIRS = ("panoptic", "overlay")  # the folders predict writes PNGs into
LOCK_FILE = ".predict.lock"
EXISTING_MODES = ("refuse", "add", "replace")


@dataclass
class PredictReport:
    output_dir: str
    processed: List[str] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)
    json_path: Optional[str] = None


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _own_outputs(inputs: Sequence[str], output_dir: str) -> List[Path]:
    """The folders input collection must not read: the whole output folder, or only the
    folders predict writes into when an input folder is the output folder or lies inside it."""
    out = Path(output_dir).resolve()
    for item in inputs:
        p = Path(item)
        if p.is_dir() and _is_under(p.resolve(), out):
            return [out / d for d in OUTPUT_SUBDIRS]
    return [out]


def collect_images(
    inputs: Sequence[str], output_dir: Optional[str] = None, skipped: Optional[List[Path]] = None
) -> List[Path]:
    """Files given directly, plus every image file below the given folders (sorted).

    With ``output_dir`` predict's own outputs are never taken as input (a second run into
    ``input/out`` would otherwise predict on the first run's PNGs): files under the output
    folder (under its panoptic/ and overlay/ only, when an input folder is the output folder
    or lies inside it) are left out and appended to ``skipped``."""
    exclude = _own_outputs(inputs, output_dir) if output_dir is not None else []
    files: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key in seen:
            continue
        seen.add(key)
        if any(_is_under(key, ex) for ex in exclude):
            if skipped is not None:
                skipped.append(f)
            continue
        unique.append(f)
    return unique


def load_checkpoint_model(
    checkpoint: str, device: torch.device, config_path: Optional[str] = None, overrides: Sequence[str] = ()
):
    """``(model in eval mode, config, metadata)`` from a checkpoint folder (or a weights file
    with ``config_path``). The dataset is only opened when the checkpoint lacks metadata."""
    path = ckpt.resolve_checkpoint(checkpoint)
    cfg_path = config_path or ckpt.checkpoint_config_path(path)
    if not cfg_path:
        raise ConfigError(f"{path}: no config.yaml next to the weights; pass --config with the training config")
    cfg = load_config(cfg_path, overrides)
    cfg.model.pretrained = None  # the checkpoint holds all weights
    info = ckpt.read_checkpoint_info(path)
    metadata = None
    if cfg.experiment.task == "panoptic":
        if "metadata" in info:
            from ..data.meta import PanopticMetadata

            metadata = PanopticMetadata.from_dict(info["metadata"])
        else:  # older or bare weights: the classes can only come from the configured dataset
            import warnings

            from .builders import build_dataset, dataset_metadata

            metadata = dataset_metadata(build_dataset(cfg, cfg.data.eval_split))
            warnings.warn(
                f"{path}: the checkpoint does not record its classes (no 'metadata' in an info.json "
                f"beside its weights); assuming those of dataset {cfg.data.dataset!r} "
                f"split {cfg.data.eval_split!r} "
                f"({metadata.num_classes} classes: {', '.join(metadata.class_names[:8])}"
                f"{', ...' if metadata.num_classes > 8 else ''})",
                UserWarning,
                stacklevel=2,
            )
        model = build_model(cfg, metadata)
    else:
        classes = info.get("classes")
        if not classes:
            raise ConfigError(f"{path}: classification checkpoint without its class list (info.json 'classes')")
        metadata = list(classes)
        model = build_model(cfg, None, num_classes=len(classes))
    record, legacy = ckpt.weights_arrangement(path)
    if legacy and "arrangement" not in cfg.model.kwargs:
        from ..models.axial_resnet import arrangement_mismatches

        if arrangement_mismatches(model, record):  # rebuilt as trained: stem max-pool
            import warnings

            warnings.warn(
                f"{path}: saved before checkpoints recorded the backbone arrangement; building "
                f"{cfg.model.name} with arrangement='maxpool' (stem max-pool), as it was trained",
                UserWarning,
                stacklevel=2,
            )
            cfg.model.kwargs["arrangement"] = "maxpool"
            model = (
                build_model(cfg, metadata)
                if cfg.experiment.task == "panoptic"
                else build_model(cfg, None, num_classes=len(metadata))
            )
    ckpt.load_model_weights(model, path)
    model.to(device).eval()
    return model, cfg, metadata


def _output_name(f: Path, roots: Iterable[Path], taken: set) -> str:
    name = f.stem
    for r in roots:
        try:
            rel = f.resolve().relative_to(r.resolve())
            name = str(rel.with_suffix("")).replace(os.sep, "__")
            break
        except ValueError:
            continue
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _relative_file_name(f: Path, roots: Iterable[Path]) -> str:
    """An input's path relative to the input folder it was found in (``/``-separated), or its
    name for a file given directly: the ``images[].file_name`` of the predictions."""
    for r in roots:
        try:
            return f.resolve().relative_to(r.resolve()).as_posix()
        except ValueError:
            continue
    return f.name


class ImageIds(dict):
    """``{images[].file_name: images[].id}``, with the JSON's ``categories`` list (None when it has none)."""

    categories: Optional[list] = None


def read_image_ids(path) -> dict:
    """``{images[].file_name: images[].id}`` of a COCO JSON (image info or ground truth), ids as
    the JSON has them (COCO's are ints), as an :class:`ImageIds` that keeps its categories: where
    they are the model's classes under another id scheme of the dataset (Cityscapes label ids for
    a model trained on train ids), predict writes those ids. Errors name the file and the entry."""
    from ..data.panoptic_io import PanopticFormatError, load_json

    data = load_json(path, "image-id JSON")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images:
        raise PanopticFormatError(
            f"{path}: no 'images' list (the image-info or ground-truth COCO JSON lists "
            f"each image's id and file_name there)"
        )
    out = ImageIds()
    cats = data.get("categories")
    out.categories = cats if isinstance(cats, list) else None
    seen_ids: dict = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise PanopticFormatError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        name, iid = str(img["file_name"]).replace("\\", "/"), img["id"]
        if name in out:
            raise PanopticFormatError(f"{path}: file_name {name!r} is listed twice (images[{i}])")
        if str(iid) in seen_ids:
            raise PanopticFormatError(f"{path}: image id {iid!r} is listed twice ({seen_ids[str(iid)]!r} and {name!r})")
        seen_ids[str(iid)] = name
        out[name] = iid
    return out


def assign_image_ids(
    files: Sequence[Path],
    inputs: Sequence[str],
    image_ids: Optional[dict] = None,
    source: str = "--image-ids",
    start: int = 1,
) -> Tuple[list, List[str]]:
    """``(image id, images[].file_name)`` per file. With ``image_ids`` (see :func:`read_image_ids`)
    a file gets the id its path relative to its input folder has there, else the id of its base
    name where that is listed once (Cityscapes' ``<id>_leftImg8bit.png`` under the
    ``<id>_gtFine_leftImg8bit.png`` its panoptic JSON lists); a file not listed is refused by
    name. Without, the ids are ``start, start + 1, ...`` in file order (the file name says which
    image each is)."""
    roots = [Path(i) for i in inputs if Path(i).is_dir()]
    rel = [_relative_file_name(f, roots) for f in files]
    if image_ids is None:
        return list(range(start, start + len(files))), rel
    by_base: dict = {}
    for name, iid in image_ids.items():
        base = name.rsplit("/", 1)[-1]
        by_base.setdefault(base, []).append(iid)
        if base.endswith("_gtFine_leftImg8bit.png"):  # cityscapesscripts' name for "<id>_leftImg8bit.png"
            by_base.setdefault(base[: -len("_gtFine_leftImg8bit.png")] + "_leftImg8bit.png", []).append(iid)
    ids, missing = [], []
    for r in rel:
        if r in image_ids:
            ids.append(image_ids[r])
        elif len(by_base.get(r.rsplit("/", 1)[-1], [])) == 1:
            ids.append(by_base[r.rsplit("/", 1)[-1]][0])
        else:
            missing.append(r)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise UserError(
            f"{source}: {len(missing)} input image(s) not listed in its images[].file_name: {shown}; "
            f"predict only the images it lists, or leave out --image-ids for ids 1..N"
        )
    seen: dict = {}
    for r, iid in zip(rel, ids):
        if str(iid) in seen:
            raise UserError(f"{source}: inputs {seen[str(iid)]} and {r} both match image id {iid!r}")
        seen[str(iid)] = r
    return ids, rel


def _is_ours(name: str, stem: str = "") -> bool:
    """A file predict writes (``*.png``), or a temporary file of an interrupted atomic write."""
    if stem:
        return name == stem or (name.startswith(stem + ".") and name.endswith(".tmp"))
    return name.endswith(".png") or (".png." in name and name.endswith(".tmp"))


def _check_folder_path(path: Path, option: str = "--output") -> None:
    """The output path must be a folder or creatable as one: name the file in the way."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            if p.is_dir():
                return
            if p == path:
                raise UserError(f"{option} {path}: is a file, not a folder; choose a folder for the predictions")
            raise UserError(
                f"{option} {path}: {p} is a file, so no folder can be made below it; choose another output folder"
            )


class OutputFolder:
    """The output folder of a predict run: checked, created and locked until :meth:`close`.

    The lock (``fcntl.flock`` on ``.predict.lock`` inside the folder, non-blocking) makes a
    second run into the same folder fail at once instead of mixing its files with ours.
    ``existing`` says what to do with earlier predictions there (``predictions.json``, PNGs
    in ``panoptic/`` or ``overlay/``): ``"refuse"`` (the default), ``"add"`` (the new images
    join the earlier predictions.json; a name already there is refused) or ``"replace"``
    (delete those files, and nothing else, before the first new one is written). Other files
    in the folder are never touched, so a folder holding unrelated files is fine.

    ``option``, ``command`` and ``flags`` word the messages for the command using the folder
    (``evaluate --predictions`` offers ``--replace`` only: its files are one dataset's whole set).
    """

    def __init__(
        self,
        path,
        existing: str = "refuse",
        option: str = "--output",
        command: str = "predict",
        flags: Sequence[str] = ("--add", "--replace"),
    ):
        if existing not in EXISTING_MODES:
            raise ValueError(f"existing must be one of {', '.join(EXISTING_MODES)}, got {existing!r}")
        self.path = Path(path)
        self.existing = existing
        self.option, self.command, self.flags = option, command, tuple(flags)
        self.json_path = self.path / PREDICTIONS_JSON
        self.previous: Optional[dict] = None  # the earlier predictions.json that "add" extends
        self._lock_fd: Optional[int] = None
        _check_folder_path(self.path, option)
        with writing_to(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._check_existing()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        lock_path = self.path / LOCK_FILE
        with writing_to(lock_path):
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:
            self._lock_fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"{self.option} {self.path}: another {self.command} run is writing into this folder "
                    f"(it holds {lock_path}); wait for it to finish or choose another folder"
                ) from None
            raise output_error(lock_path, e) from None
        self._lock_fd = fd

    def earlier_predictions(self) -> List[str]:
        """Files of earlier runs (relative to the folder): predictions.json and the PNGs in
        panoptic/ and overlay/, with temporary files of interrupted writes."""
        found = sorted(n for n in os.listdir(self.path) if _is_ours(n, PREDICTIONS_JSON))
        for sub in OUTPUT_SUBDIRS:
            d = self.path / sub
            if d.is_dir():
                found += [f"{sub}/{n}" for n in sorted(os.listdir(d)) if _is_ours(n) and (d / n).is_file()]
        return found

    def _check_existing(self) -> None:
        earlier = self.earlier_predictions()
        if not earlier:
            return
        if self.existing == "refuse":
            what = sorted({e.split("/")[0] + ("/" if "/" in e else "") for e in earlier})
            how = {"--add": "--add to add these images to them", "--replace": "--replace to replace them"}
            offer = " or ".join(how.get(f, f) for f in self.flags)
            raise UserError(
                f"{self.option} {self.path} already holds predictions ({', '.join(what)}); "
                + (f"pass {offer}, or " if offer else "")
                + "choose another folder"
            )
        if self.existing == "add" and self.json_path.exists():
            from ..data.panoptic_io import read_panoptic_json

            self.previous = read_panoptic_json(self.json_path)

    def prepare(self, names: Sequence[str], metadata, overlays: bool = True) -> None:
        """Before the first write: "add" checks that the earlier predictions come from the same
        categories and that no name is taken; "replace" deletes the earlier predictions."""
        if self.existing == "replace":
            for rel in self.earlier_predictions():
                p = self.path / rel
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise output_error(p, e) from None
            return
        if self.existing != "add":
            return
        taken = set()
        if self.previous is not None:

            def key(c):
                return int(c["id"]), str(c["name"]), int(bool(c.get("isthing", 0)))

            old = sorted(key(c) for c in self.previous.get("categories") or [])
            if old != sorted(key(c) for c in metadata.coco_categories()):
                raise UserError(
                    f"{self.json_path}: its categories differ from this checkpoint's, so the new "
                    f"predictions cannot join it; use --replace or choose another folder"
                )
            for a in self.previous["annotations"]:
                taken.add(Path(str(a["file_name"])).stem)  # the names; image ids are checked by the caller
        clash = [
            n
            for n in names
            if n in taken
            or (self.path / "panoptic" / f"{n}.png").exists()
            or (overlays and (self.path / "overlay" / f"{n}.png").exists())
        ]
        if clash:
            shown = ", ".join(clash[:5]) + (", ..." if len(clash) > 5 else "")
            raise UserError(
                f"--output {self.path} already has predictions named {shown} ({len(clash)} of these "
                f"images); --add only adds new names: use --replace to predict everything again, "
                f"or choose another folder"
            )

    def close(self) -> None:
        """Release the lock (the lock file stays: removing it would race with a waiting run)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False


@torch.no_grad()
def predict_images(
    model,
    cfg: Config,
    metadata,
    files: Sequence[Path],
    output_dir: str,
    device: torch.device,
    progress: bool = True,
    inputs: Sequence[str] = (),
    overlays: bool = True,
    existing: str = "refuse",
    folder: Optional[OutputFolder] = None,
    image_ids=None,
) -> PredictReport:
    """Write ``panoptic/<name>.png`` + ``predictions.json`` (COCO panoptic) and
    ``overlay/<name>.png`` for each readable image; collect the images that could not be read
    or predicted.

    Image ids: with ``image_ids`` (a COCO JSON path, or the dict :func:`read_image_ids` makes)
    each image gets the id the JSON lists for it, so the files pair up with that ground truth;
    without, integer ids 1..N over the images written, in order (after the earlier ones with
    "add"). ``images[].file_name`` is the input's path relative to its input folder.

    ``existing``: what to do with earlier predictions in ``output_dir`` (``"refuse"``, ``"add"``
    or ``"replace"``, see :class:`OutputFolder`); ``folder``: an :class:`OutputFolder` the caller
    already opened (and locked) for ``output_dir``, else one is held for this call. A failed
    write raises :class:`OutputError` naming the path, after removing the files this run wrote:
    predictions.json (written last, atomically) is then as it was."""
    own = folder is None
    if own:
        folder = OutputFolder(output_dir, existing)
    try:
        if image_ids is not None and not isinstance(image_ids, dict):
            source = f"--image-ids {image_ids}"
            image_ids = read_image_ids(image_ids)
        else:
            source = "--image-ids"
        return _predict(
            model, cfg, metadata, files, output_dir, device, progress, inputs, overlays, folder, image_ids, source
        )
    finally:
        if own:
            folder.close()


@torch.no_grad()
def predict_panoptic(model, cfg: Config, metadata, rgb, device, transform=None, file_name: str = ""):
    """One image through the model: ``(image, panoptic, scores)`` for an (H, W, 3) uint8 RGB
    array. ``image`` is its (3, H, W) float tensor, ``panoptic`` an (H, W) int64 CPU tensor
    (class * label_divisor + instance, negative = void) at the input's size, ``scores`` the
    segment scores by panoptic value. The one path from pixels to prediction, shared by
    ``predict`` and :class:`axial_deeplab.Predictor`; ``transform`` is
    :func:`build_eval_transform`'s (built here when not given)."""
    from ..data.panoptic_io import image_to_tensor
    from ..data.transforms import resize_sample
    from .evaluate import postprocess_outputs, postprocess_settings, raw_outputs

    if transform is None:
        transform = build_eval_transform(cfg, metadata, model=model)
    image = image_to_tensor(rgb)
    h0, w0 = image.shape[-2:]
    sample = transform({"image": image, "file_name": file_name})
    x = sample["image"]
    vh, vw = sample.get("valid_size", tuple(x.shape[-2:]))
    raw = raw_outputs(model, x[None].to(device), cfg)
    result = postprocess_outputs(raw, metadata, postprocess_settings(model, cfg), full=True)[0]
    pan = result["panoptic"][:vh, :vw].cpu()
    if (vh, vw) != (h0, w0):  # resized for the network: back to the input's size
        pan = resize_sample({"image": x[:, :vh, :vw], "semantic": pan}, (h0, w0))["semantic"]
    scores = {int(s["id"]): float(s["score"]) for s in result.get("segments_info", []) if "score" in s}
    return image, pan, scores


def _next_id(previous: Optional[dict]) -> int:
    """The first integer id after those of earlier predictions (1 when there are none)."""
    ints = [
        a["image_id"]
        for a in (previous or {}).get("annotations", [])
        if isinstance(a.get("image_id"), int) and not isinstance(a.get("image_id"), bool)
    ]
    return max(ints, default=0) + 1


def _refuse_earlier_ids(folder, ids_of) -> None:
    """With ``--add``, an image id already in the folder's predictions.json is refused."""
    if folder.previous is None:
        return
    earlier = {str(a["image_id"]) for a in folder.previous["annotations"]}
    both = [f"{iid!r}" for iid in ids_of if str(iid) in earlier]
    if both:
        raise UserError(
            f"--output {folder.path}: its predictions.json already has image ids "
            f"{', '.join(both[:5])}{', ...' if len(both) > 5 else ''}; use --replace to predict "
            f"everything again, or choose another folder"
        )


def _start_writer(json_path, png_dir, metadata, previous):
    """The COCO-panoptic writer; with ``--add`` it starts with the earlier images, in their order."""
    from ..data.panoptic_io import PanopticWriter

    with writing_to(png_dir):
        writer = PanopticWriter(json_path, png_dir, metadata)
    if previous is not None:
        writer.extra = {k: v for k, v in previous.items() if k not in ("images", "annotations", "categories")}
        writer.images[:0] = list(previous.get("images") or [])
        writer.annotations[:0] = list(previous["annotations"])
    return writer


def _predict(
    model,
    cfg,
    metadata,
    files,
    output_dir,
    device,
    progress,
    inputs,
    overlays,
    folder,
    image_ids=None,
    source="--image-ids",
) -> PredictReport:
    from tqdm.auto import tqdm

    from ..data.panoptic_io import encode_prediction, read_image
    from .visualize import make_panel, overlay_panoptic, save_png

    report = PredictReport(output_dir=output_dir)
    transform = build_eval_transform(cfg, metadata, model=model)
    roots = [Path(i) for i in inputs if Path(i).is_dir()]
    taken: set = set()
    names = [_output_name(f, roots, taken) for f in files]
    ids_of, rel_names = assign_image_ids(files, inputs, image_ids, source, start=_next_id(folder.previous))
    if getattr(image_ids, "categories", None):
        from ..data.meta import with_category_ids_of

        metadata = with_category_ids_of(metadata, image_ids.categories)  # e.g. Cityscapes label ids
    next_id = _next_id(folder.previous)  # without image_ids: 1..N over the images written, in order
    folder.prepare(names, metadata, overlays)
    _refuse_earlier_ids(folder, ids_of)
    json_path = os.path.join(output_dir, PREDICTIONS_JSON)
    png_dir = os.path.join(output_dir, "panoptic")
    pal, div, things = metadata.palette(), metadata.label_divisor, metadata.thing_ids
    written: List[str] = []
    try:
        writer = _start_writer(json_path, png_dir, metadata, folder.previous)
        for f, name, image_id, rel in zip(
            tqdm(files, desc="predict", unit="img", disable=not progress, dynamic_ncols=True), names, ids_of, rel_names
        ):
            try:
                rgb = read_image(f)
            except Exception as e:  # unreadable / corrupt file: name it and go on
                report.failed.append((str(f), str(e)))
                continue
            try:
                image, pan, seg_scores = predict_panoptic(model, cfg, metadata, rgb, device, transform, str(f))
                ids, segs = encode_prediction(pan.numpy(), metadata, seg_scores)
                panel = make_panel([image, overlay_panoptic(image, pan, pal, div, things)]) if overlays else None
            except Exception as e:
                report.failed.append((str(f), f"{type(e).__name__}: {e}"))
                continue
            # A failed write is no per-image failure: it stops the run (the next would fail too).
            png = os.path.join(png_dir, f"{name}.png")
            written.append(png)
            with writing_to(png):
                if image_ids is None:
                    image_id = next_id
                writer.add(image_id, ids, segs, image_file_name=rel, png_name=f"{name}.png")
                next_id += image_ids is None
            if overlays:
                ov = os.path.join(output_dir, "overlay", f"{name}.png")
                written.append(ov)
                with writing_to(ov):
                    save_png(ov, panel)
            report.processed.append(str(f))
        with writing_to(json_path):
            writer.close()
    except BaseException:
        for p in written:  # new names only (see OutputFolder.prepare): nothing earlier is removed
            try:
                os.unlink(p)
            except OSError:
                pass
        raise
    report.json_path = json_path
    return report
