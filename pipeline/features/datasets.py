"""Dataset adapters: each turns a corpus on disk into :class:`Record` s.

- ``flickr8k``: the official release layout (Hodosh et al. 2013) under a data folder.
- ``flickr30k``, ``coco``: the Karpathy split json and the images in their usual layout under a
  data folder (see ``KARPATHY_LAYOUTS`` and the README's "Datasets" section).
- ``karpathy``: a Karpathy-split json (``dataset_flickr8k.json``, ``dataset_flickr30k.json``,
  ``dataset_coco.json``, or your own in that format) plus an image root.
- ``synthetic``: coloured shapes at known grid positions with captions from a small grammar,
  generated on demand; written as a Karpathy json so it is read by the ``karpathy`` adapter.
"""

import json
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..io.atomic import atomic_path, write_json
from ..io.errors import PipelineError, param

DATASETS = ("flickr8k", "flickr30k", "coco", "karpathy", "synthetic")
KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
# dataset -> (its Karpathy json, the folder its entries' filepath/filename are relative to), in DATA_DIR
KARPATHY_LAYOUTS = {"flickr30k": ("dataset_flickr30k.json", "flickr30k-images"), "coco": ("dataset_coco.json", ".")}


@dataclass(frozen=True)
class Record:
    """One image of a corpus: its id (unique within the corpus), file, split and raw captions."""

    image_id: str
    image_path: Path
    split: str
    captions: tuple[str, ...]


def load_records(dataset: str, data_dir=None, karpathy_json=None, image_dir=None) -> list[Record]:
    """Records of ``dataset`` (one of ``DATASETS``), in a fixed order.

    data_dir: the dataset's folder (default: ``data/DATASET``).
    karpathy_json, image_dir: for 'karpathy' only.
    Raises PipelineError for an unknown dataset, unusable files, or a folder or file the dataset
    does not read (given, it would be ignored).
    """
    if dataset != "karpathy" and (karpathy_json or image_dir):
        raise PipelineError(
            f"{param('karpathy_json')} and {param('image_dir')} are read with {param('dataset', 'karpathy')} only; "
            f"{param('dataset', dataset)} reads {param('data_dir')}"
        )
    if dataset == "karpathy" and data_dir:
        raise PipelineError(
            f"{param('dataset', 'karpathy')} reads {param('karpathy_json')} and {param('image_dir')}, "
            f"not {param('data_dir')}"
        )
    if dataset == "flickr8k":
        return load_flickr8k(data_dir or "data/flickr8k")
    if dataset in KARPATHY_LAYOUTS:
        folder = Path(data_dir or f"data/{dataset}")
        json_name, images = KARPATHY_LAYOUTS[dataset]
        if not (folder / json_name).exists():
            raise PipelineError(
                f"{folder / json_name}: missing; get it from {KARPATHY_URL} (it holds the Karpathy "
                f"splits of Flickr8k, Flickr30k and COCO) and put it there"
            )
        return load_karpathy(folder / json_name, folder / images)
    if dataset == "synthetic":
        folder = Path(data_dir or "data/synthetic")
        return load_karpathy(make_synthetic(folder), folder)
    if dataset == "karpathy":
        if not karpathy_json or not image_dir:
            raise PipelineError(
                f"{param('dataset', 'karpathy')} needs {param('karpathy_json')} and {param('image_dir')}"
            )
        return load_karpathy(karpathy_json, image_dir)
    raise PipelineError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


# --- Flickr8k, official layout ---------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FLICKR8K_SPLITS = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark, where written, dropped
    except FileNotFoundError:
        raise PipelineError(
            f"{path}: missing {what}; point {param('data_dir')} at a folder laid out like the "
            "official Flickr8k release (Flickr8k_text/, Flicker8k_Dataset/)"
        ) from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text ({e}); re-save it as UTF-8") from None


def load_flickr8k(data_dir) -> list[Record]:
    """Records of Flickr8k in its official release layout under ``data_dir``.

    Reads ``Flickr8k_text/Flickr8k.token.txt`` (``IMAGE.jpg#N<TAB>caption``) and the official
    ``Flickr_8k.{train,dev,test}Images.txt`` split lists; images are ``Flicker8k_Dataset/IMAGE``
    (the release's spelling). Caption lines whose image name is not an image file name (the
    release's quirk ``2258277193_586949ec62.jpg.1``) and images listed in no split (91 in the
    release) are skipped with a warning. Images need not exist yet: a
    missing image is reported by feature extraction.

    Raises PipelineError naming the file and line of a malformed caption line, or a split-listed
    image with no caption.
    """
    root = Path(data_dir)
    text = root / "Flickr8k_text"
    token_file = text / "Flickr8k.token.txt"
    captions, quirks = defaultdict(list), []
    for n, line in enumerate(_read_lines(token_file, "caption file"), 1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        image, hash_, number = name.partition("#")
        if not tab or not hash_ or not image or not number.isdigit():
            raise PipelineError(f"{token_file}:{n}: expected 'IMAGE.jpg#N<TAB>caption', got {line[:80]!r}")
        if not caption.strip():
            raise PipelineError(f"{token_file}:{n}: empty caption for {image}; remove the line or add text")
        if not image.lower().endswith(IMAGE_SUFFIXES):
            quirks.append(f"line {n}: {image}")
            continue
        captions[image].append(caption.strip())
    if quirks:
        warnings.warn(
            f"{token_file}: skipped {len(quirks)} caption line(s) whose image name is not an image "
            f"file ({'; '.join(quirks[:2])}{' ...' if len(quirks) > 2 else ''})",
            stacklevel=2,
        )
    records, listed = [], set()
    for split, fname in FLICKR8K_SPLITS.items():
        split_file = text / fname
        for n, image in enumerate(_read_lines(split_file, f"{split} split list"), 1):
            image = image.strip()
            if not image:
                continue
            if image in listed:
                raise PipelineError(f"{split_file}:{n}: {image} is listed twice across the split files")
            if image not in captions:
                raise PipelineError(f"{split_file}:{n}: {image} has no caption in {token_file}")
            listed.add(image)
            records.append(Record(image, root / "Flicker8k_Dataset" / image, split, tuple(captions[image])))
    orphans = sorted(set(captions) - listed)
    if orphans:  # the release captions 8091 images, of which 8000 are in its splits
        warnings.warn(
            f"{token_file}: {len(orphans)} captioned image(s) are in no split file and are not used "
            f"({', '.join(orphans[:2])}{' ...' if len(orphans) > 2 else ''})",
            stacklevel=2,
        )
    return records


# --- Karpathy split json -----------------------------------------------------------------------

KARPATHY_SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def load_karpathy(json_path, image_dir) -> list[Record]:
    """Records of a Karpathy-split json (``{"images": [{"filename", "split", "sentences"}, ...]}``).

    Image paths are ``image_dir/filepath/filename`` (``filepath`` is present for COCO only).
    Splits: ``train``, ``val``, ``test``; ``restval`` counts as ``train`` (the usual practice).
    Captions are each sentence's ``raw`` text, or its ``tokens`` joined where ``raw`` is absent.
    Image ids are ``cocoid`` / ``imgid`` where given, else the file name.

    Raises PipelineError naming the file and image entry that is malformed.
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    try:
        images = json.loads(json_path.read_text(encoding="utf-8-sig"))["images"]
    except FileNotFoundError:
        raise PipelineError(f"{json_path}: no such Karpathy split json; check {param('karpathy_json')}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{json_path}: not a Karpathy split json with an 'images' list ({e})") from None
    if not isinstance(images, list):
        raise PipelineError(f"{json_path}: 'images' is a {type(images).__name__}, not a list of image entries")
    records, seen = [], set()
    for n, entry in enumerate(images):
        where = f"{json_path}: images[{n}]"
        try:
            filename, split, sentences = entry["filename"], entry["split"], entry["sentences"]
            if not all(isinstance(v, str) for v in (filename, split, entry.get("filepath", ""))):
                raise TypeError("filename, filepath and split must be strings")
            if not isinstance(sentences, list):
                raise TypeError("sentences must be a list")
            captions = tuple(_sentence_text(s) for s in sentences)
        except KeyError as e:
            raise PipelineError(
                f"{where}: missing field {e} (each image needs filename, split, sentences with raw or tokens)"
            ) from None
        except (TypeError, AttributeError) as e:
            raise PipelineError(f"{where}: malformed entry ({e})") from None
        if split not in KARPATHY_SPLIT_NAMES:
            raise PipelineError(
                f"{where} ({filename}): unknown split {split!r}; use one of {', '.join(sorted(KARPATHY_SPLIT_NAMES))}"
            )
        split = KARPATHY_SPLIT_NAMES[split]
        if not captions:
            raise PipelineError(f"{where} ({filename}): has no sentences; give it its captions or drop the image")
        if not all(c.strip() for c in captions):
            raise PipelineError(f"{where} ({filename}): has an empty caption; fix or drop that sentence")
        image_id = str(entry.get("cocoid", entry.get("imgid", filename)))
        if image_id in seen:
            raise PipelineError(f"{where}: duplicate image id {image_id}; each image must appear once")
        seen.add(image_id)
        records.append(Record(image_id, image_dir / entry.get("filepath", "") / filename, split, captions))
    return records


def _sentence_text(sentence: dict) -> str:
    """A Karpathy sentence's caption: its ``raw`` string, or its ``tokens`` (strings) joined.
    Raises KeyError without either, TypeError where they are not strings."""
    raw = sentence.get("raw")
    if raw is not None and not isinstance(raw, str):
        raise TypeError("a sentence's raw must be a string")
    if raw:
        return raw
    tokens = sentence["tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise TypeError("a sentence's tokens must be a list of strings")
    return " ".join(tokens)


# --- synthetic ---------------------------------------------------------------------------------

SYNTHETIC_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SYNTHETIC_SHAPES = ("circle", "square", "triangle")
SYNTHETIC_PLACES = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
SYNTHETIC_SIZES = {"train": 1000, "val": 100, "test": 100}


def synthetic_scene(rng: random.Random):
    """A random scene: 1 or 2 objects ``(colour, shape, (row, col))`` in distinct cells of a 2x2
    grid, in reading order (top left first)."""
    cells = rng.sample(sorted(SYNTHETIC_PLACES), rng.choice((1, 2)))
    return [(rng.choice(sorted(SYNTHETIC_COLOURS)), rng.choice(SYNTHETIC_SHAPES), cell) for cell in sorted(cells)]


def synthetic_captions(scene) -> tuple[str, ...]:
    """The grammar: objects named in reading order, in two phrasings."""
    names = " and ".join(f"a {colour} {shape} at the {SYNTHETIC_PLACES[cell]}" for colour, shape, cell in scene)
    return (names, f"there is {names}")


def draw_synthetic(scene, rng: random.Random, size: int = 224):
    """Render ``scene`` on a light, noisy background: each object fills most of its grid cell."""
    from PIL import Image, ImageDraw

    img = Image.effect_noise((size, size), 12).convert("RGB").point(lambda v: 150 + v // 3)
    draw = ImageDraw.Draw(img)
    cell = size // 2
    for colour, shape, (row, col) in scene:
        r = int(cell * rng.uniform(0.28, 0.38))
        cx = col * cell + cell // 2 + rng.randint(-cell // 10, cell // 10)
        cy = row * cell + cell // 2 + rng.randint(-cell // 10, cell // 10)
        fill = SYNTHETIC_COLOURS[colour]
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def make_synthetic(folder, sizes: dict | None = None, seed: int = 0) -> Path:
    """Generate the synthetic corpus into ``folder`` unless it is already there; returns its json.

    Writes ``folder/images/NNNNN.jpg`` (224x224 JPEG) and, last and atomically,
    ``folder/dataset_synthetic.json`` in Karpathy format. A marker file written first
    (``.synthetic-in-progress``, removed at the end) lets a rerun redo an interrupted generation.
    sizes: images per split (default ``SYNTHETIC_SIZES``: train 1000, val 100, test 100).
    Raises PipelineError, before writing anything, if ``folder`` holds anything else: files that
    are not an earlier generation's, or a corpus generated with other sizes or seed.
    """
    folder = Path(folder)
    sizes = dict(sizes or SYNTHETIC_SIZES)
    json_path, marker = folder / "dataset_synthetic.json", folder / ".synthetic-in-progress"
    params = {"sizes": sizes, "seed": seed, "version": 1}
    if json_path.exists():
        try:
            made = json.loads(json_path.read_text(encoding="utf-8"))["params"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            made = None
        if made == params:
            return json_path
        what = f"generated with other settings ({made})" if made else "not a generated corpus"
        raise PipelineError(
            f"{json_path}: {what}; it is left as it is: pass another {param('data_dir')} (the corpus is "
            "generated in a new or empty folder)"
        )
    if folder.exists() and not marker.exists() and any(folder.iterdir()):
        raise PipelineError(
            f"{folder}: holds files of its own, so the synthetic corpus is not generated there; "
            f"pass a new or empty {param('data_dir')}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    write_json(marker, params)
    rng = random.Random(seed)
    (folder / "images").mkdir(exist_ok=True)
    images = []
    for split, count in sizes.items():
        for _ in range(count):
            n = len(images)
            scene = synthetic_scene(rng)
            filename = f"{n:05d}.jpg"
            with atomic_path(folder / "images" / filename) as tmp:
                draw_synthetic(scene, rng).save(tmp, format="JPEG", quality=92)
            images.append(
                {
                    "filepath": "images",
                    "filename": filename,
                    "imgid": n,
                    "split": split,
                    "sentences": [{"raw": c} for c in synthetic_captions(scene)],
                    "objects": [[colour, shape, list(cell)] for colour, shape, cell in scene],
                }
            )
    write_json(json_path, {"dataset": "synthetic", "params": params, "images": images})
    marker.unlink()
    return json_path
