"""Training chest X-ray classifiers on folder datasets: ``python -m training {train,evaluate,compare}``.

Modules: ``config`` (TrainConfig), ``data`` (scanning, class map, patient-level split, duplicates,
manifest), ``cache`` (decode once through cxr_core, uint8 cache), ``dataset`` (splits as arrays,
PyDataset batches), ``build`` (model, initial weights, phases, augmentation), ``hardware`` (backend,
mixed precision, data parallelism), ``loop`` (epochs, checkpoint, resume), ``train`` (``run(config)``),
``evaluate`` and ``compare``. Keras 3 only: runs under the TensorFlow, JAX or PyTorch backend.
"""
