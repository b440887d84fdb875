"""headstart: transfer learning on images. A pretrained backbone, a new head, a good classifier now.

    >>> import headstart
    >>> clf = headstart.ImageClassifier().fit("photos/")      # efficientnet_lite0, frozen, cached features
    >>> clf.predict(["new.jpg"]); clf.save("run")
    >>> clf = headstart.load("run")
"""

__version__ = "0.1.0"

from .api import ImageClassifier, load  # noqa: E402
from .backbones import Backbone, DataConfig, create_backbone  # noqa: E402
from .errors import HeadstartError  # noqa: E402
from .heads import Head, HeadConfig  # noqa: E402
from .summary import summary  # noqa: E402

__all__ = ["ImageClassifier", "load", "Backbone", "DataConfig", "create_backbone", "Head", "HeadConfig",
           "HeadstartError", "summary", "__version__"]
