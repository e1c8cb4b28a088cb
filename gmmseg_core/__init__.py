"""gmmseg: generative (Gaussian-mixture) versus discriminative (softmax) semantic segmentation.

The library behind the study notebooks. Modules, each with one job:

``mixture``   diagonal-Gaussian mixture math (log-likelihoods, log-domain Sinkhorn, EM, ``GaussianMixture``)
``heads``     ``SoftmaxHead`` and ``GMMHead``, drop-in classifiers over a feature map
``models``    feature extractors and ``build_model``
``data``      datasets and ``build_dataset``
``scoring``   anomaly scores; ``metrics`` segmentation, anomaly and calibration metrics
``train``     the online-hybrid training loop; ``evaluate`` inference and evaluations
``config``    configs and named profiles; ``reproduce`` runs the notebooks; ``cli`` the ``gmmseg`` command
"""

__version__ = "0.1.1"
