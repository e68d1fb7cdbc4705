"""Input pipeline: tokenizer, document sources, objectives, packing, grain.

Entry points: `tokenizer.resolve(config)` and `pipeline.make_dataset(config, ...)`.
This package never imports models or training code.
"""
