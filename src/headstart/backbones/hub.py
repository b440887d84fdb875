"""The model hub (timm's weights through huggingface_hub): weights from its local cache with no network call,
and a hub that cannot be reached found out once, in seconds.

huggingface_hub retries a failed request five times with back-off (about half a minute per file, and timm
asks for two files) and has no setting that stops it. So before a download, headstart asks the hub once, with
a short timeout, whether it answers at all; ``HF_HUB_OFFLINE=1`` skips even that question.

    >>> path = cached_file("vgg16.tv_in1k")     # a local file, or None
    >>> why = unreachable()                      # None when the hub answers, else the reason
"""

from __future__ import annotations

import threading

__all__ = ["HUB_TIMEOUT", "cached_file", "unreachable"]

HUB_TIMEOUT = 3.0  # seconds for the one question to the hub; an answer takes well under one
_verdicts: dict[str, str | None] = {}  # endpoint -> why it cannot be used (None: it answers); asked once


def cached_file(timm_name: str) -> str | None:
    """The weights file of ``timm_name`` in the local hub cache (safetensors first), or ``None``."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(timm_name)
    hf_id = getattr(cfg, "hf_hub_id", None)
    if not hf_id:
        return None
    filename = getattr(cfg, "hf_hub_filename", None)
    for name in [filename] if filename else ["model.safetensors", "pytorch_model.bin"]:
        path = try_to_load_from_cache(hf_id, name)
        if isinstance(path, str):
            return path
    return None


def unreachable() -> str | None:
    """Why the hub cannot be used now, or ``None`` when it answers: offline mode, or no answer within
    ``HUB_TIMEOUT`` seconds (asked once per process and endpoint)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    if endpoint not in _verdicts:
        _verdicts[endpoint] = _ask(endpoint)
    return _verdicts[endpoint]


def _ask(endpoint: str) -> str | None:
    from huggingface_hub.utils import get_session

    verdict = [f"{endpoint} gave no answer within {HUB_TIMEOUT:g} s"]

    def ask() -> None:
        try:
            status = get_session().head(endpoint, timeout=HUB_TIMEOUT).status_code
            verdict[0] = None if status < 500 else f"{endpoint} answered HTTP {status}"
        except Exception as exc:  # whatever stops an answer (DNS, refused, TLS, proxy) means "not reachable"
            verdict[0] = f"{endpoint} cannot be reached ({type(exc).__name__}: {str(exc)[:120]})"

    # in a thread: a name lookup can block longer than any socket timeout
    thread = threading.Thread(target=ask, name="headstart-hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT + 1.0)
    return verdict[0]
