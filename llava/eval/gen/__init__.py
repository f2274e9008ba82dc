"""The benchmark generation runner behind ``python -m llava.eval.generate``, split by role:

- ``config``: the typed run config (built once by the CLI);
- ``shards``: LLaVA's contiguous chunks, ``accelerate``/``torchrun`` ranks, part-file names;
- ``answers``: the answer file: resumable appends (flushed and fsync'd), torn-line repair, a writer lock;
- ``manifest``: what a run records next to its answers and the settings a resume must match;
- ``answering``: samples -> answer rows (direct or ECSO), with per-sample error isolation;
- ``runner``: plan, resume, batches, concurrency, progress, manifest updates;
- ``merge``: chunk files -> one answer file, every id checked;
- ``layout``: the seed/LLaVA data layout under ``--data-root``;
- ``seed``: the seed's entry points (``model_vlsafe.py`` ...) mapped onto the runner.
"""
