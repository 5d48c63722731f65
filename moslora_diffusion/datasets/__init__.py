"""Training data from a practitioner's own photos: images, captions, kohya dataset files, aspect-ratio
buckets, masks and disk caches; one small module per job (see each module's docstring)."""
