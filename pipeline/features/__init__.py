"""Stage one: image corpora (datasets) -> a frozen CNN (encoders, with the images' decoding and
preprocessing) -> annotation vectors in HDF5 shards (shards: the features-folder format; extract:
the run). Never imports the model."""
