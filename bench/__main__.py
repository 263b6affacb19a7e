"""Run meshlib's benchmarks: `make bench` or `python -m bench [NAME...]`."""

from __future__ import annotations

import sys

from bench import async_client, dataplane, metrics, middleware, policy

BENCHMARKS = {
    "policy": policy.main,
    "async_client": async_client.main,
    "dataplane": dataplane.main,
    "metrics": metrics.main,
    "middleware": middleware.main,
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    for name in names:
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})", file=sys.stderr)
            return 2
        BENCHMARKS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
