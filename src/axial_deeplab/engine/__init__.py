"""Training, evaluation and prediction: configs, optimizers and schedules, checkpoints,
distributed set-up, the loops, and pictures. Submodules are imported on demand so that
``import axial_deeplab`` stays light; the main entry points are

* :func:`axial_deeplab.engine.config.load_config` (YAML + dotted overrides),
* :func:`axial_deeplab.engine.train.train`,
* :func:`axial_deeplab.engine.evaluate.evaluate_model`,
* :func:`axial_deeplab.engine.predict.predict_images`.
"""
