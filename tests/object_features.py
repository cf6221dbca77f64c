"""Synthetic annotation vectors where the right caption and attention are known (no CNN).

A 4x4 grid (L=16). Each scene holds two distinct objects at two distinct cells; an annotation
vector is the object's random content vector (or nothing) plus a one-hot code of its cell, and
a little noise. The caption names the objects in reading order: "a cat and a dog".
"""

import random

import numpy as np

from pipeline.features import folder, shards
from pipeline.features.datasets import Record
from pipeline.features.extract import write_text

OBJECTS = ("cat", "dog", "car", "tree", "ball", "cup")
GRID, CONTENT = 4, 24
L, D = GRID * GRID, 24 + GRID * GRID


def scenes(n: int, rng: random.Random):
    """n scenes: [(object, cell), (object, cell)] in reading order."""
    out = []
    for _ in range(n):
        cells = sorted(rng.sample(range(L), 2))
        out.append(list(zip(rng.sample(OBJECTS, 2), cells)))
    return out


def annotations(scene, vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    a = np.zeros((L, D), np.float32)
    a[:, CONTENT:] = np.eye(L)
    a[:, :CONTENT] = 0.05 * rng.standard_normal((L, CONTENT))
    for obj, cell in scene:
        a[cell, :CONTENT] += vectors[OBJECTS.index(obj)]
    return a


def write_object_features(out, sizes=None, seed=0):
    """A features folder (manifest, vocab, captions, shards) of object scenes; returns
    {split: scenes}."""
    sizes = sizes or {"train": 1500, "val": 100, "test": 100}
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    vectors = nrng.standard_normal((len(OBJECTS), CONTENT)).astype(np.float32)
    by_split = {split: scenes(n, rng) for split, n in sizes.items()}
    records = [
        Record(f"{split}{i}", None, split, (" and ".join(f"a {o}" for o, _ in sc),))
        for split, scs in by_split.items()
        for i, sc in enumerate(scs)
    ]
    write_text(records, out, min_count=1)
    manifest = {
        "format": folder.FORMAT,
        "dataset": "objects",
        "encoder": {"name": "none"},
        "preprocess": {},
        "grid": [GRID, GRID],
        "L": L,
        "D": D,
        "dtype": "float32",
        "shard_size": 1000,
        "splits": {},
    }
    for split, scs in by_split.items():
        entries = []
        for k in range(0, len(scs), 1000):
            name = shards.shard_name(split, k // 1000)
            with shards.write_shard(out / name, L, D, "float32") as shard:
                import torch

                batch = np.stack([annotations(sc, vectors, nrng) for sc in scs[k : k + 1000]])
                shard.add([f"{split}{i}" for i in range(k, k + len(batch))], torch.from_numpy(batch))
            entries.append(shards.shard_entry(out, name))
        manifest["splits"][split] = {"planned": len(scs), "fingerprint": "", "shards": entries}
    folder.save_manifest(out, manifest)
    return by_split
