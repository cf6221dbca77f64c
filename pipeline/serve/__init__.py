"""A trained captioner at work: captioning image files for the command line (caption) and the
web page (web)."""
