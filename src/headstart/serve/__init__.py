"""``headstart serve``: a trained model as an HTTP service with micro-batching, the OIP v2 routes and a page.

    >>> from headstart.serve import ServedModel, create_app
    >>> app = create_app(ServedModel.open("run"), ServeConfig())     # an ASGI app; or `headstart serve run`

Modules: ``model`` (run folder or ONNX file -> probabilities), ``decode`` (upload bytes -> tensor),
``batcher`` (micro-batching on one model thread), ``service`` (the two together, framework-free),
``uploads`` (body limit, reading files), ``app`` and ``oip`` (the routes), ``server`` (uvicorn, signals).
"""

from .app import create_app
from .model import ServedModel
from .server import serve

__all__ = ["create_app", "ServedModel", "serve"]
