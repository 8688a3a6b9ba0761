"""Evaluation over a dataset: the model's raw outputs (optionally with test-time
augmentation), the panoptic merge, and streaming PQ / mIoU / mask AP (panoptic) or
top-1 / top-5 (classification). Every process scores its own shard and the statistics
are summed across processes, so N processes report what one would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, default_collate

from ..errors import UserError
from .builders import build_eval_transform, dataset_metadata
from .checkpoint import unwrap_model
from .config import Config
from .distributed import all_reduce_tensor, get_rank, get_world_size, is_main_process, reduce_evaluator_states
from .sampling import CarryingCollate, SeededDataset, ShardSampler, ignore_sigint, reraise_carried

__all__ = [
    "raw_outputs",
    "postprocess_outputs",
    "postprocess_settings",
    "evaluate_model",
    "evaluate_panoptic",
    "match_classes",
    "dataset_label",
    "evaluate_classification",
    "format_results",
    "write_overlay",
    "PredictionFiles",
]


def raw_outputs(model, images: torch.Tensor, cfg: Config) -> Dict[str, torch.Tensor]:
    """Train-style outputs (semantic_logits, center_heatmap, offset_map) in eval mode, with
    multi-scale / flip test-time augmentation when ``eval.scales`` / ``eval.flip`` ask for it."""
    scales = [float(s) for s in cfg.eval.scales]
    if scales == [1.0] and not cfg.eval.flip:
        return model.predict_raw(images)
    from ..tta import tta_raw_outputs

    return tta_raw_outputs(model, images, scales=scales, flip=cfg.eval.flip)


def postprocess_settings(model, cfg: Config):
    """The post-processing settings a model is evaluated with: its own ``postprocess_settings``
    (set from ``cfg.eval`` when the engine builds or loads it), else ``cfg.eval``'s. Settings
    that differ from ``cfg.eval``'s (a model built or changed in Python) win, with a warning."""
    from ..postprocess import PostprocessSettings

    configured = PostprocessSettings.from_config(cfg)
    own = getattr(unwrap_model(model), "postprocess_settings", None)
    if own is None:
        return configured
    if own != configured:
        import warnings

        warnings.warn(
            f"the model's post-processing settings {own} differ from the config's eval section "
            f"{configured}; using the model's (set model.postprocess_settings = "
            f"PostprocessSettings.from_config(cfg) to use the config's)",
            UserWarning,
            stacklevel=3,
        )
    return own


def postprocess_outputs(raw: Dict[str, torch.Tensor], metadata, settings, full: bool = False) -> List[Any]:
    """Panoptic maps (or the full merge dicts with ``full``) for a batch of raw outputs, merged
    with ``settings`` (see :func:`postprocess_settings`) for ``metadata``'s classes."""
    from ..postprocess import merge_raw_outputs

    results = merge_raw_outputs(raw, metadata.thing_ids, metadata.label_divisor, settings)
    return results if full else [r["panoptic"] for r in results]


def _instances_for_ap(result: Dict[str, Any], h: int, w: int) -> Dict[str, Any]:
    pan = result["panoptic"][:h, :w]
    inst = result["instances"]
    ids = torch.as_tensor(inst["ids"]).to(pan.device)
    masks = pan[None] == ids.view(-1, 1, 1) if ids.numel() else torch.zeros((0, h, w), dtype=torch.bool)
    return {
        "masks": masks.cpu(),
        "classes": torch.as_tensor(inst["classes"]).cpu(),
        "scores": torch.as_tensor(inst["scores"]).float().cpu(),
    }


def write_overlay(path: str, image, panoptic, gt_sample: Optional[Dict[str, Any]], metadata) -> str:
    """Input | prediction overlay | ground-truth overlay (when labels are given) as one PNG."""
    from .visualize import make_panel, overlay_panoptic, panoptic_from_labels, save_png

    pal, div, things = metadata.palette(), metadata.label_divisor, metadata.thing_ids
    pics = [image, overlay_panoptic(image, panoptic, pal, div, things)]
    titles = ["input", "prediction"]
    if gt_sample is not None:
        gt = panoptic_from_labels(gt_sample["semantic"], gt_sample["instance"], div, metadata.ignore_label)
        pics.append(overlay_panoptic(image, gt, pal, div, things))
        titles.append("ground truth")
    return save_png(path, make_panel(pics, titles))


class _KeepOriginalLabels:
    """Runs the evaluation transform but keeps the untransformed label maps, so a model fed
    resized images (data.resize_long_side) is still scored at the dataset's resolution."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, sample):
        out = self.transform(sample)
        for key in ("semantic", "instance", "crowd"):
            out[f"orig_{key}"] = sample[key]
        return out


def resize_nearest(label: torch.Tensor, size) -> torch.Tensor:
    """(H, W) map -> ``size`` with nearest neighbour (half-pixel centres)."""
    h, w = int(size[0]), int(size[1])
    if tuple(label.shape[-2:]) == (h, w):
        return label
    iy = torch.floor((torch.arange(h, dtype=torch.float64) + 0.5) * (label.shape[-2] / h)).long()
    ix = torch.floor((torch.arange(w, dtype=torch.float64) + 0.5) * (label.shape[-1] / w)).long()
    return label[iy.clamp_(0, label.shape[-2] - 1)][:, ix.clamp_(0, label.shape[-1] - 1)]


def _valid_hw(batch, i: int, full_hw):
    vs = batch.get("valid_size")
    if vs is not None:
        v = vs[i]
        return int(v[0]), int(v[1])
    return full_hw


def dataset_label(dataset, split: Optional[str] = None, name: Optional[str] = None) -> str:
    """How a dataset is named in messages: its name, split and JSON file where known."""
    md = getattr(dataset, "metadata", None)
    parts = [repr(name or getattr(md, "name", type(dataset).__name__))]
    split = split or getattr(dataset, "split", None)
    if split:
        parts.append(f"split {split!r}")
    json_path = getattr(dataset, "json_path", None)
    if json_path:
        parts.append(f"({json_path})")
    return " ".join(parts)


def match_classes(
    metadata,
    dataset,
    map_classes_by_name: bool = False,
    model_source: Optional[str] = None,
    dataset_source: Optional[str] = None,
):
    """``(metadata to score with, class_map)`` for a model whose classes are ``metadata`` on ``dataset``.

    The two must agree class by class (names, things/stuff, category ids, label divisor), else
    the scores would silently compare different classes: a mismatch raises
    :class:`~axial_deeplab.data.meta.MetadataMismatchError` listing every difference. With
    ``map_classes_by_name`` the same classes may come in another order; ``class_map`` then
    reorders the model's semantic channels into the dataset's order (``None``: no reordering).
    Scores always use the dataset's metadata, so its category ids and void label are the truth.
    """
    from ..data.meta import check_metadata_compatible

    ds_md = getattr(dataset, "metadata", None)
    if metadata is None:
        return dataset_metadata(dataset), None
    if ds_md is None or ds_md is metadata:
        return metadata, None
    model_label = f"checkpoint {model_source}" if model_source else "the model"
    what = f"{model_label} vs dataset {dataset_source or dataset_label(dataset)}"
    hints = []
    if metadata.label_divisor != ds_md.label_divisor:
        hints.append(
            f"Give the dataset the checkpoint's label divisor (data.options.label_divisor="
            f"{metadata.label_divisor}) or evaluate on the dataset the model was trained on."
        )
    kinds = {(n, metadata.is_thing(c)) for c, n in enumerate(metadata.class_names)}
    same_classes = sorted(metadata.class_names) == sorted(ds_md.class_names) and kinds == {
        (n, ds_md.is_thing(c)) for c, n in enumerate(ds_md.class_names)
    }
    if not same_classes:
        hints.append("Evaluate on a dataset with the classes the model was trained on.")
    elif not map_classes_by_name and (
        metadata.class_names != ds_md.class_names
        or None not in (metadata.category_ids, ds_md.category_ids)
        and metadata.category_ids != ds_md.category_ids
    ):
        hints.append(
            "The same class names are listed in another order or under other ids: pass "
            "--map-classes-by-name (map_classes_by_name=True) to match them by name."
        )
    hint = " ".join(hints)
    class_map = check_metadata_compatible(
        metadata,
        ds_md,
        what=what,
        names=("checkpoint" if model_source else "model", "dataset"),
        map_by_name=map_classes_by_name,
        hint=hint,
    )
    return ds_md, class_map


def _reorder_classes(raw: Dict[str, torch.Tensor], class_map: Optional[List[int]]) -> Dict[str, torch.Tensor]:
    """The model's semantic channels in the dataset's class order (centres and offsets are class-free)."""
    if class_map is None:
        return raw
    index = torch.as_tensor(class_map, device=raw["semantic_logits"].device)
    return {k: v.index_select(1, index) if k in ("semantic_logits", "semantic_probs") else v for k, v in raw.items()}


class PredictionFiles:
    """COCO-panoptic prediction files of an evaluation: ``DIR/predictions.json`` + ``DIR/panoptic/*.png``
    that panopticapi's ``pq_compute``, cityscapesscripts' ``evaluatePanoptic`` and ``axial-deeplab pq``
    accept against the dataset's ground truth as is.

    Each prediction is keyed by the dataset's own image id (from its JSON: an int stays an int) and
    its own category ids; ``images[].file_name`` is the JSON's (relative) one; the categories are the
    dataset's dicts unchanged; each PNG has the ground truth's size. ``folder`` is the
    :class:`~.predict.OutputFolder` (locked, earlier predictions refused or replaced); PNGs written
    before a failure are removed and predictions.json is written last, atomically.
    """

    def __init__(self, folder, dataset, metadata):
        from ..data.panoptic_io import PanopticWriter
        from ..errors import writing_to
        from .predict import PREDICTIONS_JSON

        if folder.existing == "add":
            raise ValueError(
                f"{folder.path}: evaluation predictions cannot be added to earlier ones "
                f"(use existing='refuse' or 'replace')"
            )
        self.folder = folder
        self.metadata = metadata
        self.json_path = folder.path / PREDICTIONS_JSON
        self.png_dir = folder.path / "panoptic"
        self._writing = writing_to
        self.written: List[str] = []
        self.entries = {
            str(ann["image_id"]): (ann, info)
            for ann, info in getattr(dataset, "items", [])
            if isinstance(ann, dict) and "image_id" in ann
        }
        self.image_dir = getattr(dataset, "image_dir", None)
        folder.prepare([], metadata, overlays=False)
        with writing_to(self.png_dir):
            self.writer = PanopticWriter(
                self.json_path, self.png_dir, metadata, categories=self._categories(dataset, metadata)
            )

    @staticmethod
    def _categories(dataset, metadata):
        """The dataset JSON's own category dicts (also where the metadata are built in, as for
        Cityscapes), provided they are the metadata's classes; else the metadata's."""
        if metadata.categories is None and getattr(dataset, "json_path", None):
            from ..data.panoptic_io import load_json

            try:
                cats = load_json(dataset.json_path).get("categories")
                key = sorted((int(c["id"]), str(c["name"])) for c in cats)
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                cats, key = None, None
            if key == sorted((metadata.category_id(c), n) for c, n in enumerate(metadata.class_names)):
                return cats
        return metadata.coco_categories()

    def _names(self, sample_id: str, file_name: Optional[str]):
        """``(image id, image file name, PNG name)`` of a sample, as the dataset's JSON has them."""
        entry = self.entries.get(str(sample_id))
        if entry is not None:
            ann, info = entry
            image_id = ann["image_id"]
            png = os.path.basename(str(ann["file_name"])) or f"{image_id}.png"
            if info is not None and info.get("file_name"):
                return image_id, str(info["file_name"]), png
        else:
            image_id = sample_id
            png = f"{image_id}.png"
        rel = os.path.basename(str(file_name or png))
        if file_name and self.image_dir is not None:
            try:
                rel = os.path.relpath(os.path.abspath(file_name), os.path.abspath(self.image_dir))
                if rel.startswith(".."):
                    rel = os.path.basename(str(file_name))
            except ValueError:
                pass
        return image_id, rel.replace(os.sep, "/"), png

    def add(self, sample_id: str, file_name: Optional[str], panoptic: torch.Tensor, segments_info) -> None:
        from ..data.panoptic_io import encode_prediction

        scores = {int(s["id"]): float(s["score"]) for s in segments_info or [] if "score" in s}
        ids, segs = encode_prediction(panoptic.numpy(), self.metadata, scores)
        image_id, image_file, png = self._names(sample_id, file_name)
        if png in self.writer._pngs:  # ground-truth PNGs of the same name in different folders
            png = f"{image_id}.png"
        path = str(self.png_dir / png)
        self.written.append(path)
        with self._writing(path):
            self.writer.add(image_id, ids, segs, image_file_name=image_file, png_name=png)

    def process(self, s: "ScoredImage") -> None:
        self.add(s.image_id, s.file_name, s.panoptic, s.result.get("segments_info"))

    def close(self) -> str:
        with self._writing(self.json_path):
            self.writer.close()
        return str(self.json_path)

    def abort(self) -> None:
        for p in self.written:  # this run's PNGs only: earlier files were refused or replaced before
            try:
                os.unlink(p)
            except OSError:
                pass


def _open_prediction_files(predictions, dataset, metadata):
    """``predictions`` (a folder path, or an open :class:`~.predict.OutputFolder`) -> ``(files, own folder)``."""
    from .predict import OutputFolder

    if get_world_size() > 1:
        raise UserError(
            f"--predictions {predictions}: prediction files are written by one process only; run "
            f"evaluate --predictions without torchrun (the scores are the same)"
        )
    if isinstance(predictions, OutputFolder):
        return PredictionFiles(predictions, dataset, metadata), None
    folder = OutputFolder(predictions, "refuse", option="--predictions", command="evaluate", flags=("--replace",))
    try:
        return PredictionFiles(folder, dataset, metadata), folder
    except BaseException:
        folder.close()
        raise


@torch.no_grad()
def evaluate_panoptic(
    model,
    dataset,
    cfg: Config,
    device,
    metadata=None,
    progress: bool = True,
    desc: str = "eval",
    overlay_dir: Optional[str] = None,
    num_overlays: int = 0,
    max_images: Optional[int] = None,
    map_classes_by_name: bool = False,
    model_source: Optional[str] = None,
    dataset_source: Optional[str] = None,
    predictions=None,
) -> Dict[str, Any]:
    """PQ/SQ/RQ (All, Things, Stuff, per class), mIoU and optionally mask AP, in percent.

    ``metadata`` are the model's classes; they are checked against the dataset's first (see
    :func:`match_classes`; ``model_source`` / ``dataset_source`` name the two in its message).
    ``predictions``: a folder (or an open :class:`~.predict.OutputFolder`) to write the scored
    predictions into as COCO-panoptic files (see :class:`PredictionFiles`); the result then
    holds ``predictions_json``. One process only: refused under torchrun."""
    metadata, class_map = match_classes(metadata, dataset, map_classes_by_name, model_source, dataset_source)
    files, own_folder = (None, None)
    if predictions is not None:
        files, own_folder = _open_prediction_files(predictions, dataset, metadata)
    try:
        out = _evaluate_panoptic(
            model,
            dataset,
            cfg,
            device,
            metadata,
            class_map,
            progress,
            desc,
            overlay_dir,
            num_overlays,
            max_images,
            files,
        )
        if files is not None:
            out["predictions_json"] = files.close()
    except BaseException:
        if files is not None:
            files.abort()
        raise
    finally:
        if own_folder is not None:
            own_folder.close()
    return out


def _evaluate_panoptic(
    model, dataset, cfg, device, metadata, class_map, progress, desc, overlay_dir, num_overlays, max_images, files
) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    model.eval()
    # Prediction files must have the ground truth's size: score (and write) at the dataset's resolution.
    at_original_size = bool(cfg.data.resize_long_side) or files is not None
    loader = _panoptic_loader(dataset, cfg, device, metadata, at_original_size, max_images, model)
    scores = _PanopticScores(metadata, cfg.eval.compute_ap)
    consumers: List[Any] = [scores]
    if files is not None:
        consumers.append(files)
    if overlay_dir and num_overlays > 0 and is_main_process():
        consumers.append(_Overlays(overlay_dir, num_overlays, metadata))
    batches = tqdm(
        loader,
        desc=desc,
        unit="img" if cfg.eval.batch_size == 1 else "batch",
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    )
    settings = postprocess_settings(model, cfg)  # once per evaluation, not per batch
    for batch in batches:
        reraise_carried(batch)
        for scored in _predict_batch(model, batch, cfg, device, metadata, class_map, settings, at_original_size):
            for consumer in consumers:
                consumer.process(scored)
    return scores.evaluate()


def _panoptic_loader(
    dataset, cfg: Config, device, metadata, at_original_size: bool, max_images: Optional[int], model=None
) -> DataLoader:
    """This process's shard of ``dataset`` (up to the image limit), with the evaluation transform;
    ``at_original_size`` keeps the untransformed labels too."""
    from ..data.collate import collate_panoptic

    transform = build_eval_transform(cfg, metadata, model=model)  # pads with the model's pad_value
    if at_original_size:
        transform = _KeepOriginalLabels(transform)
    wrapped = SeededDataset(dataset, transform, carry_errors=True)
    limit = max_images if max_images is not None else cfg.eval.max_images
    sampler = ShardSampler(len(dataset), get_rank(), get_world_size(), limit=limit)
    workers = cfg.data.eval_num_workers if cfg.data.eval_num_workers is not None else cfg.data.num_workers
    return DataLoader(
        wrapped,
        batch_size=cfg.eval.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=CarryingCollate(collate_panoptic),
        generator=torch.Generator(),
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_sigint,
    )


@dataclass
class ScoredImage:
    """One image's prediction and ground truth at the resolution it is scored at (the dataset's
    own with ``at_original_size``, else the valid part of the model's input)."""

    image_id: Any
    file_name: Optional[str]
    image: torch.Tensor  # (3, H, W) in [0, 1]
    result: Dict[str, Any]  # the panoptic merge's dict (segments_info, instances, ...)
    panoptic: torch.Tensor
    semantic: torch.Tensor
    gt: Dict[str, torch.Tensor]  # semantic, instance, crowd
    h: int
    w: int


def _predict_batch(model, batch, cfg: Config, device, metadata, class_map, settings, at_original_size: bool):
    """The batch's images as :class:`ScoredImage`; images of different sizes run one at a time."""
    images = batch["image"]
    if isinstance(images, list):
        groups = [(img[None], [i]) for i, img in enumerate(images)]
    else:
        groups = [(images, list(range(len(images))))]
    for imgs, idxs in groups:
        raw = _reorder_classes(raw_outputs(model, imgs.to(device, non_blocking=True), cfg), class_map)
        results = postprocess_outputs(raw, metadata, settings, full=True)
        for r, i in zip(results, idxs):
            yield _scored_image(batch, i, r, tuple(imgs.shape[-2:]), at_original_size)


def _scored_image(batch, i: int, r: Dict[str, Any], input_hw, at_original_size: bool) -> ScoredImage:
    h, w = _valid_hw(batch, i, input_hw)
    pan = r["panoptic"][:h, :w].cpu()
    sem_pred = r["semantic"][:h, :w].cpu()
    image = batch["image"][i][:, :h, :w]
    if at_original_size:
        gt = {k: batch[f"orig_{k}"][i] for k in ("semantic", "instance", "crowd")}
        size = tuple(gt["semantic"].shape[-2:])
        pan, sem_pred = resize_nearest(pan, size), resize_nearest(sem_pred, size)
        r = dict(r, panoptic=pan)
        image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        h, w = size
    else:
        gt = {k: batch[k][i][:h, :w] for k in ("semantic", "instance", "crowd")}
    ids, names = batch.get("image_id"), batch.get("file_name")
    return ScoredImage(
        ids[i] if ids is not None else None, names[i] if names is not None else None, image, r, pan, sem_pred, gt, h, w
    )


class _PanopticScores:
    """PQ / SQ / RQ, mIoU and optionally mask AP over the scored images, summed over processes."""

    def __init__(self, metadata, compute_ap: bool):
        from ..evaluation import InstanceAP, PanopticQuality, SemanticIoU

        self.pq = PanopticQuality(metadata)
        self.miou = SemanticIoU(metadata.num_classes, metadata.ignore_label, metadata.class_names)
        self.ap = InstanceAP(metadata) if compute_ap else None
        self.n_images = 0

    def process(self, s: ScoredImage) -> None:
        self.pq.update(s.panoptic, s.gt["semantic"], s.gt["instance"], s.gt["crowd"])
        self.miou.update(s.semantic, s.gt["semantic"])
        if self.ap is not None:
            self.ap.update(_instances_for_ap(s.result, s.h, s.w), dict(s.gt))
        self.n_images += 1

    def evaluate(self) -> Dict[str, Any]:
        """The scores in percent (collective: every process calls it)."""
        for ev in (self.pq, self.miou) + ((self.ap,) if self.ap is not None else ()):
            reduce_evaluator_states(ev)
        n_total = int(all_reduce_tensor(torch.tensor([self.n_images], dtype=torch.float64)).item())
        pq_res = self.pq.compute()
        miou_res = self.miou.compute()
        out: Dict[str, Any] = {"num_images": n_total}
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for k in ("pq", "sq", "rq"):
                out[f"{k.upper()}{suffix}"] = 100.0 * pq_res[group][k]
        out["mIoU"] = 100.0 * miou_res["miou"]
        out["pixel_accuracy"] = 100.0 * miou_res["pixel_accuracy"]
        if self.ap is not None:
            for k, v in self.ap.compute().items():
                if isinstance(v, float) and k.startswith("ap"):
                    out["AP" + k[2:]] = 100.0 * v  # ap -> AP, ap50 -> AP50, ap_small -> AP_small
        out["_pq_results"] = pq_res
        out["_miou_results"] = miou_res
        return out


class _Overlays:
    """Input | prediction | ground truth PNGs of the first ``limit`` images, into ``folder``."""

    def __init__(self, folder: str, limit: int, metadata):
        self.folder = folder
        self.limit = limit
        self.metadata = metadata
        self.written = 0

    def process(self, s: ScoredImage) -> None:
        if self.written >= self.limit:
            return
        write_overlay(
            os.path.join(self.folder, f"{s.image_id}.png"),
            s.image.clamp(0, 1),
            s.panoptic,
            {"semantic": s.gt["semantic"], "instance": s.gt["instance"]},
            metadata=self.metadata,
        )
        self.written += 1


@torch.no_grad()
def evaluate_classification(
    model, dataset, cfg: Config, device, progress: bool = True, desc: str = "eval", max_images: Optional[int] = None
) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    from ..evaluation import ClassificationAccuracy
    from .builders import build_eval_transform as _bet

    model.eval()
    tf = _bet(cfg)
    wrapped = SeededDataset(dataset, lambda item: (tf(item[0]), item[1]), carry_errors=True)
    limit = max_images if max_images is not None else cfg.eval.max_images
    sampler = ShardSampler(len(dataset), get_rank(), get_world_size(), limit=limit)
    workers = cfg.data.eval_num_workers if cfg.data.eval_num_workers is not None else cfg.data.num_workers
    loader = DataLoader(
        wrapped,
        batch_size=max(cfg.eval.batch_size, 1),
        sampler=sampler,
        num_workers=workers,
        collate_fn=CarryingCollate(default_collate),
        generator=torch.Generator(),
        worker_init_fn=ignore_sigint,
    )
    acc = ClassificationAccuracy(topk=(1, 5))
    for batch in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        reraise_carried(batch)
        images, labels = batch
        logits = model(images.to(device))
        acc.update(logits.float().cpu(), labels)
    reduce_evaluator_states(acc)
    res = acc.compute()
    out = {}
    for k, v in res.items():
        if k.startswith("top"):
            out[k] = 100.0 * float(v)
        elif isinstance(v, (int, float)):
            out[k] = v
    return out


def _refuse_empty(dataset, max_images: Optional[int], cfg: Config, source: Optional[str]) -> None:
    """An empty split or a limit of 0 images would print an all-zero table as if it were a score."""
    limit = max_images if max_images is not None else cfg.eval.max_images
    where = source or f"{cfg.data.dataset} split"
    if len(dataset) == 0:
        raise UserError(f"nothing to evaluate: {where} has no images")
    if limit is not None and int(limit) < 1:
        raise UserError(
            f"nothing to evaluate: the image limit is {limit} (--max-images / eval.max_images "
            f"must be at least 1, or null for all)"
        )


def evaluate_model(
    model, dataset, cfg: Config, device, metadata=None, progress: bool = True, desc: str = "eval", **kw
) -> Dict[str, Any]:
    _refuse_empty(dataset, kw.get("max_images"), cfg, kw.get("dataset_source"))
    if cfg.experiment.task == "classification":
        if kw.get("predictions") is not None:
            raise UserError(
                "--predictions: prediction files are panoptic (COCO-panoptic PNG + JSON); this is a "
                "classification model"
            )
        return evaluate_classification(
            model, dataset, cfg, device, progress=progress, desc=desc, max_images=kw.get("max_images")
        )
    return evaluate_panoptic(model, dataset, cfg, device, metadata=metadata, progress=progress, desc=desc, **kw)


def format_results(metrics: Dict[str, Any], metadata=None, per_class: bool = False) -> str:
    """The one-screen summary: PQ/SQ/RQ for All/Things/Stuff (per class on request), mIoU, AP."""
    lines = []
    if "_pq_results" in metrics:
        from ..evaluation import format_pq_table

        names = None
        if per_class:
            names = {k: k for k in metrics["_pq_results"]["per_class"]}
        lines.append(format_pq_table(metrics["_pq_results"], names))
        extra = [f"mIoU {metrics['mIoU']:.1f}"]
        if "pixel_accuracy" in metrics:
            extra.append(f"pixel accuracy {metrics['pixel_accuracy']:.1f}")
        for k in ("AP", "AP50", "AP75"):
            if k in metrics:
                extra.append(f"{k} {metrics[k]:.1f}")
        lines.append("   ".join(extra) + f"   ({metrics.get('num_images', '?')} images)")
        if per_class and "_miou_results" in metrics:
            iou = metrics["_miou_results"].get("per_class", {})
            lines.append("per-class IoU: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in iou.items() if v == v))
    else:
        lines.append("   ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, (int, float))))
    return "\n".join(lines)
