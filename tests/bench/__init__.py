"""`make bench`: the service measured against ceilings taken in the same run (see
tests.bench.run), seeded with a generated graph (tests.bench.graph) through the bulk
importer."""
