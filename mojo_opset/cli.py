"""``mojo-opset`` command line."""
import sys


def main(argv=None):
    from .tools.cli import main as _main
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
