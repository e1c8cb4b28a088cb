"""gmmseg: generative (Gaussian-mixture) versus discriminative (softmax) semantic segmentation.

The library behind the study notebooks. Modules, each with one job:

``mixture``   diagonal-Gaussian mixture math (log-likelihoods, log-domain Sinkhorn, EM, ``GaussianMixture``)
``heads``     ``SoftmaxHead`` and ``GMMHead``, drop-in classifiers over a feature map
``models``    feature extractors and ``build_model``
``data``      datasets and ``build_dataset``
``scoring``   anomaly scores; ``metrics`` segmentation, anomaly and calibration metrics
``train``     the online-hybrid training loop; ``evaluate`` inference and evaluations
``predict``   a trained model applied to image files (label maps, anomaly heat maps)
``config``    ``TrainConfig``; ``profiles`` the notebooks' parameter sets (smoke, cpu, gpu) and shared models
``plots``     the notebooks' figure helpers; ``reproduce`` runs the notebooks; ``cli`` the ``gmmseg`` command
(``head_ops``, ``memory`` and ``distributed`` are helpers of ``heads`` and ``train``.)

README.md says how to run the study and use the library; ``gmmseg --help`` lists the commands.
"""

__version__ = "0.1.1"
