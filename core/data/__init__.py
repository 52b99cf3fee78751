"""Data sets: the record format (records), ADM preprocessing (preprocess), image sources
(sources, emoji), preparing shards (prepare; ``python -m core.data``) and the grain loader
(pipeline)."""
