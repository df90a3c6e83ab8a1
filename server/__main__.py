"""`python -m server`: the same as the follow-server command."""

from server.cli import main

main()
