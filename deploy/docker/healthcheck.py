"""Container HEALTHCHECK for `recforge serve`: GET /readyz on this container's port; exit 0 only on HTTP 200.

/healthz only says the process answers: it is 200 even when no model ever loaded, so a container
that cannot serve a single recommendation would look healthy. The container is healthy when it can
serve (/readyz: models loaded, event store writable); the HEALTHCHECK's start period covers loading.

Python's standard library instead of curl, so the image needs nothing the server itself does not; the
one-line reason goes to stderr, where `docker inspect` shows it under State.Health.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(url: str, timeout_s: float) -> str | None:
    """None when healthy, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def main() -> int:
    port = os.environ.get("RECFORGE_SERVE_PORT", "8000")
    url = os.environ.get("RECFORGE_HEALTHCHECK_URL", f"http://127.0.0.1:{port}/readyz")
    problem = check(url, float(os.environ.get("RECFORGE_HEALTHCHECK_TIMEOUT_S", "4")))
    if problem is not None:
        print(f"unhealthy: {url}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
