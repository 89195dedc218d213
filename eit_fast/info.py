"""`python -m eit_fast.info`: which fast paths this machine can use, and why not."""
import argparse
import json
import sys

from .runtime import format_info, info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eit_fast.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    d = info()
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
