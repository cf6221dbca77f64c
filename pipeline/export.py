"""A model to share: a trained captioner as a folder that loads without unpickling anything.

``cli.py export`` writes, from a checkpoint::

    MODEL_DIR/
      model.safetensors     the decoder's weights (the weight average where the run kept one)
      encoder.safetensors   the encoder trunk's weights, so the folder captions on its own
      config.json           format, decoder sizes, decoding context, the encoder (name, layer,
                            weights' name and SHA-256), preprocessing, grid, storage dtype, and
                            the scores `cli.py evaluate` wrote for the checkpoint, and the
                            SHA-256 of the other four (a rerun replaces only files it wrote)
      vocab.json            the vocabulary
      README.md             a model card: what it is, how it was trained, its scores, how to use it

:func:`pipeline.captioner.export_model` writes it (through :func:`write_model_folder`);
:func:`load_model_folder` reads it back (``Captioner.from_pretrained``), from a local folder or a
Hugging Face Hub repository holding the same files.
"""

import json
from pathlib import Path

from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .config import CONTEXTS
from .features.folder import IDENTITY
from .io.atomic import remove_stale_temps
from .io.errors import PipelineError, describe, param
from .io.folders import OWNER, check_owned, check_writable, write_owned
from .model.decoder import Decoder, DecoderConfig
from .text import Vocabulary

FORMAT = "show-attend-tell-model/1"
FILES = ("model.safetensors", "encoder.safetensors", "config.json", "vocab.json", "README.md")


def _scores(checkpoint_path: Path) -> dict:
    """{'SPLIT-beamK[-settings]': scores} of every `evaluate` of the checkpoint found beside it,
    each named by its file (:func:`pipeline.eval.evaluate.output_names`: every setting that is not
    the default, other features included), so that no two settings share a row."""
    found = {}
    for path in sorted(checkpoint_path.parent.glob(f"{checkpoint_path.stem}-*.scores.json")):
        try:
            scores = json.loads(path.read_text(encoding="utf-8"))["scores"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found[path.name[len(checkpoint_path.stem) + 1 : -len(".scores.json")]] = scores
    return found


def prepare_folder(out: Path) -> None:
    """Check, before any work, that ``out`` may take a model folder: new, empty, or an earlier
    export whose files are as export wrote them (config.json lists each file's SHA-256; an export
    of earlier versions, which lists none, is replaced whole). Files of other names in an earlier
    export (a Hub clone's .gitattributes) are left alone.
    Raises PipelineError for an ``out`` that holds files but no export, or files edited since
    export wrote them (a model card)."""
    record, earlier = out / "config.json", _config(out)
    if out.is_dir():
        remove_stale_temps(out, FILES)
        if any(out.iterdir()) and earlier.get("format") != FORMAT and earlier.get("written_by") != OWNER:
            raise PipelineError(
                f"{out}: holds files that `cli.py export` did not write; pass a new or empty {param('out')}"
            )
    if "written_by" in earlier:  # an export of earlier versions records no SHA-256: replaced as it was then
        check_owned(record, [out / name for name in FILES if name != record.name], "`cli.py export`", "out")


def write_model_folder(out: Path, checkpoint_path: Path, checkpoint: dict, decoder, trunk: dict, vocab) -> Path:
    """Write the model folder of ``checkpoint`` (read from ``checkpoint_path``) into ``out``,
    checked by :func:`prepare_folder`: ``decoder`` (a Decoder: its weights), ``trunk`` (the
    encoder trunk's state dict) and ``vocab`` (a Vocabulary) as the checkpoint's captioner holds
    them. config.json goes first, without its format, and last, so that a killed export is no
    model folder until it is run again.
    Raises PipelineError where ``out`` cannot be written."""
    check_writable(out, "out")
    identity = checkpoint["features"]
    config = {
        "format": FORMAT,
        "decoder": decoder.config.to_dict(),
        "decode_context": checkpoint["train_config"]["decode_context"],
        "attention": checkpoint["train_config"]["attention"],
        **{key: identity[key] for key in IDENTITY},
        "scores": _scores(checkpoint_path),
    }
    files = {
        out / "model.safetensors": _safetensors(decoder.state_dict()),
        out / "encoder.safetensors": _safetensors(trunk),
        out / "vocab.json": vocab.to_json(),
        out / "README.md": model_card(config, len(checkpoint["vocab"])),
    }
    write_owned(out / "config.json", files, config)
    return out


def _safetensors(state: dict) -> bytes:
    return safetensors_bytes({k: v.contiguous() for k, v in state.items()})


def _config(folder: Path) -> dict:
    """The folder's config.json as a dict ({} where there is none, or it is not a JSON object)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def model_card(config: dict, vocab_size: int) -> str:
    """The folder's README.md: what the model is, its sizes and scores, and how to use it."""
    d, e = config["decoder"], config["encoder"]
    rows = (
        "".join(
            f"| {where} | "
            + " | ".join(f"{s.get(m, float('nan')):.1f}" for m in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"))
            + " |\n"
            for where, s in config["scores"].items()
        )
        or "| (not scored: run `cli.py evaluate` first) |\n"
    )
    return f"""---
library_name: show-attend-tell
tags: [image-captioning, show-attend-tell, attention]
---
# Show, Attend and Tell captioner ({config["attention"]} attention, {config["dataset"]})

An LSTM decoder with {config["attention"]} visual attention (Xu et al. 2015, arXiv 1502.03044)
over the {config["grid"][0]}x{config["grid"][1]}x{config["D"]} {e["layer"]} features of {e["name"]}
(weights: {e["weights"]}, SHA-256 {e["weights_sha256"][:12]}...), trained on {config["dataset"]}.
Decoder: embedding {d["embed_dim"]}, LSTM {d["hidden_dim"]}, attention MLP {d["attention_dim"]},
vocabulary {vocab_size} words. Preprocessing: {config["preprocess"]}.

| `cli.py evaluate` (SPLIT-beamK, then any setting not its default) | BLEU-1 | BLEU-4 | METEOR | ROUGE-L | CIDEr |
| --- | --- | --- | --- | --- | --- |
{rows}
## Use

```python
from pipeline import Captioner
captioner = Captioner.from_pretrained("path/to/this/folder")   # or a Hugging Face Hub id
print(captioner(["photo.jpg"])[0].text)
```

or `python cli.py caption photo.jpg --model path/to/this/folder`. The weights are safetensors;
nothing in this folder is unpickled.
"""


def resolve_model_folder(model: str) -> Path:
    """A local model folder, or the snapshot of Hugging Face Hub repository ``model`` (downloaded
    once into the Hub's cache). Raises PipelineError when neither can be had."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists() or model.count("/") != 1 or model.startswith((".", "/")):
        raise PipelineError(
            f"{model}: not a model folder (one written by `cli.py export`) nor a Hugging Face Hub id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=model, allow_patterns=list(FILES)))
    except Exception as e:  # noqa: BLE001 - the hub client raises many kinds (network, auth, not found)
        raise PipelineError(
            f"{model}: could not be had from the Hugging Face Hub ({describe(e)}); pass a local "
            "model folder written by `cli.py export`"
        ) from None


def load_model_folder(model: str, device: str = "cpu"):
    """(config, encoder trunk state, decoder, vocabulary) of a model folder or Hub id.
    Raises PipelineError for a folder that is not a complete export of this format."""
    folder = resolve_model_folder(model)
    missing = [name for name in FILES[:4] if not (folder / name).is_file()]
    config = _config(folder)
    if missing or config.get("format") != FORMAT:
        raise PipelineError(
            f"{folder}: not a model folder written by `cli.py export` (missing or foreign: "
            f"{', '.join(missing) or 'config.json'})"
        )
    if not isinstance(config.get("decoder"), dict) or config.get("decode_context") not in CONTEXTS:
        raise PipelineError(
            f"{folder}: config.json has a missing or malformed 'decoder' or 'decode_context'; export it again"
        )
    try:
        decoder = Decoder(DecoderConfig(**config["decoder"]))
        decoder.load_state_dict(load_file(str(folder / "model.safetensors")))
        trunk = load_file(str(folder / "encoder.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors and torch raise many kinds for damaged files
        raise PipelineError(f"{folder}: its weights cannot be loaded ({describe(e)}); export it again") from None
    vocab = Vocabulary.load(folder / "vocab.json", fix="export it again")
    if len(vocab) != decoder.config.vocab_size:
        raise PipelineError(f"{folder}: vocab.json has {len(vocab)} words, the decoder {decoder.config.vocab_size}")
    return config, trunk, decoder.to(device), vocab
