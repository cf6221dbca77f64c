"""The web page: a Gradio app (the ecosystem's convention for model demos) around a
:class:`~pipeline.captioner.Captioner`.

Upload an image (or pick an example), choose the beam size, and get the k best captions with
their log-probabilities and, for the best, the attention over the image word by word. Uploads are
limited in bytes (``MAX_BYTES``, refused by Gradio itself) and in pixels (``MAX_PIXELS``, read from
the file's header before it is decoded); a file that cannot be used gets a message in the page and
the server goes on. `cli.py serve` starts it, bound to 127.0.0.1 unless told otherwise.
"""

import os
from dataclasses import replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..captioner import Captioner
from ..config import DECODE, DecodeConfig
from ..io.errors import PipelineError, param
from ..plots import attention_overlay

MAX_BYTES = 20 * 2**20  # bytes per upload
MAX_PIXELS = 40_000_000  # width x height of an uploaded image
TITLE = "Show, Attend and Tell"
IMAGE_TYPES = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"]


def upload_problem(path) -> str | None:
    """Why the uploaded file at ``path`` is refused before decoding (too many bytes or pixels,
    not an image), or None."""
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        return f"the file has {size / 2**20:.1f} MiB; the limit is {MAX_BYTES / 2**20:.0f} MiB"
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # PIL's own limit, far above MAX_PIXELS
        return (
            f"the image has over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; the limit is {MAX_PIXELS / 1e6:.0f}"
        )
    except (UnidentifiedImageError, OSError, ValueError):
        return "this is not an image file (JPEG, PNG, ...)"
    if width * height > MAX_PIXELS:
        return f"the image has {width} x {height} pixels; the limit is {MAX_PIXELS / 1e6:.0f} megapixels"
    return None


def caption_upload(captioner: Captioner, path, beam_size: int, settings: DecodeConfig = DECODE):
    """What the page shows for an upload: (best caption, rows [caption, log-probability] of the
    k best, [(attention overlay, word)] of the best, status message in Markdown); decoded with
    ``settings`` at the page's ``beam_size``."""
    if not path:
        return "", [], [], "Upload an image, or pick an example below."
    name = Path(path).name
    problem = upload_problem(path)
    if problem is None:
        try:
            captions = captioner.n_best([path], **vars(replace(settings, beam_size=int(beam_size))))[0]
        except PipelineError as e:
            problem = getattr(e, "reason", str(e))
    if problem is not None:
        return "", [], [], f"**{name} could not be captioned:** {problem}."
    best = captions[0]
    rows = [[c.text, round(c.log_prob, 3)] for c in captions]
    overlays = [
        (attention_overlay(best.image, best.attention[t].flatten(), best.attention.shape[1:]), word)
        for t, word in enumerate(best.tokens)
    ]
    return best.text, rows, overlays, f"{name}: {len(captions)} best of beam size {int(beam_size)}."


def build_page(captioner: Captioner, examples: list[str] | None = None, settings: DecodeConfig = DECODE):
    """The Gradio Blocks of the page (not started); its beam size starts at ``settings``'."""
    import gradio as gr

    with gr.Blocks(title=TITLE) as page:
        gr.Markdown(
            f"# {TITLE}\nNeural image captioning with visual attention (Xu et al. 2015). Upload an image; "
            "the attention of each word of the best caption is shown over the image."
        )
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image", file_types=IMAGE_TYPES, type="filepath", elem_id="upload")
                beam = gr.Slider(
                    1,
                    max(10, settings.beam_size),
                    value=settings.beam_size,
                    step=1,
                    label="Beam size",
                    elem_id="beam-size",
                )
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[upload], label="Examples")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                best = gr.Textbox(label="Best caption", elem_id="caption", interactive=False)
                table = gr.Dataframe(
                    headers=["caption", "log-probability"], label="k best captions", elem_id="n-best", interactive=False
                )
                gallery = gr.Gallery(label="Attention, word by word", columns=5, elem_id="attention")
        outputs = [best, table, gallery, status]

        def run(path, k):
            return caption_upload(captioner, path, k, settings)

        button.click(run, [upload, beam], outputs)
        upload.change(run, [upload, beam], outputs)  # uploads, examples
    return page


def serve(
    captioner: Captioner,
    host: str = "127.0.0.1",
    port: int = 7860,
    examples: list[str] | None = None,
    settings: DecodeConfig = DECODE,
) -> None:
    """Start the page and serve it until interrupted (Ctrl-C).
    Raises PipelineError if nothing can listen at ``host``:``port`` (a port in use, an address
    this machine does not have)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    page = build_page(captioner, examples, settings)
    try:
        page.launch(server_name=host, server_port=port, max_file_size=MAX_BYTES, show_error=True, quiet=True)
    except OSError as e:  # Gradio's "Cannot find empty port" (no strerror), or the socket's own error
        why = e.strerror or "the port is in use, or the address is not this machine's"
        raise PipelineError(
            f"{host}:{port}: the page cannot listen there ({why}); pass another {param('port')} or {param('host')}"
        ) from None
