"""`python -m agent`: the same as the ota-agent command."""

from .daemon import main

if __name__ == "__main__":
    raise SystemExit(main())
