"""dali-float: fast data pipelines for training FLOAT (audio-driven talking portraits).

Modules, one concern each:
  config        presets and every model dimension
  contract      the batch every loader returns
  cache         the on-disk feature cache: format (layout, records, entries, fingerprint), index, store
                (shards), view (the training view), check (verify), migrate, lock (one writer, reader leases)
  media         decoding, 25 fps conversion, crop/resize, audio (shared by preprocessing and the naive loader)
  demo          the built-in demo corpus
  models        motion encoder, audio encoder, emotion encoder, flow-matching transformer
  preprocess    videos -> cache (DALI decode + batched encoder inference)
  loaders       naive / torch / dali loaders of the batch contract
  training      the fp16 flow-matching trainer
  progress      progress bars: tqdm on a terminal, a plain line now and then in a log file
"""
__version__ = "0.1.0"
