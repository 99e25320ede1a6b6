"""Start the Few-Shot Bot service: ``python server.py [--host H] [--port P] [--model M]`` (see ``--help``)."""
import sys

from app.cli import cli

if __name__ == "__main__":
    cli(["serve", *sys.argv[1:]], prog_name="server.py")
