"""Talking to the Hugging Face hub without ever hanging when it is out of reach."""

import threading

from huggingface_hub import constants
from huggingface_hub.utils import httpx


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether one HEAD request to the hub endpoint (``HF_ENDPOINT`` respected) answers within ``timeout`` seconds.

    No retries. False at once in offline mode (``HF_HUB_OFFLINE``), on any connection error or timeout, and on a 5xx
    answer (the hub is there but cannot serve).
    """
    if constants.HF_HUB_OFFLINE:
        return False
    answered: list[bool] = []

    def probe() -> None:
        try:
            answered.append(httpx.head(constants.ENDPOINT, timeout=timeout).status_code < 500)
        except (httpx.HTTPError, httpx.InvalidURL):  # a malformed HF_ENDPOINT is as unusable as a dead one
            answered.append(False)

    # httpx's timeout does not cover DNS resolution, which can stall for tens of seconds on a broken resolver; a
    # daemon thread bounds the whole probe and is abandoned if it overruns.
    thread = threading.Thread(target=probe, name="hub-reachable", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered) and answered[0]
