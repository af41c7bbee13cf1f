"""Write ``<out>/{train,val}.json`` (COCO format) and ``<out>/stats.json`` for any source
(synthetic, coco, voc)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from drkd.config import DataConfig, UserError
from drkd.data import synthetic
from drkd.files import write_json


def split_stats(coco: dict[str, Any]) -> dict[str, Any]:
    """Images, instances per category, COCO size buckets (by annotation area)."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_category = Counter(names[a["category_id"]] for a in coco["annotations"])
    sizes = Counter(
        "small" if a["area"] < 32**2 else "medium" if a["area"] <= 96**2 else "large"
        for a in coco["annotations"]
        if not a.get("iscrowd", 0)
    )
    with_boxes = {a["image_id"] for a in coco["annotations"]}
    return {
        "images": len(coco["images"]),
        "images_without_annotations": len(coco["images"]) - len(with_boxes),
        "instances": len(coco["annotations"]),
        "crowd": sum(1 for a in coco["annotations"] if a.get("iscrowd", 0)),
        "instances_per_category": {n: per_category.get(n, 0) for n in sorted(names.values())},
        "size_buckets": {b: sizes.get(b, 0) for b in ("small", "medium", "large")},
    }


def shared_images(splits: dict[str, dict[str, Any]], where: str) -> None:
    """Refuse a validation split that holds training images (VOC's val is part of its
    trainval, say): the AP measured on them would overstate the detector, without a sign."""
    train = {im["file_name"] for im in splits["train"]["images"]}
    shared = [im["file_name"] for im in splits["val"]["images"] if im["file_name"] in train]
    if shared:
        raise UserError(f"{where}: {len(shared)} of the {len(splits['val']['images'])} "
                        f"validation images are training images too (first: {shared[0]})")


def prepare(cfg: DataConfig, seed: int, out_dir: Path) -> dict[str, Any]:
    """Build both splits into ``out_dir``; return the stats that were written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"source": cfg.source}
    if cfg.source == "synthetic":
        s = cfg.synthetic
        splits = {
            "train": synthetic.write_split(out_dir, "train", s.num_train, s, seed),
            "val": synthetic.write_split(out_dir, "val", s.num_val, s, seed),
        }
        extra: dict[str, dict[str, Any]] = {split: {"dropped_boxes": {}} for split in splits}
    elif cfg.source == "voc":
        from drkd.data.voc import voc_to_coco

        converted = voc_to_coco(cfg.voc)
        splits = {split: coco for split, (coco, _) in converted.items()}
        extra = {split: counts for split, (_, counts) in converted.items()}
    else:
        from drkd.data.validate import clean_coco

        c = cfg.coco
        splits, extra = {}, {}
        for split, ann, images in (
            ("train", c.train_annotations, c.train_images),
            ("val", c.val_annotations, c.val_images),
        ):
            splits[split], dropped = clean_coco(Path(ann), Path(images), c.max_images)
            extra[split] = {"dropped_boxes": dropped}
    if cfg.source != "synthetic":
        shared_images(splits, "data.voc: train_split and val_split" if cfg.source == "voc"
                      else "data.coco: train and val")
    # coco and voc: both splits are checked and built before anything is written, so bad
    # input leaves no half-prepared folder behind.
    for split, coco in splits.items():
        write_json(coco, out_dir / f"{split}.json", indent=1)
        stats[split] = {**split_stats(coco), **extra[split]}
    write_json(stats, out_dir / "stats.json", indent=1)
    return stats
