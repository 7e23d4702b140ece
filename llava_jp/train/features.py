"""Stage-1 feature cache: frozen vision-tower features, computed once per image and reused.

The vision tower is frozen in every stage of the recipe, so an image's features (S2 or not,
before the projector) never change during training. Computing them once saves the tower's
forward pass (about 3.1 TFLOP per image with S2 at full size) in every epoch and every re-run
with another projector or learning rate.

Layout of a cache directory:

    CACHE_DIR/<fingerprint[:16]>/meta.json          what the features are (shape, dtype, fingerprint)
    CACHE_DIR/<fingerprint[:16]>/shard-00000.bin    (n, tokens, width) bf16, memory-mapped
    CACHE_DIR/<fingerprint[:16]>/shard-00000.json   its images: [path, file size, file mtime_ns] per row
    CACHE_DIR/<fingerprint[:16]>/faults.json        images that could not be used: reason, message, stamp

The fingerprint hashes everything the features depend on: the vision config, feature layer,
S2 scales, image preprocessing and the tower's weights (rounded to bf16, the storage
precision). A different tower gets a different directory, so stale features cannot be read. An
image is looked up by its path relative to the image folder and is valid only while the file's
size and modification time are unchanged (a later shard overrides an earlier one). A shard's
`.bin` is written first and its `.json` last, each to a temporary name then renamed, so an
interrupted run leaves only complete shards; re-running fills in the rest. An image that
cannot be loaded is recorded with the trainer's fault reason, so training skips its sample as it
would without the cache, until the file changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from llava_jp.files import write_bytes

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STORAGE_DTYPE = torch.bfloat16
_PREPROCESSING_KEYS = ("size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
                       "image_mean", "image_std", "do_convert_rgb")


def fingerprint(model, processor) -> str:
    """Hash of everything a cached feature depends on (config, preprocessing, tower weights)."""
    config = model.config
    image_processor = processor.image_processor.to_dict()
    description = {
        "version": FORMAT_VERSION,
        "vision_config": config.vision_config.to_diff_dict(),
        "vision_feature_layer": config.vision_feature_layer,
        "s2_scales": config.s2_scales,
        "s2_split_size": config.s2_split_size,
        "vision_layout": config.vision_layout,
        "pad_to_square": processor.pad_to_square,
        "preprocessing": {k: image_processor.get(k) for k in _PREPROCESSING_KEYS},
    }
    description["vision_config"].pop("transformers_version", None)
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", STORAGE_DTYPE).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def file_stamp(path: Path) -> list[int] | None:
    """What identifies one version of an image file: its size and modification time (None: no file)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


class FeatureCache:
    """One model's cached vision features: look up, load (memory-mapped) and append images."""

    def __init__(self, root: str | Path, model_fingerprint: str, tokens: int, width: int):
        self.dir = Path(root) / model_fingerprint[:16]
        self.fingerprint = model_fingerprint
        self.tokens, self.width = tokens, width
        meta = {"version": FORMAT_VERSION, "fingerprint": model_fingerprint, "tokens": tokens, "width": width,
                "dtype": "bfloat16"}
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            found = json.loads(meta_path.read_text(encoding="utf-8"))
            if found != meta:
                raise ValueError(f"{meta_path}: describes {found}, expected {meta}; delete the directory to rebuild it")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_bytes(meta_path, json.dumps(meta, indent=1).encode(), fsync=True)
        self.index: dict[str, list[int]] = {}  # image -> [shard, row, file size, file mtime_ns]
        self._shard_count = 0
        for listing in sorted(self.dir.glob("shard-*.json")):
            number = int(listing.stem.split("-")[1])
            for row, (image, *stamp) in enumerate(json.loads(listing.read_text(encoding="utf-8"))):
                self.index[image] = [number, row, *stamp]
            self._shard_count = max(self._shard_count, number + 1)
        faults_path = self.dir / "faults.json"
        # image -> [reason, message, stamp]: not loadable as of that version of the file
        self.faults: dict[str, list] = json.loads(faults_path.read_text(encoding="utf-8")) if faults_path.exists() else {}
        self._shards: dict[int, np.memmap] = {}

    @classmethod
    def for_model(cls, root: str | Path, model, processor) -> FeatureCache:
        """The cache of `model`'s vision features under `root` (created if absent)."""
        return cls(root, fingerprint(model, processor), model.num_vision_tokens, model.vision_feature_width)

    # -- lookup ------------------------------------------------------------------------------
    def stale(self, images: list[str], image_folder: str | Path | None) -> list[str]:
        """The images (paths relative to `image_folder`) that are not cached or whose file changed."""
        folder = Path(image_folder) if image_folder else Path()
        out = []
        for image in dict.fromkeys(images):
            stamp = file_stamp(folder / image)
            entry, fault = self.index.get(image), self.faults.get(image)
            if not ((entry is not None and entry[2:] == stamp) or (fault is not None and fault[2] == stamp)):
                out.append(image)
        return out

    def check_usable(self, image: str) -> None:
        """Raise the `ImageLoadError` recorded for an image that could not be loaded."""
        from llava_jp.core.processing import ImageLoadError

        if image in self.faults:
            reason, message, _ = self.faults[image]
            raise ImageLoadError(reason, message)

    def _shard(self, number: int) -> np.memmap:
        if number not in self._shards:
            path = self.dir / f"shard-{number:05d}.bin"
            rows = path.stat().st_size // (self.tokens * self.width * 2)
            self._shards[number] = np.memmap(path, dtype=np.int16, mode="r", shape=(rows, self.tokens, self.width))
        return self._shards[number]

    def load(self, images: list[str]) -> torch.Tensor:
        """(len(images), tokens, width) bf16 features, in order; KeyError names a missing image."""
        out = torch.empty(len(images), self.tokens, self.width, dtype=torch.int16)
        rows = out.numpy()  # shares memory with `out`: one copy from the mapped file
        for i, image in enumerate(images):
            if image not in self.index:
                raise KeyError(f"image {image!r} is not in the feature cache {self.dir}")
            shard, row = self.index[image][:2]
            rows[i] = self._shard(shard)[row]
        return out.view(STORAGE_DTYPE)

    # -- writing -----------------------------------------------------------------------------
    def add(self, images: list[str], features: torch.Tensor, stamps: list[list[int]]) -> None:
        """Append one shard holding `features` (n, tokens, width) for `images`."""
        if features.shape[1:] != (self.tokens, self.width):
            raise ValueError(f"features of shape {tuple(features.shape)} do not fit a cache of "
                             f"(n, {self.tokens}, {self.width})")
        number = self._shard_count
        data = features.detach().to("cpu", STORAGE_DTYPE).contiguous().view(torch.int16).numpy()
        write_bytes(self.dir / f"shard-{number:05d}.bin", data.tobytes(), fsync=True)
        listing = [[image, *stamp] for image, stamp in zip(images, stamps)]
        write_bytes(self.dir / f"shard-{number:05d}.json", json.dumps(listing, ensure_ascii=False).encode(), fsync=True)
        for row, (image, *stamp) in enumerate(listing):
            self.index[image] = [number, row, *stamp]
        self._shard_count = number + 1
        if any(image in self.faults for image in images):  # loadable again
            self.record_faults({image: None for image in images})

    def record_faults(self, faults: dict[str, list | None]) -> None:
        """Set (or with None, clear) the fault recorded for each image: [reason, message, stamp]."""
        for image, fault in faults.items():
            if fault is None:
                self.faults.pop(image, None)
            else:
                self.faults[image] = fault
        write_bytes(self.dir / "faults.json", json.dumps(self.faults, ensure_ascii=False).encode(), fsync=True)


def fill(cache: FeatureCache, model, processor, images: list[str], image_folder: str | Path | None,
         batch_size: int = 16, shard_size: int = 256, progress: bool = False) -> dict[str, int]:
    """Compute and store the features of every image that is missing or stale.

    Returns how many were computed and how many could not be loaded (recorded as faults).
    """
    from tqdm.auto import tqdm

    from llava_jp.core.processing import ImageLoadError, load_image

    folder = Path(image_folder) if image_folder else Path()
    todo = cache.stale(images, image_folder)
    device = next(model.vision_tower.parameters()).device
    counts = {"computed": 0, "faults": 0}
    bar = tqdm(total=len(todo), desc="caching features", disable=not progress)
    for start in range(0, len(todo), shard_size):
        names, stamps, pixels, faults = [], [], [], {}
        for name in todo[start:start + shard_size]:
            stamp = file_stamp(folder / name)  # before reading: a file changed meanwhile reads as stale later
            try:
                pixels.append(processor.preprocess_images([load_image(folder / name)]))
            except ImageLoadError as err:
                faults[name] = [err.reason, str(err), stamp]
                continue
            names.append(name)
            stamps.append(stamp)
        chunks = []
        with torch.no_grad():
            for i in range(0, len(pixels), batch_size):
                batch = torch.cat(pixels[i:i + batch_size]).to(device)
                chunks.append(model.encode_images(batch).to("cpu", STORAGE_DTYPE))
                bar.update(len(batch))
        if names:
            cache.add(names, torch.cat(chunks), stamps)
        if faults:
            cache.record_faults(faults)
            bar.update(len(faults))
        counts["computed"] += len(names)
        counts["faults"] += len(faults)
    bar.close()
    return counts


def open_for_training(root: str | Path, model, processor, images: list[str], image_folder: str | Path | None) -> FeatureCache:
    """The cache for a training run; fails, naming the fix, unless every image is cached and current."""
    cache = FeatureCache.for_model(root, model, processor)
    stale = cache.stale(images, image_folder)
    if stale:
        raise ValueError(
            f"feature_cache {root}: {len(stale)} of {len(set(images))} images are missing or changed "
            f"(first: {stale[0]!r}) for this vision tower ({cache.dir.name}); run "
            f"`llava-jp cache-features --model ... --data_path ... --image_folder {image_folder} --out {root}` first"
        )
    return cache
