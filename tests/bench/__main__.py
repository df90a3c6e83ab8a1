"""`python -m tests.bench`: make bench."""

from tests.bench.run import main

main()
